"""What a method adds around the model: its teacher and its region source (see the README's
"Methods" section). The engine calls only the roles' hooks and never branches on a method's name."""

from fineclip.methods.detailclip import DetailCLIPTeacher
from fineclip.methods.regions import GridRegions, grid_layouts
from fineclip.methods.teachers import EMATeacher, FrozenTeacher, SelfTeacher, Teacher, ema_momentum

__all__ = ["DetailCLIPTeacher", "EMATeacher", "FrozenTeacher", "GridRegions", "SelfTeacher", "Teacher", "ema_momentum",
           "grid_layouts"]

"""What a method adds around the model: its teacher and its region source (docs/methods.md). The
engine calls only the roles' hooks and never branches on a method's name."""

from fineclip.methods.checkpoint_teacher import CheckpointTeacher
from fineclip.methods.detailclip import DetailCLIPTeacher
from fineclip.methods.regions import BoxRegions, GridRegions, ProposalRegions, RegionSource, grid_layouts
from fineclip.methods.teachers import EMATeacher, FrozenTeacher, SelfTeacher, Teacher, TeacherSet, ema_momentum
from fineclip.methods.vfm import VisionFoundationTeacher

__all__ = ["BoxRegions", "CheckpointTeacher", "DetailCLIPTeacher", "EMATeacher", "FrozenTeacher", "GridRegions",
           "ProposalRegions", "RegionSource", "SelfTeacher", "Teacher", "TeacherSet", "VisionFoundationTeacher",
           "ema_momentum", "grid_layouts"]

"""BatchNorm with statistics over all ranks (mmdet's ``SyncBN`` in the F-ViT configs).

On GPUs this is torch's ``SyncBatchNorm``. torch has no CPU kernel for it (``batch_norm_stats``), so under
gloo the same statistics come from two autograd-aware all-reduces of per-channel sums:

    n = Σ_ranks count,   μ = Σ_ranks Σ x / n,   σ² = Σ_ranks Σ (x − μ)² / n,   y = γ (x − μ) / √(σ² + ε) + β

and the running statistics take the unbiased σ² · n / (n − 1), as torch's do. Either way N ranks train
like one process holding all N batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fineclip.losses.gather import sum_with_grad


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        sums = sum_with_grad(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = sum_with_grad((centred * centred).sum(dims)) / n  # two passes: no cancellation in E[x²] − μ²
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), momentum)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` synchronised over the process group: torch's ``SyncBatchNorm`` on CUDA, the
    all-reduce above elsewhere (the same weights and buffers; DDP refuses torch's on a CPU module)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            if type(child) is not nn.BatchNorm2d:
                raise TypeError(f"no CPU synchronisation for {type(child).__name__}")
            child.__class__ = AllReduceBatchNorm2d
    return module

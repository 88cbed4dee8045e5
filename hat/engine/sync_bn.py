"""Batch norm whose training statistics are taken over every rank's batch, on CPU (gloo) and GPU alike.

torch.nn.SyncBatchNorm runs on GPUs only; this one all-reduces per-channel sums, so two ranks with batch B
normalize exactly like one process with batch 2B. Outside a process group, or in eval mode, it is plain BN."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _SyncNorm(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with mean and var over all ranks (two passes, so the
    variance does not cancel catastrophically). Returns y, mean and the biased var (for the running stats)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [d for d in range(x.dim()) if d != 1]
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        total = torch.cat([x.sum(dims), count])
        dist.all_reduce(total)
        n = float(total[-1])
        mean = total[:-1] / n
        centered = x - _channel(mean, x)
        sq = centered.square().sum(dims)
        dist.all_reduce(sq)
        var = sq / n
        inv_std = torch.rsqrt(var + eps)
        xhat = centered * _channel(inv_std, x)
        ctx.save_for_backward(xhat, inv_std, weight)
        ctx.n = n
        ctx.mark_non_differentiable(mean, var)
        y = xhat if weight is None else xhat * _channel(weight, x) + _channel(bias, x)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        xhat, inv_std, weight = ctx.saved_tensors
        n = ctx.n
        dims = [d for d in range(xhat.dim()) if d != 1]
        local = torch.cat([grad_y.sum(dims), (grad_y * xhat).sum(dims)])
        grad_bias, grad_weight = local.chunk(2)  # this rank's share; DDP averages parameter gradients
        total = local.clone()
        dist.all_reduce(total)
        sum_dy, sum_dy_xhat = total.chunk(2)
        scale = inv_std if weight is None else inv_std * weight
        grad_x = (grad_y - _channel(sum_dy / n, xhat) - xhat * _channel(sum_dy_xhat / n, xhat)) * _channel(scale, xhat)
        if weight is None:
            return grad_x, None, None, None
        return grad_x, grad_weight, grad_bias, None


def _channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(1, -1, *([1] * (like.dim() - 2)))


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for BatchNorm1d/2d/3d with the same parameters and buffers (checkpoints load either way)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects at least 2D input (N, C, ...), got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        y, mean, var = _SyncNorm.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = x.numel() // x.shape[1] * dist.get_world_size()  # equal batches: DistributedSampler pads
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * n / max(n - 1, 1)).to(self.running_var.dtype), momentum)
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d below `module` (in place) by a SyncBatchNorm holding the same parameter and
    buffer objects."""
    for name, child in module.named_children():
        if type(child) in NORMS:
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias
            if child.track_running_stats:
                sync.running_mean, sync.running_var = child.running_mean, child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module

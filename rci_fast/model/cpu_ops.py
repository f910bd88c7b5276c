"""Fused RMSNorm and SwiGLU for float32 tensors on a CPU (C++ in cpu_kernels.cpp, autograd here).

The model calls `rms_norm` and `silu_mul`; they take the fused path where it applies (CPU,
float32, the extension built) and the eager one otherwise (GPU, bf16, no compiler). Same values
and gradients as the eager path to float32 rounding (tests/test_cpu_ops.py). `eager()` turns the
fused path off, for comparisons.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from rci_fast.model import native

_enabled = True


@contextlib.contextmanager
def eager():
    """Within this block the model computes RMSNorm and SwiGLU with eager torch ops."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def _fused(*tensors: torch.Tensor) -> bool:
    return (_enabled and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and native.available())


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()  # float32 statistics, as transformers computes them
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _fused(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_eager(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the SwiGLU MLP's activation."""
    if _fused(gate, up):
        return _SiluMul.apply(gate, up)
    return F.silu(gate) * up


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = x.detach().reshape(-1, x.shape[-1]).contiguous()
        y, rstd = torch.ops.rci_fast_cpu.rms_norm_forward(rows, weight.detach().contiguous(), eps)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        rows, weight, rstd = ctx.saved_tensors
        dx, dweight = torch.ops.rci_fast_cpu.rms_norm_backward(
            dy.reshape(rows.shape).contiguous(), rows, weight.detach().contiguous(), rstd)
        return dx.view(dy.shape), dweight, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.detach().contiguous(), up.detach().contiguous()
        h, sig = torch.ops.rci_fast_cpu.swiglu_forward(gate, up)
        ctx.save_for_backward(gate, up, sig)
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up, sig = ctx.saved_tensors
        dgate, dup = torch.ops.rci_fast_cpu.swiglu_backward(dh.contiguous(), gate, up, sig)
        return dgate, dup

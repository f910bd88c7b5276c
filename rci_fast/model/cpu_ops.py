"""Fused RMSNorm, SwiGLU, RoPE and packed causal attention for float32 tensors on a CPU (C++ in
cpu_kernels.cpp, autograd here).

The model calls `rms_norm`, `silu_mul`, `rope` and `varlen_attention`; they take the fused path
where it applies (CPU, float32, the extension built) and the eager one otherwise (GPU, bf16, no
compiler; for attention: padded groups through SDPA). Same values and gradients as the eager path
to float32 rounding (tests/test_cpu_ops.py; RoPE's are the same to the bit on x86). `eager()` turns
the fused path off, for comparisons.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rci_fast.model import native

_enabled = True


@contextlib.contextmanager
def eager():
    """Within this block the model computes RMSNorm, SwiGLU, RoPE and packed attention with eager
    torch ops."""
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


def rope_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; cos/sin: [B, T, D]. Rotates each head's first half against its second
    (Qwen2/Llama's rotate_half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if (_fused(x, cos, sin) and x.dim() == 4 and x.shape[-1] % 2 == 0 and cos.dim() == 3
            and cos.shape == sin.shape and cos.stride() == sin.stride() and cos.stride(-1) == 1
            and cos.shape[0] in (1, x.shape[0]) and cos.shape[1:] == x.shape[2:]
            and not (cos.requires_grad or sin.requires_grad)):  # else eager (it broadcasts anything)
        shape = (x.shape[0], *cos.shape[1:])  # a batch of one broadcasts (stride 0)
        return _Rope.apply(x, cos.expand(shape), sin.expand(shape))
    return rope_eager(x, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the SwiGLU MLP's activation."""
    if _fused(gate, up):
        return _SiluMul.apply(gate, up)
    return F.silu(gate) * up


def varlen_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether varlen_attention runs in C++ for these (else the caller keeps its own path)."""
    return _fused(q, k, v) and q.dim() == 4 and q.shape[0] == 1 and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     query_from: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention within each packed sequence: q [1, heads, N, D], k/v [1, kv_heads, N, D],
    sequence bounds cu_seqlens [S + 1] -> [1, heads, N, D] (its memory laid out [N, heads, D], so
    the caller's transpose back to tokens is free). Float32 CPU tensors (varlen_attention_applies).
    query_from [S] (optional, on the host): the caller neither reads sequence i's output rows
    below query_from[i] nor gives them a gradient, so the kernel may leave them out (in whole
    query blocks; those rows come back 0); the others are the same to the bit."""
    return _VarlenAttention.apply(q, k, v, cu_seqlens, query_from)


def _head_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


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


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        x = _head_dim_contiguous(x)
        ctx.save_for_backward(cos, sin)
        return torch.ops.rci_fast_cpu.rope_forward(x.detach(), cos, sin, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors  # the backward applies the rotation's transpose
        return torch.ops.rci_fast_cpu.rope_forward(_head_dim_contiguous(dy), cos, sin, True), None, None


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, query_from):
        q, k, v = (_head_dim_contiguous(t.detach()[0]) for t in (q, k, v))
        cu = cu_seqlens.to(device="cpu", dtype=torch.int64)
        query_from = None if query_from is None else query_from.to(device="cpu", dtype=torch.int64)
        ctx.scale, ctx.query_from = q.shape[-1] ** -0.5, query_from
        out, lse = torch.ops.rci_fast_cpu.varlen_attention_forward(q, k, v, cu, ctx.scale, query_from)
        ctx.save_for_backward(q, k, v, out, lse, cu)
        return out.unsqueeze(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, cu = ctx.saved_tensors
        dq, dk, dv = torch.ops.rci_fast_cpu.varlen_attention_backward(
            _head_dim_contiguous(dout[0]), q, k, v, out, lse, cu, ctx.scale, ctx.query_from)
        return dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0), None, None

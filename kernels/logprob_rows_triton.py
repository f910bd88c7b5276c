"""Triton twins of logprob_rows_torch: one program per token row of a logits tile, one streaming
pass over the tile's columns.

Imported only when the Triton backend is chosen, so the torch path works without triton installed.
Tiles are fp32 here (the matmul writes fp32); loads still cast to fp32 so a bf16 tile would be safe
too (bf16 arithmetic is unsupported in the interpreter).
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096  # columns per loop step; 4096 fp32 = 16 KiB of registers per program


@triton.jit
def _block_stats_kernel(logits_ptr, stride_row, targets_ptr, m_ptr, s_ptr, a_ptr, z_target_ptr,
                        Vb, inv_temp, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row  # int64: C x Vb overflows int32 at large C
    cols = tl.arange(0, BLOCK_V)

    # Online: m running max; s = sum exp(z - m); a = sum exp(z - m) (z - m). a stays relative to m
    # so that entropy = log s - a / s never subtracts two large numbers.
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    a = tl.zeros([], tl.float32)
    for start in range(0, Vb, BLOCK_V):
        in_tile = start + cols < Vb
        # Columns past the tile's end are -inf, never 0: exp(0) would leak into s (verl #2899).
        z = tl.load(row_ptr + start + cols, mask=in_tile, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every step holds at least one real column
        alpha = tl.exp(m - m_new)
        # Re-centre a on the new max (first step: s = 0, shift 0, and no inf * 0).
        shift = (tl.where(s > 0, m, m_new) - m_new) * s
        e = tl.exp(z - m_new)
        centred = tl.where(in_tile, z - m_new, 0.0)
        a = alpha * (a + shift) + tl.sum(e * centred, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new

    target = tl.load(targets_ptr + row)
    here = (target >= 0) & (target < Vb)
    z_target = tl.load(row_ptr + tl.where(here, target, 0)).to(tl.float32) * inv_temp
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(a_ptr + row, a)
    tl.store(z_target_ptr + row, tl.where(here, z_target, 0.0))


@triton.jit
def _grad_block_kernel(logits_ptr, stride_row, out_ptr, stride_out, targets_ptr, lse_ptr, entropy_ptr,
                       grad_logp_ptr, grad_entropy_ptr, Vb, inv_temp, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    out_row_ptr = out_ptr + row.to(tl.int64) * stride_out
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    g = tl.load(grad_logp_ptr + row).to(tl.float32)
    g_ent = tl.load(grad_entropy_ptr + row).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    for start in range(0, Vb, BLOCK_V):
        idx = start + cols
        in_tile = idx < Vb
        logp = tl.load(row_ptr + idx, mask=in_tile, other=0.0).to(tl.float32) * inv_temp - lse
        p = tl.exp(logp)
        # All in fp32, the target term (p_y - 1) included.
        dz = -g * p - g_ent * p * (logp + entropy)
        dz = tl.where(idx == target, dz + g, dz)
        # Stored in out's dtype: bf16 for the tensor-core matmuls that follow, written once.
        tl.store(out_row_ptr + idx, (dz * inv_temp).to(out_ptr.dtype.element_ty), mask=in_tile)


def _block_v(Vb, block_v):
    return block_v or min(MAX_BLOCK_V, triton.next_power_of_2(Vb))


def block_stats(logits, local_targets, inv_temp, keep_logits=True, block_v=None):
    """Same contract as logprob_rows_torch.block_stats (logits is read, never modified)."""
    C, Vb = logits.shape
    m, s, a, z_target = (torch.empty(C, dtype=torch.float32, device=logits.device) for _ in range(4))
    if C:
        _block_stats_kernel[(C,)](logits, logits.stride(0), local_targets, m, s, a, z_target,
                                  Vb, inv_temp, BLOCK_V=_block_v(Vb, block_v))
    return m, s, a, z_target


def grad_block_(logits, local_targets, lse, entropy, grad_logp, grad_entropy, inv_temp, out=None,
                block_v=None):
    """Same contract as logprob_rows_torch.grad_block_: d loss / d logits, in place in `logits`, or
    written to `out` ([C, Vb], any float dtype) in one pass."""
    C, Vb = logits.shape
    out = logits if out is None else out
    if grad_entropy is None:
        grad_entropy = torch.zeros_like(grad_logp)
    if C:
        _grad_block_kernel[(C,)](logits, logits.stride(0), out, out.stride(0), local_targets, lse, entropy,
                                 grad_logp, grad_entropy, Vb, inv_temp, BLOCK_V=_block_v(Vb, block_v))
    return out

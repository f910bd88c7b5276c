"""Triton twins of logprob_rows_torch: one program per token row, one streaming pass over the vocab.

Imported only when the Triton backend is chosen, so the torch path works without triton installed.
The logits chunk is always fp32 here (the matmul writes fp32); loads still cast to fp32 so a bf16
buffer would be safe too (bf16 arithmetic is unsupported in the interpreter).
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096  # one vocab tile per loop step; 4096 fp32 = 16 KiB of registers per program


@triton.jit
def _forward_stats_kernel(logits_ptr, stride_row, targets_ptr, logp_ptr, lse_ptr, entropy_ptr,
                          V, inv_temp, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row  # int64: C x V overflows int32 at large C
    cols = tl.arange(0, BLOCK_V)

    # Online log-sum-exp. m: running max; s = sum exp(z - m); a = sum exp(z - m) (z - m).
    # a is kept relative to m so that entropy = log s - a / s does not cancel two large numbers.
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    a = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        in_vocab = start + cols < V
        # Columns past V are -inf, never 0: exp(0) would leak into the sum (verl #2899).
        z = tl.load(row_ptr + start + cols, mask=in_vocab, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every tile holds at least one real column
        alpha = tl.exp(m - m_new)
        # a was relative to the old max; re-centre it (the first tile has s = 0: shift 0, no inf * 0).
        shift = (tl.where(s > 0, m, m_new) - m_new) * s
        e = tl.exp(z - m_new)
        centred = tl.where(in_vocab, z - m_new, 0.0)
        a = alpha * (a + shift) + tl.sum(e * centred, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new

    log_s = tl.log(s)
    lse = m + log_s
    entropy = log_s - a / s
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    z_target = tl.load(row_ptr + tl.where(ignored, 0, target)).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, tl.where(ignored, 0.0, z_target - lse))
    tl.store(lse_ptr + row, lse)
    tl.store(entropy_ptr + row, tl.where(ignored, 0.0, entropy))


@triton.jit
def _grad_logits_kernel(logits_ptr, stride_row, targets_ptr, lse_ptr, entropy_ptr,
                        grad_logp_ptr, grad_entropy_ptr, V, inv_temp, ignore_index,
                        BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    g = tl.where(ignored, 0.0, tl.load(grad_logp_ptr + row).to(tl.float32))
    g_ent = tl.where(ignored, 0.0, tl.load(grad_entropy_ptr + row).to(tl.float32))
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        in_vocab = idx < V
        logp = tl.load(row_ptr + idx, mask=in_vocab, other=0.0).to(tl.float32) * inv_temp - lse
        p = tl.exp(logp)
        # Everything in fp32, the target term (p_y - 1) included.
        dz = -g * p - g_ent * p * (logp + entropy)
        dz = tl.where(idx == target, dz + g, dz)
        tl.store(row_ptr + idx, dz * inv_temp, mask=in_vocab)


def _block_v(V, block_v):
    return block_v or min(MAX_BLOCK_V, triton.next_power_of_2(V))


def forward_stats(logits, targets, inv_temp, ignore_index, block_v=None):
    """Same contract as logprob_rows_torch.forward_stats (logits is read, not modified)."""
    C, V = logits.shape
    logp, lse, entropy = (torch.empty(C, dtype=torch.float32, device=logits.device) for _ in range(3))
    if C:
        _forward_stats_kernel[(C,)](logits, logits.stride(0), targets, logp, lse, entropy,
                                    V, inv_temp, ignore_index, BLOCK_V=_block_v(V, block_v))
    return logp, lse, entropy


def grad_logits_(logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index,
                 block_v=None):
    """Same contract as logprob_rows_torch.grad_logits_: logits becomes d loss / d logits in place."""
    C, V = logits.shape
    if C:
        _grad_logits_kernel[(C,)](logits, logits.stride(0), targets, lse, entropy,
                                  grad_logp.contiguous(), grad_entropy.contiguous(), V, inv_temp,
                                  ignore_index, BLOCK_V=_block_v(V, block_v))
    return logits

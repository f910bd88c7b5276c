"""Log-probs (and entropy) of target tokens straight from hidden states and the lm_head weight.

The [T x V] logits never exist: tokens are processed in chunks of C rows. Per chunk, the matmul
h_c @ W.T writes fp32 logits [C, V]; a row pass (torch or Triton) reduces them to logp, lse and
entropy. The backward recomputes each chunk's logits, turns them in place into d loss / d logits
and applies the two remaining matmuls; dW accumulates across chunks in fp32.
FLOPs: 2TVH forward + 6TVH backward = the 8*T*H*V the benchmark counts against.
"""
import os

import torch

from . import logprob_rows_torch

# Bytes of fp32 logits per chunk. On CPU 128 MiB (~200 rows at V = 152k): fwd+bwd measured 16%
# faster than at 64 MiB, as dW's read-modify-write is amortised over more rows. On GPU 1 GiB, so each
# chunk's matmuls are big enough to reach the tensor-core roofline.
CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 1 << 30}


def _triton_rows():
    try:
        from . import logprob_rows_triton
    except ImportError as e:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)") from e
    return logprob_rows_triton


def _pick_rows(backend, device):
    if backend == "torch":
        return logprob_rows_torch
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                               "triton is imported (Triton's CPU interpreter)")
        return _triton_rows()
    if backend == "auto":
        if device.type == "cuda":
            try:
                return _triton_rows()
            except RuntimeError:
                return logprob_rows_torch
        return logprob_rows_torch
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


# Matmuls of a chunk. On CUDA, half-precision inputs use tensor cores with fp32 accumulation and an
# fp32 output (no rounding of the logits). CPU half-precision matmuls would round their output to
# bf16 (0.4% of a logit), so there the weight is cast to fp32 a vocab slice at a time instead.
CPU_VOCAB_SLICE = 8192


def _logits_fp32(h, weight):
    """h @ weight.T as fp32 [C, V]."""
    if h.dtype == torch.float32:
        return h @ weight.t()
    if h.is_cuda:
        return torch.mm(h, weight.t(), out_dtype=torch.float32)
    h32 = h.float()
    out = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, weight.shape[0], CPU_VOCAB_SLICE):
        out[:, s:s + CPU_VOCAB_SLICE] = h32 @ weight[s:s + CPU_VOCAB_SLICE].float().t()
    return out


def _grad_hidden(dz, weight, out):
    """out = dz @ weight, dz fp32 [C, V], out in the hidden dtype."""
    if weight.dtype == torch.float32:
        return torch.mm(dz, weight, out=out)
    if weight.is_cuda:
        return torch.mm(dz.to(weight.dtype), weight, out=out)
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for s in range(0, weight.shape[0], CPU_VOCAB_SLICE):
        acc.addmm_(dz[:, s:s + CPU_VOCAB_SLICE], weight[s:s + CPU_VOCAB_SLICE].float())
    return out.copy_(acc)


def _accumulate_grad_weight(acc, dz, h):
    """acc += dz.T @ h, acc fp32 [V, H]: the accumulation across chunks stays in fp32."""
    if h.is_cuda and h.dtype != torch.float32:
        return torch.addmm(acc, dz.to(h.dtype).t(), h, out_dtype=torch.float32, out=acc)
    return acc.addmm_(dz.t(), h.float())  # h.float(): a no-op for fp32, small ([C, H]) otherwise


def _chunk_rows(T, V, device, chunk_size):
    if chunk_size is not None:
        return max(1, int(chunk_size))
    rows = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"]) // (4 * V)
    return max(1, min(T, rows if rows < 16 else rows // 16 * 16))


class _LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, ignore_index, chunk, rows):
        T = hidden.shape[0]
        logp = torch.empty(T, dtype=torch.float32, device=hidden.device)
        lse, entropy = torch.empty_like(logp), torch.empty_like(logp)
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            logits = _logits_fp32(hidden[s:e], weight)
            logp[s:e], lse[s:e], entropy[s:e] = rows.forward_stats(logits, targets[s:e], inv_temp, ignore_index)
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.inv_temp, ctx.ignore_index, ctx.chunk, ctx.rows = inv_temp, ignore_index, chunk, rows
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_entropy is None) or not (need_h or need_w):
            return None, None, None, None, None, None, None
        zeros = torch.zeros_like(lse)
        grad_logp = zeros if grad_logp is None else grad_logp
        grad_entropy = zeros if grad_entropy is None else grad_entropy
        T = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, T, ctx.chunk):
            e = min(T, s + ctx.chunk)
            h = hidden[s:e]
            dz = _logits_fp32(h, weight)
            ctx.rows.grad_logits_(dz, targets[s:e], lse[s:e], entropy[s:e], grad_logp[s:e],
                                  grad_entropy[s:e], ctx.inv_temp, ctx.ignore_index)
            if need_h:
                _grad_hidden(dz, weight, grad_h[s:e])
            if need_w:
                _accumulate_grad_weight(grad_w, dz, h)
            del dz
        if grad_w is not None and weight.dtype != torch.float32:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def _check_inputs(hidden, weight, targets, temperature, ignore_index):
    if not (isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor) and isinstance(targets, torch.Tensor)):
        raise TypeError("hidden, weight and targets must be torch tensors")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if targets.dim() != 1:
        raise ValueError(f"targets must be [T], got shape {tuple(targets.shape)}")
    T, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"hidden size mismatch: hidden is [T, {H}] but weight is {list(weight.shape)} (expected [V, {H}])")
    if targets.shape[0] != T:
        raise ValueError(f"targets has {targets.shape[0]} entries but hidden has {T} tokens")
    if V == 0 or H == 0:
        raise ValueError(f"empty vocab or hidden size: weight shape {tuple(weight.shape)}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64 token ids, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"tensors on different devices: hidden {hidden.device}, weight {weight.device}, "
                         f"targets {targets.device}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if T:
        valid = targets != ignore_index
        # One host sync: an out-of-range id would otherwise read another row or garbage.
        bad = (valid & ((targets < 0) | (targets >= V))).any()
        if bool(bad):
            t = targets[valid & ((targets < 0) | (targets >= V))][0].item()
            raise ValueError(f"target id {t} out of range for vocab size {V} (ignore_index={ignore_index})")


def fused_linear_logprob(hidden, weight, targets, temperature=1.0, *, return_entropy=False,
                         backend="auto", ignore_index=-100, chunk_size=None):
    """log softmax(hidden @ weight.T / temperature)[t, targets[t]] for each token t, as fp32 [T].

    hidden [T, H] and weight [V, H] (fp32, bf16 or fp16, same dtype and device), targets [T] int64.
    Differentiable w.r.t. hidden and weight. With return_entropy=True also returns the entropy of
    each token's distribution (differentiable too). Tokens whose target is ignore_index get logp 0,
    entropy 0 and no gradient. backend: "auto" (Triton on CUDA, torch elsewhere), "triton", "torch".
    chunk_size: tokens per chunk (default: as many as fit a fixed fp32 logits budget).
    """
    _check_inputs(hidden, weight, targets, temperature, ignore_index)
    rows = _pick_rows(backend, hidden.device)
    T, V = hidden.shape[0], weight.shape[0]
    chunk = _chunk_rows(T, V, hidden.device, chunk_size)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    logp, entropy = _LinearLogprob.apply(hidden, weight, targets, 1.0 / float(temperature), int(ignore_index), chunk, rows)
    return (logp, entropy) if return_entropy else logp

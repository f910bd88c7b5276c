"""Log-probs (and entropy) of target tokens straight from hidden states and the lm_head weight.

The [T x V] logits never exist: they are produced one tile at a time, C tokens by Vb vocabulary
columns, as fp32 from a matmul h_c @ W_b.T. A row pass (torch or Triton) reduces each tile to a
max, a sum of exponentials and a centred first moment, which merge across vocab blocks into lse
and entropy. The backward recomputes each tile, turns it in place into d loss / d logits and
applies the two remaining matmuls: dH accumulates over vocab blocks and dW over token chunks, both
in fp32. Tiling the vocab (not only the tokens) keeps every matmul's inner size large and writes
each block of dW once per token chunk instead of re-reading all of dW per chunk.
FLOPs: 2TVH forward + 6TVH backward = the 8*T*H*V the benchmark counts against. Where all the
logits are one small tile (KEEP_TILE_BYTES: a CPU, a small vocabulary) the forward keeps it and
the backward skips the recomputation (6*T*H*V in all).
"""
import os

import torch

from . import logprob_rows_torch

# Bytes of one fp32 logits tile, and the most tokens per chunk. The tile's vocab width follows:
# budget / (4 * chunk). CPU: 128 MiB (T = 2048 -> 16k-column blocks; the working set stays small
# next to the fp32 dW every path returns). GPU: 1 GiB, so each matmul is big enough to reach the
# tensor-core roofline.
TILE_BYTES = {"cpu": 128 << 20, "cuda": 1 << 30}
MAX_CHUNK_TOKENS = {"cpu": 4096, "cuda": 16384}
# When all the logits are one tile no larger than this, the forward keeps it for the backward
# instead of recomputing it: one matmul of the four saved (on a CPU ~1/4 of the head's time; a
# GPU recomputes cheaply and has better uses for the memory).
KEEP_TILE_BYTES = {"cpu": 128 << 20, "cuda": 0}


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


# Matmuls of a tile. On CUDA, half-precision inputs run on tensor cores with fp32 accumulation and
# an fp32 result (out_dtype, torch >= 2.8): logits are never rounded to bf16. Older torch rounds
# the tile's product to bf16 first, as Liger and verl do. A CPU half-precision matmul would round
# its result too, so there the tile's operands are cast to fp32 first (a [Vb, H] slice).
_MM_OUT_DTYPE = any("out_dtype" in str(s) for s in torch._C._jit_get_schemas_for_operator("aten::addmm"))


def _tensor_cores(x):
    return x.is_cuda and x.dtype != torch.float32


def _logits_tile(h, w_block):
    """h @ w_block.T as fp32 [C, Vb]."""
    if h.dtype == torch.float32:
        return h @ w_block.t()
    if h.is_cuda:
        return torch.mm(h, w_block.t(), out_dtype=torch.float32) if _MM_OUT_DTYPE else (h @ w_block.t()).float()
    return h.float() @ w_block.float().t()


def _add_grad_hidden_(acc, dz, w_block):
    """acc += dz @ w_block; acc fp32 [C, H], dz [C, Vb] (fp32, or w_block's dtype on tensor cores)."""
    if _tensor_cores(w_block):
        if _MM_OUT_DTYPE:
            return torch.addmm(acc, dz, w_block, out_dtype=torch.float32, out=acc)
        return acc.add_(dz @ w_block)
    return acc.addmm_(dz, w_block.float())  # .float(): a no-op for fp32, a [Vb, H] slice otherwise


def _grad_weight_block_(out, dz, h, accumulate):
    """out (fp32 [Vb, H]) = or += dz.T @ h; dz as in _add_grad_hidden_."""
    beta = 1.0 if accumulate else 0.0  # beta 0: out is not read (it may hold garbage)
    if _tensor_cores(h):
        if _MM_OUT_DTYPE:
            return torch.addmm(out, dz.t(), h, beta=beta, out_dtype=torch.float32, out=out)
        return out.add_(dz.t() @ h) if accumulate else out.copy_(dz.t() @ h)
    return out.addmm_(dz.t(), h.float(), beta=beta)  # h.float(): a no-op for fp32, small otherwise


def merge_block_stats(m, s, a):
    """Merge per-block (m, s, a) [B, C] into (lse, entropy) [C]."""
    m_all = m.amax(dim=0)
    scale = torch.exp(m - m_all)                      # every block's m is finite: no inf - inf
    s_all = (scale * s).sum(0)
    a_all = (scale * (a + (m - m_all) * s)).sum(0)    # re-centre each block's a on the global max
    log_s = torch.log(s_all)
    return m_all + log_s, log_s - a_all / s_all


def _budget_kind(device):
    return device.type if device.type in TILE_BYTES else "cpu"


def tile_sizes(T, V, device, chunk_size=None, vocab_block=None):
    """(tokens per chunk, vocab columns per block) for the fp32 tile budget of this device."""
    kind = _budget_kind(device)
    chunk = int(chunk_size) if chunk_size else min(max(T, 1), MAX_CHUNK_TOKENS[kind])
    if vocab_block:
        return max(1, chunk), max(1, int(vocab_block))
    block = TILE_BYTES[kind] // (4 * max(chunk, 1))
    block = block // 128 * 128 if block >= 128 else max(block, 1)  # whole 128-column groups
    return max(1, chunk), min(V, block)


def _spans(n, step):
    return [(s, min(n, s + step)) for s in range(0, n, step)]


class _LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, ignore_index, chunk, block, rows, keep_bytes):
        T, V = hidden.shape[0], weight.shape[0]
        vocab_spans = _spans(V, block)
        keep = T <= chunk and V <= block and 4 * T * V <= keep_bytes and any(ctx.needs_input_grad[:2])
        ctx.kept_tile = None
        ignored = targets == ignore_index
        local = targets.masked_fill(ignored, -1)       # -1: the target is in no block
        logp = torch.empty(T, dtype=torch.float32, device=hidden.device)
        lse, entropy = torch.empty_like(logp), torch.empty_like(logp)
        for t0, t1 in _spans(T, chunk):
            local_c = local[t0:t1]
            stats = torch.empty(4, len(vocab_spans), t1 - t0, dtype=torch.float32, device=hidden.device)
            for b, (v0, v1) in enumerate(vocab_spans):
                tile = _logits_tile(hidden[t0:t1], weight[v0:v1])
                m, s, a, zt = rows.block_stats(tile, local_c - v0 * (local_c >= 0), inv_temp, keep_logits=keep)
                stats[0, b], stats[1, b], stats[2, b], stats[3, b] = m, s, a, zt
                if keep:
                    ctx.kept_tile = tile  # not save_for_backward: the backward consumes it in place
                del tile
            lse[t0:t1], entropy[t0:t1] = merge_block_stats(stats[0], stats[1], stats[2])
            logp[t0:t1] = stats[3].sum(0) - lse[t0:t1]  # z_target is non-zero in one block only
        logp.masked_fill_(ignored, 0.0)
        entropy.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(hidden, weight, local, lse, entropy)
        ctx.inv_temp, ctx.chunk, ctx.block, ctx.rows = inv_temp, chunk, block, rows
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, local, lse, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_entropy is None) or not (need_h or need_w):
            return (None,) * 9
        ignored = local < 0
        # Ignored tokens get zero upstream gradient: the row kernels need no ignore logic.
        # No entropy gradient (the usual case) stays None: the rows then skip its terms.
        g = (torch.zeros_like(lse) if grad_logp is None else grad_logp.float()).masked_fill(ignored, 0.0).contiguous()
        g_ent = None if grad_entropy is None else grad_entropy.float().masked_fill(ignored, 0.0).contiguous()
        T, V = hidden.shape[0], weight.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        # The first token chunk writes every block of dW (beta = 0), so empty() is safe unless T = 0.
        new_grad_w = torch.empty if T else torch.zeros
        grad_w = new_grad_w(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        # On tensor cores d/dlogits goes to the matmuls in the weight's dtype: the row pass writes it
        # there directly (one half-size buffer per tile, reused) instead of fp32 + a cast per matmul.
        dz_low = None
        if _tensor_cores(weight):
            dz_low = torch.empty(min(T, ctx.chunk), min(V, ctx.block), dtype=weight.dtype, device=weight.device)
        for ci, (t0, t1) in enumerate(_spans(T, ctx.chunk)):
            h, local_c = hidden[t0:t1], local[t0:t1]
            acc_h = torch.zeros(t1 - t0, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_h else None
            for v0, v1 in _spans(V, ctx.block):
                tile, ctx.kept_tile = ctx.kept_tile, None  # a second backward recomputes it
                if tile is None:
                    tile = _logits_tile(h, weight[v0:v1])
                out = None if dz_low is None else dz_low[:t1 - t0, :v1 - v0]
                dz = ctx.rows.grad_block_(tile, local_c - v0 * (local_c >= 0), lse[t0:t1], entropy[t0:t1],
                                          g[t0:t1], None if g_ent is None else g_ent[t0:t1], ctx.inv_temp,
                                          out=out)
                del tile
                if need_h:
                    _add_grad_hidden_(acc_h, dz, weight[v0:v1])
                if need_w:
                    _grad_weight_block_(grad_w[v0:v1], dz, h, accumulate=ci > 0)
                del dz
            if need_h:
                grad_h[t0:t1] = acc_h
        if grad_w is not None and weight.dtype != torch.float32:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


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
                         backend="auto", ignore_index=-100, chunk_size=None, vocab_block=None):
    """log softmax(hidden @ weight.T / temperature)[t, targets[t]] for each token t, as fp32 [T].

    hidden [T, H] and weight [V, H] (fp32, bf16 or fp16, same dtype and device), targets [T] int64.
    Differentiable w.r.t. hidden and weight. With return_entropy=True also returns the entropy of
    each token's distribution (differentiable too). Tokens whose target is ignore_index get logp 0,
    entropy 0 and no gradient. backend: "auto" (Triton on CUDA, torch elsewhere), "triton", "torch".
    chunk_size, vocab_block: the tile, tokens x vocab columns (default: all tokens up to a cap, and
    as many columns as fit the device's fp32 tile budget). Results do not depend on them beyond
    fp32 rounding.
    """
    _check_inputs(hidden, weight, targets, temperature, ignore_index)
    rows = _pick_rows(backend, hidden.device)
    chunk, block = tile_sizes(hidden.shape[0], weight.shape[0], hidden.device, chunk_size, vocab_block)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    # Grad mode is read here: inside forward() it is always off. Under no_grad nothing is kept.
    keep_bytes = KEEP_TILE_BYTES[_budget_kind(hidden.device)] if torch.is_grad_enabled() else 0
    logp, entropy = _LinearLogprob.apply(hidden, weight, targets, 1.0 / float(temperature),
                                         int(ignore_index), chunk, block, rows, keep_bytes)
    return (logp, entropy) if return_entropy else logp


class _LinearLossOnePass(torch.autograd.Function):
    """loss = chunk_loss over all tokens, its gradient formed in the forward (linear_policy_loss's
    one_pass): per chunk of tokens, one fp32 tile over the whole vocabulary, its row statistics,
    the loss's per-token gradient (autograd on the chunk's [C] log-probs and entropies), the tile
    turned into d loss / d logits, then dH and dW. The backward scales them by the upstream grad."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, ignore_index, chunk, rows, chunk_loss):
        T, V = hidden.shape[0], weight.shape[0]
        ignored = targets == ignore_index
        local = targets.masked_fill(ignored, -1)
        logp = torch.zeros(T, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logp)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros(T, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        dz_low = None
        if _tensor_cores(weight):
            dz_low = torch.empty(min(T, chunk), V, dtype=weight.dtype, device=weight.device)
        for t0, t1 in _spans(T, chunk):
            h, local_c, ignored_c = hidden[t0:t1], local[t0:t1], ignored[t0:t1]
            tile = _logits_tile(h, weight)
            m, s, a, z_target = rows.block_stats(tile, local_c, inv_temp)
            lse, ent = merge_block_stats(m[None], s[None], a[None])
            logp_c = (z_target - lse).masked_fill(ignored_c, 0.0)
            ent = ent.masked_fill(ignored_c, 0.0)
            with torch.enable_grad():
                lp, en = logp_c.clone().requires_grad_(), ent.clone().requires_grad_()
                loss_c = chunk_loss(t0, t1, lp, en)
                g, g_ent = torch.autograd.grad(loss_c, [lp, en], allow_unused=True, materialize_grads=True)
            loss += loss_c.detach()
            logp[t0:t1], entropy[t0:t1] = logp_c, ent
            g, g_ent = g.float().masked_fill(ignored_c, 0.0), g_ent.float().masked_fill(ignored_c, 0.0)
            if rows is logprob_rows_torch:
                # Its block_stats left z - m in the tile (z = logits / T): log p = tile - (lse - m), and
                # the 1/T of d z / d logits goes into the upstream gradients instead.
                shift, temp, g, g_ent = lse - m, 1.0, g * inv_temp, g_ent * inv_temp
            else:  # the Triton row pass only reads the tile
                shift, temp = lse, inv_temp
            out = None if dz_low is None else dz_low[:t1 - t0]
            dz = rows.grad_block_(tile, local_c, shift, ent, g.contiguous(), g_ent.contiguous(), temp, out=out)
            del tile
            _add_grad_hidden_(grad_h[t0:t1], dz, weight)
            _grad_weight_block_(grad_w, dz, h, accumulate=True)
            del dz
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # In place: no second fp32 dW (a second backward through the graph then fails loudly on the
        # saved tensors' version check instead of computing with scaled values).
        return (grad_h.mul_(grad_loss).to(h_dtype), grad_w.mul_(grad_loss).to(w_dtype),
                None, None, None, None, None, None)


def fused_linear_loss(hidden, weight, targets, chunk_loss, temperature=1.0, *, backend="auto",
                      ignore_index=-100, chunk_size=None):
    """A loss over the tokens' log-probs and entropies, with its gradient formed in the forward pass
    (6*T*H*V FLOPs instead of the 8 of fused_linear_logprob + backward). chunk_loss(t0, t1, logp,
    entropy) returns the loss of tokens t0..t1 from their fp32 [t1 - t0] log-probs and entropies
    (differentiable); the total loss must be the sum over chunks (a fixed weighting of per-token
    terms, as every policy_loss aggregation is). Returns (loss, logp, entropy), the last two
    detached. Memory: one [chunk x V] fp32 tile, plus dH and an fp32 dW held from the forward on."""
    _check_inputs(hidden, weight, targets, temperature, ignore_index)
    rows = _pick_rows(backend, hidden.device)
    V = weight.shape[0]
    kind = _budget_kind(hidden.device)
    chunk = int(chunk_size) if chunk_size else max(1, min(MAX_CHUNK_TOKENS[kind], TILE_BYTES[kind] // (4 * V)))
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    return _LinearLossOnePass.apply(hidden, weight, targets, 1.0 / float(temperature), int(ignore_index),
                                    chunk, rows, chunk_loss)


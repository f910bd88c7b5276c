"""Clipped policy-gradient loss (PPO / GRPO / DAPO clip-higher / Dr.GRPO) over packed tokens.

Every input is per token, [T] (sequences packed without padding). The heavy part of the op is
computing logp, done by fused_linear_logprob; this part is O(T) elementwise work in torch
(autograd fuses nothing here, but it is < 0.1% of the step's FLOPs).

Per token, with r = exp(logp - old_logp):
    pg  = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    pg  = min(pg, -A clip_ratio_c)   where A < 0 (dual-clip, Ye et al. 2020, verl's default 3:
          a token whose ratio ran far above 1 under a negative advantage stops pushing; off at 0)
    kl  = k1: logp - ref_logp      k3 (= low_var_kl): exp(ref - logp) - (ref - logp) - 1
    loss_t = pg + kl_coef * kl - entropy_coef * entropy
Aggregations (normalisers are global, so the gradient does not depend on how the batch is split):
    "token-mean":               sum(mask * loss_t) / global_tokens
    "seq-mean-token-mean":      sum over sequences of (seq's masked token mean) / global_seqs
    "seq-mean-token-sum-norm":  sum(mask * loss_t) / norm   (Dr.GRPO: a constant, e.g. max_len * n_seqs)
"""
import torch

from .linear_logprob import fused_linear_logprob, fused_linear_loss

LOG_RATIO_CLAMP = 20.0  # as in verl: exp(+-20) stays finite in fp32; such tokens are clipped anyway
KL_CLAMP = 10.0         # verl's low_var_kl bound on the k3 estimate

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def kl_penalty(logp, ref_logp, estimator):
    """Per-token KL(pi || ref) estimate from sampled tokens."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator in ("k3", "low_var_kl"):
        log_ratio = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (torch.exp(log_ratio) - log_ratio - 1).clamp(-KL_CLAMP, KL_CLAMP)
    raise ValueError(f"kl estimator must be 'k1', 'k3' or 'low_var_kl', got {estimator!r}")


def _check(logp, named):
    if logp.dim() != 1:
        raise ValueError(f"logp must be [T], got shape {tuple(logp.shape)}")
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor")
        if t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(logp.shape)} like logp")
        if t.device != logp.device:
            raise ValueError(f"{name} is on {t.device} but logp is on {logp.device}")


def _validate(logp, old_logp, advantages, mask, clip_low, clip_high, ref_logp, kl_coef, entropy, entropy_coef,
              aggregation, seq_ids, clip_ratio_c=0.0):
    _check(logp, dict(old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
                      entropy=entropy, seq_ids=seq_ids))
    if clip_high is None:
        clip_high = clip_low
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if clip_ratio_c and not clip_ratio_c > 1:
        raise ValueError(f"clip_ratio_c must be > 1 (or 0: no dual-clip), got {clip_ratio_c}")
    if kl_coef and ref_logp is None:
        raise ValueError("kl_coef is set but ref_logp is None")
    if entropy_coef and entropy is None:
        raise ValueError("entropy_coef is set but entropy is None")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if seq_ids is not None and seq_ids.dtype != torch.int64:
        raise TypeError(f"seq_ids must be int64, got {seq_ids.dtype}")
    if aggregation == "seq-mean-token-mean" and seq_ids is None:
        raise ValueError("aggregation='seq-mean-token-mean' needs seq_ids [T] (sequence index per token)")
    return clip_high


def _per_token_loss(logp, old_logp, advantages, clip_low, clip_high, ref_logp, kl_coef, kl_estimator,
                    entropy, entropy_coef, clip_ratio_c=0.0):
    """loss_t before masking and aggregation, and the per-token stats (module doc)."""
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(pg_unclipped, pg_clipped)
    stats = {"ratio": ratio.detach(), "clipped": (pg_clipped > pg_unclipped).detach()}
    if clip_ratio_c:
        dual_clipped = (advantages < 0) & (per_token > -advantages * clip_ratio_c)
        per_token = torch.where(dual_clipped, -advantages * clip_ratio_c, per_token)
        stats["dual_clipped"] = dual_clipped.detach()
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        stats["kl"] = kl.detach()
        if kl_coef:
            per_token = per_token + kl_coef * kl
    if entropy is not None and entropy_coef:
        per_token = per_token - entropy_coef * entropy
    return per_token, stats


def _logging_stats(stats, mask, entropy):
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        stats["clip_frac"] = (stats["clipped"].to(mask.dtype) * mask).sum() / n
        if "dual_clipped" in stats:
            stats["dual_clip_frac"] = (stats["dual_clipped"].to(mask.dtype) * mask).sum() / n
        stats["ratio_mean"] = (stats["ratio"] * mask).sum() / n
        if "kl" in stats:
            stats["kl_mean"] = (stats["kl"] * mask).sum() / n
        if entropy is not None:
            stats["entropy_mean"] = (entropy * mask).sum() / n
    return stats


def policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=None, clip_ratio_c=0.0,
                ref_logp=None, kl_coef=0.0, kl_estimator="low_var_kl",
                entropy=None, entropy_coef=0.0,
                aggregation="token-mean", global_tokens=None,
                seq_ids=None, global_seqs=None, norm=None):
    """Returns (loss, stats). stats holds detached per-token tensors "ratio", "clipped",
    "dual_clipped" (when clip_ratio_c is set), "kl" (when ref_logp is given) and masked means
    "clip_frac", "dual_clip_frac", "ratio_mean", "kl_mean", "entropy_mean" over the
    local tokens (for logging). global_tokens / global_seqs default to the local counts; pass the
    counts over all ranks and micro-batches to make the loss split-invariant."""
    clip_high = _validate(logp, old_logp, advantages, mask, clip_low, clip_high, ref_logp, kl_coef, entropy,
                          entropy_coef, aggregation, seq_ids, clip_ratio_c)
    mask = mask.to(logp.dtype)
    per_token, stats = _per_token_loss(logp, old_logp, advantages, clip_low, clip_high, ref_logp, kl_coef,
                                       kl_estimator, entropy, entropy_coef, clip_ratio_c)
    masked = per_token * mask
    if aggregation == "token-mean":
        denom = mask.sum() if global_tokens is None else global_tokens
        loss = masked.sum() / max(float(denom), 1.0)
    elif aggregation == "seq-mean-token-mean":
        n_seqs = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
        seq_sum = masked.new_zeros(n_seqs).index_add_(0, seq_ids, masked)
        seq_len = mask.new_zeros(n_seqs).index_add_(0, seq_ids, mask)
        seq_mean = seq_sum / seq_len.clamp(min=1.0)  # a fully masked sequence contributes 0
        loss = seq_mean.sum() / max(float(n_seqs if global_seqs is None else global_seqs), 1.0)
    else:
        loss = masked.sum() / _dr_grpo_norm(norm)
    return loss, _logging_stats(stats, mask, entropy)


def _dr_grpo_norm(norm):
    if norm is None or not norm > 0:
        raise ValueError("aggregation='seq-mean-token-sum-norm' needs a positive constant norm")
    return float(norm)


def token_weights(mask, aggregation="token-mean", global_tokens=None, seq_ids=None, global_seqs=None, norm=None):
    """w [T] such that policy_loss's loss = sum(w * loss_t): every aggregation is a fixed weighting of
    the tokens, known before any log-prob is (what lets the one-pass op form gradients chunk by chunk)."""
    mask = mask.float()
    if aggregation == "token-mean":
        return mask / max(float(mask.sum() if global_tokens is None else global_tokens), 1.0)
    if aggregation == "seq-mean-token-mean":
        n_seqs = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
        seq_len = mask.new_zeros(n_seqs).index_add_(0, seq_ids, mask).clamp(min=1.0)
        return mask / seq_len[seq_ids] / max(float(n_seqs if global_seqs is None else global_seqs), 1.0)
    return mask / _dr_grpo_norm(norm)


def linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask, *, temperature=1.0,
                       backend="auto", chunk_size=None, one_pass=False, clip_low=0.2, clip_high=None,
                       clip_ratio_c=0.0, ref_logp=None, kl_coef=0.0, kl_estimator="low_var_kl", entropy_coef=0.0,
                       aggregation="token-mean", global_tokens=None, seq_ids=None, global_seqs=None, norm=None):
    """policy_loss on log-probs computed straight from hidden states (fused_linear_logprob): the
    [T x V] logits never exist. The entropy comes from the same pass at no extra matmul; it enters
    the loss only through entropy_coef. Returns (loss, stats) with stats["logp"] and
    stats["entropy"] added.

    one_pass=True computes the loss's gradient inside the forward, one chunk of tokens over the
    whole vocabulary at a time (the loss is a fixed weighting of per-token terms, token_weights):
    3 matmuls per tile instead of 4 (6*T*H*V FLOPs, not 8), as Liger's fused linear cross-entropy
    does. The backward then only scales the stored gradients. Same loss and gradients up to fp32
    rounding. With one_pass, old_logp=None means the log-probs themselves, detached (one optimizer
    step per batch: ratio 1, the plain policy gradient), which the two-pass caller passes as
    logp.detach()."""
    loss_kwargs = dict(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, ref_logp=ref_logp,
                       kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef, aggregation=aggregation,
                       global_tokens=global_tokens, seq_ids=seq_ids, global_seqs=global_seqs, norm=norm)
    if not one_pass:
        logp, entropy = fused_linear_logprob(hidden, weight, targets, temperature, return_entropy=True,
                                             backend=backend, chunk_size=chunk_size)
        loss, stats = policy_loss(logp, old_logp, advantages, mask, entropy=entropy, **loss_kwargs)
    else:
        clip_high = _validate(targets, old_logp, advantages, mask, clip_low, clip_high, ref_logp, kl_coef,
                              None, 0.0, aggregation, seq_ids, clip_ratio_c)
        w = token_weights(mask, aggregation, global_tokens, seq_ids, global_seqs, norm)

        def chunk_loss(t0, t1, logp_c, entropy_c):
            sl = slice(t0, t1)
            old_c = logp_c.detach() if old_logp is None else old_logp[sl]
            per_token, _ = _per_token_loss(logp_c, old_c, advantages[sl], clip_low, clip_high,
                                           None if ref_logp is None else ref_logp[sl], kl_coef, kl_estimator,
                                           entropy_c, entropy_coef, clip_ratio_c)
            return (per_token * w[sl]).sum()

        loss, logp, entropy = fused_linear_loss(hidden, weight, targets, chunk_loss, temperature,
                                                backend=backend, chunk_size=chunk_size)
        _, stats = _per_token_loss(logp, logp if old_logp is None else old_logp, advantages, clip_low, clip_high,
                                   ref_logp, kl_coef, kl_estimator, entropy, entropy_coef, clip_ratio_c)
        stats = _logging_stats(stats, mask.to(logp.dtype), entropy)
    stats["logp"], stats["entropy"] = logp.detach(), entropy.detach()
    return loss, stats

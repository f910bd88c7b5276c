"""policy_loss against the PPO/GRPO formulas written out here in float64, token by token.

Tolerance: 1e-6 absolute (fp32 inputs; the reference is the same formula in float64).
"""
import math

import pytest
import torch

from rci_fast.kernels import fused_linear_logprob, linear_policy_loss, policy_loss

TOL = dict(atol=1e-6, rtol=1e-6)


def written_out(logp, old, adv, mask, seq_ids, clip_low, clip_high, ref=None, kl_coef=0.0, kl="k3",
                entropy=None, entropy_coef=0.0, aggregation="token-mean", global_tokens=None,
                global_seqs=None, norm=None, clip_ratio_c=0.0):
    """The loss as a plain Python loop over tokens, in float64."""
    per_token, clipped = [], []
    for t in range(len(logp)):
        lr = max(-20.0, min(20.0, float(logp[t] - old[t])))
        r = math.exp(lr)
        a = float(adv[t])
        unclipped, clip_term = -a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high)
        loss_t = max(unclipped, clip_term)
        clipped.append(clip_term > unclipped)
        if clip_ratio_c and a < 0:  # dual-clip
            loss_t = min(loss_t, -a * clip_ratio_c)
        if ref is not None and kl_coef:
            if kl == "k1":
                loss_t += kl_coef * float(logp[t] - ref[t])
            else:
                d = max(-20.0, min(20.0, float(ref[t] - logp[t])))
                loss_t += kl_coef * max(-10.0, min(10.0, math.exp(d) - d - 1))
        if entropy is not None and entropy_coef:
            loss_t -= entropy_coef * float(entropy[t])
        per_token.append(loss_t * float(mask[t]))
    if aggregation == "token-mean":
        n = float(mask.sum()) if global_tokens is None else global_tokens
        return sum(per_token) / max(n, 1.0), clipped
    if aggregation == "seq-mean-token-mean":
        n_seqs = int(seq_ids.max()) + 1
        total = 0.0
        for s in range(n_seqs):
            idx = [t for t in range(len(logp)) if seq_ids[t] == s]
            count = sum(float(mask[t]) for t in idx)
            total += sum(per_token[t] for t in idx) / count if count else 0.0
        return total / (n_seqs if global_seqs is None else global_seqs), clipped
    return sum(per_token) / norm, clipped


def make_batch(T=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(T, generator=gen) * 5
    old = logp + torch.randn(T, generator=gen) * 0.3
    ref = logp + torch.randn(T, generator=gen) * 0.3
    adv = torch.randn(T, generator=gen)
    mask = torch.rand(T, generator=gen) > 0.2
    seq_ids = torch.sort(torch.randint(0, 5, (T,), generator=gen)).values
    entropy = torch.rand(T, generator=gen) * 3
    # Edge cases: ratio far outside the clip range both ways, zero advantage, a fully masked sequence.
    logp[0], old[0], adv[0] = -0.1, -30.0, 1.0      # ratio e^20 (clamped), positive advantage: clipped
    logp[1], old[1], adv[1] = -0.1, -30.0, -1.0     # same ratio, negative advantage: unclipped, huge
    logp[5], old[5], adv[5] = -1.0, -1.0 - math.log(3.0), -1.0  # ratio 3, negative advantage: unclipped
    logp[2], old[2], adv[2] = -30.0, -0.1, -1.0     # ratio ~ e^-20, negative advantage: clipped
    adv[3] = 0.0
    ref[4] = logp[4] + 40.0                          # k3 KL far outside +-20 in log space: clamps
    mask[seq_ids == 2] = False
    return dict(logp=logp, old=old, ref=ref, adv=adv, mask=mask, seq_ids=seq_ids, entropy=entropy)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl", ["k1", "k3", None])
@pytest.mark.parametrize("clip_high", [None, 0.28])
@pytest.mark.parametrize("clip_ratio_c", [0.0, 2.5])
def test_matches_written_out_formula(aggregation, kl, clip_high, clip_ratio_c):
    b = make_batch()
    assert (b["seq_ids"] == 2).any(), "the batch must hold a fully masked sequence"
    kw = dict(clip_low=0.2, clip_high=clip_high, aggregation=aggregation,
              ref_logp=b["ref"] if kl else None, kl_coef=0.05 if kl else 0.0, kl_estimator=kl or "k3",
              entropy=b["entropy"], entropy_coef=0.01, seq_ids=b["seq_ids"],
              norm=64.0 if aggregation == "seq-mean-token-sum-norm" else None, clip_ratio_c=clip_ratio_c)
    logp = b["logp"].clone().requires_grad_()
    loss, stats = policy_loss(logp, b["old"], b["adv"], b["mask"], **kw)

    logp64 = b["logp"].double().requires_grad_()
    want, clipped = written_out(logp64.detach(), b["old"].double(), b["adv"].double(), b["mask"],
                                b["seq_ids"], 0.2, 0.2 if clip_high is None else clip_high,
                                b["ref"].double() if kl else None, 0.05 if kl else 0.0, kl or "k3",
                                b["entropy"].double(), 0.01, aggregation, norm=64.0, clip_ratio_c=clip_ratio_c)
    torch.testing.assert_close(loss.double(), torch.tensor(want, dtype=torch.float64), **TOL)
    if clip_ratio_c:  # ratios e^20 and 3 under negative advantages
        assert stats["dual_clipped"][1] and stats["dual_clipped"][5] and not stats["dual_clipped"][0]
    assert stats["clipped"].tolist() == clipped
    assert stats["clipped"][0] and not stats["clipped"][1] and stats["clipped"][2]
    m = b["mask"].double()
    torch.testing.assert_close(stats["clip_frac"].double(), (torch.tensor(clipped).double() * m).sum() / m.sum(), **TOL)

    # Gradient by finite differences of the written-out formula, on a few tokens.
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    for t in (0, 2, 5, 9, 17):
        eps = 1e-4
        hi, lo = b["logp"].double().clone(), b["logp"].double().clone()
        hi[t] += eps
        lo[t] -= eps
        args = (b["old"].double(), b["adv"].double(), b["mask"], b["seq_ids"], 0.2,
                0.2 if clip_high is None else clip_high, b["ref"].double() if kl else None,
                0.05 if kl else 0.0, kl or "k3", b["entropy"].double(), 0.01, aggregation)
        fd = (written_out(hi, *args, norm=64.0, clip_ratio_c=clip_ratio_c)[0]
              - written_out(lo, *args, norm=64.0, clip_ratio_c=clip_ratio_c)[0]) / (2 * eps)
        assert abs(logp.grad[t].item() - fd) < 1e-4, (t, logp.grad[t].item(), fd)


def test_edge_cases_gradients():
    b = make_batch()
    assert b["mask"][:6].all()
    logp = b["logp"].clone().requires_grad_()
    loss, _ = policy_loss(logp, b["old"], b["adv"], b["mask"])
    loss.backward()
    n = b["mask"].sum().item()
    assert logp.grad[0] == 0                          # clipped: no gradient
    assert logp.grad[2] == 0
    assert logp.grad[1] == 0                          # log-ratio clamped at 20 (as verl): no gradient
    torch.testing.assert_close(logp.grad[5], torch.tensor(3.0 / n), rtol=1e-5, atol=0)  # -A r / n, r = 3
    assert logp.grad[3] == 0                          # zero advantage, no KL: no gradient
    assert (logp.grad[~b["mask"]] == 0).all()        # masked tokens, the fully masked sequence too
    logp.grad = None
    policy_loss(logp, b["old"], b["adv"], b["mask"], clip_ratio_c=2.5)[0].backward()
    assert logp.grad[5] == 0                          # dual-clipped: ratio 3 > 2.5 under A < 0


def test_global_normalisers_make_the_loss_split_invariant():
    """Two micro-batches with the global token count sum to the loss of the whole batch."""
    b = make_batch(T=60, seed=4)
    kw = dict(ref_logp=b["ref"], kl_coef=0.001, kl_estimator="low_var_kl")
    whole, _ = policy_loss(b["logp"], b["old"], b["adv"], b["mask"], **kw)
    n = b["mask"].sum()
    parts = 0.0
    for sl in (slice(0, 23), slice(23, 60)):
        part_kw = dict(ref_logp=b["ref"][sl], kl_coef=0.001, kl_estimator="low_var_kl", global_tokens=n)
        parts = parts + policy_loss(b["logp"][sl], b["old"][sl], b["adv"][sl], b["mask"][sl], **part_kw)[0]
    torch.testing.assert_close(parts, whole, **TOL)

    seq = b["seq_ids"]
    whole_seq, _ = policy_loss(b["logp"], b["old"], b["adv"], b["mask"], aggregation="seq-mean-token-mean",
                               seq_ids=seq)
    cut = int((seq < 3).sum())  # split at a sequence border
    first, _ = policy_loss(b["logp"][:cut], b["old"][:cut], b["adv"][:cut], b["mask"][:cut],
                           aggregation="seq-mean-token-mean", seq_ids=seq[:cut], global_seqs=5)
    second, _ = policy_loss(b["logp"][cut:], b["old"][cut:], b["adv"][cut:], b["mask"][cut:],
                            aggregation="seq-mean-token-mean", seq_ids=seq[cut:] - 3, global_seqs=5)
    torch.testing.assert_close(first + second, whole_seq, **TOL)


def test_all_tokens_masked_gives_zero_loss_and_gradient():
    b = make_batch(T=8)
    logp = b["logp"].clone().requires_grad_()
    for agg, extra in (("token-mean", {}), ("seq-mean-token-mean", {"seq_ids": b["seq_ids"]}),
                       ("seq-mean-token-sum-norm", {"norm": 10.0})):
        loss, stats = policy_loss(logp, b["old"], b["adv"], torch.zeros(8, dtype=torch.bool),
                                  aggregation=agg, **extra)
        loss.backward()
        assert loss.item() == 0.0 and (logp.grad == 0).all() and stats["clip_frac"].item() == 0.0


def test_linear_policy_loss_composes_logprob_and_loss():
    gen = torch.Generator().manual_seed(1)
    T, H, V = 11, 24, 301
    hidden = torch.randn(T, H, generator=gen, requires_grad=True)
    weight = (torch.randn(V, H, generator=gen) / 4).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=gen)
    old, adv = -torch.rand(T, generator=gen) * 6, torch.randn(T, generator=gen)
    mask = torch.ones(T, dtype=torch.bool)
    loss, stats = linear_policy_loss(hidden, weight, targets, old, adv, mask, temperature=0.9,
                                     entropy_coef=0.01, clip_high=0.28)
    loss.backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp, ent = fused_linear_logprob(h2, w2, targets, 0.9, return_entropy=True)
    want, _ = policy_loss(logp, old, adv, mask, entropy=ent, entropy_coef=0.01, clip_high=0.28)
    want.backward()
    torch.testing.assert_close(loss, want, atol=0, rtol=0)
    torch.testing.assert_close(hidden.grad, h2.grad, atol=0, rtol=0)
    torch.testing.assert_close(stats["logp"], logp.detach(), atol=0, rtol=0)
    assert "entropy_mean" in stats


@pytest.mark.parametrize("bad,error,message", [
    (dict(old_logp=torch.zeros(3)), ValueError, "old_logp has shape"),
    (dict(kl_coef=0.1), ValueError, "ref_logp is None"),
    (dict(entropy_coef=0.1), ValueError, "entropy is None"),
    (dict(aggregation="mean"), ValueError, "aggregation must be"),
    (dict(aggregation="seq-mean-token-mean"), ValueError, "needs seq_ids"),
    (dict(aggregation="seq-mean-token-sum-norm"), ValueError, "positive constant norm"),
    (dict(ref_logp=torch.zeros(4), kl_coef=0.1, kl_estimator="k2"), ValueError, "kl estimator"),
    (dict(seq_ids=torch.zeros(4, dtype=torch.int32), aggregation="seq-mean-token-mean"), TypeError, "int64"),
    (dict(clip_low=1.5), ValueError, "clip_low"),
    (dict(clip_ratio_c=0.5), ValueError, "clip_ratio_c"),
])
def test_bad_input_raises_clear_error(bad, error, message):
    args = dict(logp=torch.zeros(4), old_logp=torch.zeros(4), advantages=torch.ones(4), mask=torch.ones(4))
    kw = {k: v for k, v in bad.items() if k not in args}
    args.update({k: v for k, v in bad.items() if k in args})
    with pytest.raises(error, match=message):
        policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"), **kw)


# ---- one pass: the loss's gradient formed inside the forward (6THV instead of 8THV) ----------------
# Against float64 autograd through log_softmax and the same policy_loss. Tolerances as in
# test_kernels: fp32 loss within 1e-6, gradients 1e-5 + 1e-4 x |reference|; bf16 inputs: the loss
# within 1e-5, gradients 2e-2 x max|reference| + 8e-3 x |reference| (they come back in bf16).
ONE_PASS_SHAPES = [(1, 40, 1000), (7, 72, 1237), (129, 40, 1000)]


def one_pass_case(T, H, V, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * (3.0 / H ** 0.5)).to(dtype)
    targets = torch.randint(0, V, (T,), generator=gen)
    mask = torch.rand(T, generator=gen) > 0.2
    targets[~mask & (torch.rand(T, generator=gen) > 0.5)] = -100  # some masked tokens are ignored too
    with torch.no_grad():
        logp_all = torch.log_softmax(hidden.double() @ weight.double().t() / 0.7, -1)
        logp = logp_all.gather(1, targets.clamp(min=0)[:, None]).squeeze(1).float()
    old = logp + torch.randn(T, generator=gen) * 0.3
    ref = logp + torch.randn(T, generator=gen) * 0.3
    old[0] = logp[0] + 30.0  # ratio e^-20 (clamped)
    adv = torch.randn(T, generator=gen)
    if T > 1:  # ratio e under a negative advantage: dual-clipped at clip_ratio_c 1.5
        old[1], adv[1], mask[1] = logp[1] - 1.0, -1.0, True
    seq_ids = torch.sort(torch.randint(0, 4, (T,), generator=gen)).values
    return hidden, weight, targets, old, ref, adv, mask, seq_ids


def on_backend_device(backend, *tensors):
    """Triton runs on CUDA tensors when there is a GPU, on CPU tensors under the interpreter else."""
    if backend == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            return [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors]
    return list(tensors)


def one_pass_reference(hidden, weight, targets, old, ref, adv, mask, kw):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp_all = torch.log_softmax(h @ w.t() / 0.7, -1)
    ignored = targets == -100
    logp = logp_all.gather(1, targets.clamp(min=0)[:, None]).squeeze(1).masked_fill(ignored, 0.0)
    entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(ignored, 0.0)
    loss, _ = policy_loss(logp, old.double(), adv.double(), mask, ref_logp=ref.double(), entropy=entropy, **kw)
    loss.backward()
    return loss, h.grad, w.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("T,H,V", ONE_PASS_SHAPES)
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_one_pass_matches_float64(backend, T, H, V, aggregation):
    case = one_pass_case(T, H, V, seed=T + V)
    hidden, weight, targets, old, ref, adv, mask, seq_ids = case
    kw = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=1.5, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
              aggregation=aggregation, norm=3.0 * T, global_tokens=int(mask.sum()) + 5)
    want_loss, want_gh, want_gw = one_pass_reference(hidden, weight, targets, old, ref, adv, mask,
                                                     dict(kw, seq_ids=seq_ids))
    hidden, weight, targets, old, ref, adv, mask, seq_ids = on_backend_device(backend, *case)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats = linear_policy_loss(h, w, targets, old, adv, mask, temperature=0.7, backend=backend,
                                     chunk_size=5, one_pass=True, ref_logp=ref, seq_ids=seq_ids, **kw)
    loss.backward()
    torch.testing.assert_close(loss.double().cpu(), want_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(h.grad.double().cpu(), want_gh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double().cpu(), want_gw, atol=1e-5, rtol=1e-4)
    # the logging stats are those of the two-pass op
    _, two = linear_policy_loss(hidden, weight, targets, old, adv, mask, temperature=0.7, backend=backend,
                                ref_logp=ref, seq_ids=seq_ids, **kw)
    assert T == 1 or two["dual_clip_frac"] > 0
    for key in ("logp", "entropy", "ratio", "kl", "clip_frac", "dual_clip_frac", "kl_mean", "entropy_mean"):
        torch.testing.assert_close(stats[key].float(), two[key].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_pass_bf16(backend):
    case = one_pass_case(33, 24, 1237, seed=5, dtype=torch.bfloat16)
    kw = dict(kl_coef=0.05, entropy_coef=0.02)
    want_loss, want_gh, want_gw = one_pass_reference(*case[:7], kw)
    hidden, weight, targets, old, ref, adv, mask, _ = on_backend_device(backend, *case)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = linear_policy_loss(h, w, targets, old, adv, mask, temperature=0.7, backend=backend,
                                 chunk_size=16, one_pass=True, ref_logp=ref, **kw)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double().cpu(), want_loss, atol=1e-5, rtol=0)
    for got, want in ((h.grad, want_gh), (w.grad, want_gw)):
        torch.testing.assert_close(got.double().cpu(), want, atol=2e-2 * want.abs().max().item(), rtol=8e-3)


def test_one_pass_default_chunk_and_upstream_scale():
    """The default chunk (one fp32 tile over the whole vocabulary per chunk) and a non-unit upstream
    gradient, which the backward applies to the stored gradients."""
    hidden, weight, targets, old, ref, adv, mask, _ = one_pass_case(50, 16, 300, seed=9)
    outs = []
    for one_pass in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = linear_policy_loss(h, w, targets, old, adv, mask, temperature=0.7, one_pass=one_pass)
        (3.0 * loss).backward()
        outs.append((loss, h.grad, w.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_one_pass_second_backward_fails_loudly():
    """The backward scales the stored gradients in place: a second backward through the same graph
    must raise (autograd's version check), never return scaled-twice gradients."""
    hidden, weight, targets, old, _, adv, mask, _ = one_pass_case(9, 16, 300, seed=2)
    h = hidden.clone().requires_grad_()
    loss, _ = linear_policy_loss(h, weight, targets, old, adv, mask, one_pass=True)
    (2.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

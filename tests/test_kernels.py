"""fused_linear_logprob (torch path and Triton path) against a float64 reference.

Without a GPU the Triton kernels run in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1). Tolerances, absolute unless said otherwise:
  fp32 inputs: logp within 1e-5 (the issue's bar); entropy within 1e-5 + 1e-5 x entropy (a sum of V
    fp32 terms p log p, up to log V ~ 11 in size); gradients within 1e-5 + 1e-4 x |reference|.
  bf16 inputs: the reference gets the same bf16-valued inputs in float64. Logits are formed in fp32
    from them, so logp and entropy keep the fp32 bounds; gradients are returned in bf16 (rounding
    2^-9 relative), so within 8e-3 x |reference| + 4e-3 x max|reference| on CPU; on CUDA d/dlogits
    is also rounded to bf16 for the tensor-core matmuls: 2e-2 x max|reference|.
On a GPU machine the Triton backend runs on CUDA tensors instead of the interpreter.
"""
import os
import subprocess
import sys

import pytest
import torch

from rci_fast.kernels import fused_linear_logprob
from rci_fast.kernels import linear_logprob, logprob_rows_torch
from rci_fast.kernels.linear_logprob import merge_block_stats

BACKENDS = ["torch", "triton"]
FP32_TOL = dict(atol=1e-5, rtol=0.0)
FP32_ENTROPY_TOL = dict(atol=1e-5, rtol=1e-5)
FP32_GRAD_TOL = dict(atol=1e-5, rtol=1e-4)
BF16_GRAD_TOL = dict(rtol=8e-3, max_frac=4e-3 if not torch.cuda.is_available() else 2e-2)


def _needs_triton(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no GPU and TRITON_INTERPRET is not set")


def make_inputs(T, H, V, dtype=torch.float32, scale=1.0, seed=0, n_ignored=0):
    """Logits have standard deviation about `scale` (larger scale: peakier, lower-entropy rows)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * (scale / H ** 0.5)
    targets = torch.randint(0, V, (T,), generator=gen)
    if n_ignored:
        targets[torch.randperm(T, generator=gen)[:n_ignored]] = -100
    return hidden.to(dtype), weight.to(dtype), targets, gen


def reference(hidden, weight, targets, temperature, g_logp, g_ent):
    """float64 logp, entropy, d/dhidden, d/dweight of sum(g_logp * logp + g_ent * entropy)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp_all = torch.log_softmax(h @ w.t() / temperature, dim=-1)
    ignored = targets == -100
    logp = logp_all.gather(1, targets.clamp(min=0)[:, None]).squeeze(1).masked_fill(ignored, 0.0)
    entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(ignored, 0.0)
    (g_logp.double() * logp + g_ent.double() * entropy).sum().backward()
    return logp, entropy, h.grad, w.grad


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def run(hidden, weight, targets, temperature, g_logp, g_ent, backend, **kw):
    """fused_linear_logprob forward + backward on the backend's device; results come back on CPU."""
    dev = device_for(backend)
    h = hidden.detach().to(dev).requires_grad_()
    w = weight.detach().to(dev).requires_grad_()
    logp, entropy = fused_linear_logprob(h, w, targets.to(dev), temperature, return_entropy=True,
                                         backend=backend, **kw)
    (g_logp.to(dev) * logp + g_ent.to(dev) * entropy).sum().backward()
    return logp.cpu(), entropy.cpu(), h.grad.cpu(), w.grad.cpu()


def check_fp32(got, want):
    logp, entropy, gh, gw = got
    r_logp, r_entropy, r_gh, r_gw = want
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    torch.testing.assert_close(logp.double(), r_logp, **FP32_TOL)
    torch.testing.assert_close(entropy.double(), r_entropy, **FP32_ENTROPY_TOL)
    torch.testing.assert_close(gh.double(), r_gh, **FP32_GRAD_TOL)
    torch.testing.assert_close(gw.double(), r_gw, **FP32_GRAD_TOL)


# (T, H, V): one token, odd T, T > one chunk; V = 1000 (inside one 1024-wide kernel step), 50257
# (GPT-2: 13 kernel steps of 4096, the last partial), 1237 (prime: a multiple of no block size);
# H never a multiple of 128.
SHAPES = [(1, 40, 1000), (7, 72, 1237), (129, 40, 1000), (7, 24, 50257)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,H,V", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("tile", [(5, 384), (None, None)], ids=["tiled", "default_tile"])
def test_fp32_matches_float64(backend, T, H, V, temperature, tile):
    _needs_triton(backend)
    hidden, weight, targets, gen = make_inputs(T, H, V, scale=3.0, seed=T * V)
    g_logp, g_ent = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    # "tiled": 5-token chunks split T = 7 and 129 unevenly; vocab blocks of 384 (25000 for V = 50257,
    # fewer launches for the interpreter) end in a partial block for every V here. The default tile
    # is one chunk and one vocab block at these sizes.
    chunk, block = tile[0], tile[1] and (tile[1] if V < 5000 else 25000)
    got = run(hidden, weight, targets, temperature, g_logp, g_ent, backend, chunk_size=chunk, vocab_block=block)
    check_fp32(got, reference(hidden, weight, targets, temperature, g_logp, g_ent))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_many_tokens_large_vocab(backend):
    _needs_triton(backend)
    T, H, V = 129, 72, 50257
    hidden, weight, targets, gen = make_inputs(T, H, V, scale=4.0, seed=3, n_ignored=9)
    g_logp, g_ent = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    got = run(hidden, weight, targets, 0.9, g_logp, g_ent, backend, chunk_size=64, vocab_block=20000)
    check_fp32(got, reference(hidden, weight, targets, 0.9, g_logp, g_ent))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,H,V", [(1, 40, 1000), (7, 72, 1237), (33, 24, 50257)])
def test_bf16_matches_float64(backend, T, H, V):
    _needs_triton(backend)
    hidden, weight, targets, gen = make_inputs(T, H, V, dtype=torch.bfloat16, scale=3.0, seed=V)
    g_logp, g_ent = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    logp, entropy, gh, gw = run(hidden, weight, targets, 0.8, g_logp, g_ent, backend, chunk_size=16,
                                 vocab_block=min(V - 1, 20000))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16 and logp.dtype == torch.float32
    r_logp, r_entropy, r_gh, r_gw = reference(hidden, weight, targets, 0.8, g_logp, g_ent)
    torch.testing.assert_close(logp.double(), r_logp, **FP32_TOL)
    torch.testing.assert_close(entropy.double(), r_entropy, **FP32_ENTROPY_TOL)
    for got, want in ((gh, r_gh), (gw, r_gw)):
        atol = BF16_GRAD_TOL["max_frac"] * want.abs().max().item()
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=BF16_GRAD_TOL["rtol"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_tokens_have_zero_logp_entropy_and_gradient(backend):
    _needs_triton(backend)
    T, H, V = 9, 40, 1000
    hidden, weight, targets, gen = make_inputs(T, H, V, seed=5, n_ignored=4)
    ignored = targets == -100
    g_logp, g_ent = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    got = run(hidden, weight, targets, 1.3, g_logp, g_ent, backend, chunk_size=4, vocab_block=300)
    check_fp32(got, reference(hidden, weight, targets, 1.3, g_logp, g_ent))
    logp, entropy, gh, _ = got
    assert ignored.sum() == 4
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all() and (gh[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logp_only_backward(backend):
    """Entropy not requested: its gradient is None inside the backward and must count as zero."""
    _needs_triton(backend)
    hidden, weight, targets, gen = make_inputs(7, 40, 1237, seed=11)
    dev = device_for(backend)
    h, w = hidden.to(dev).requires_grad_(), weight.to(dev).requires_grad_()
    logp = fused_linear_logprob(h, w, targets.to(dev), backend=backend)
    assert logp.shape == (7,)
    g = torch.randn(7, generator=gen)
    (g.to(dev) * logp).sum().backward()
    _, _, r_gh, r_gw = reference(hidden, weight, targets, 1.0, g, torch.zeros(7))
    torch.testing.assert_close(h.grad.cpu().double(), r_gh, **FP32_GRAD_TOL)
    torch.testing.assert_close(w.grad.cpu().double(), r_gw, **FP32_GRAD_TOL)


def test_gradient_only_for_inputs_that_require_it():
    hidden, weight, targets, _ = make_inputs(5, 40, 1000)
    w = weight.clone().requires_grad_()
    fused_linear_logprob(hidden, w, targets, backend="torch").sum().backward()
    _, _, _, r_gw = reference(hidden, weight, targets, 1.0, torch.ones(5), torch.zeros(5))
    torch.testing.assert_close(w.grad.double(), r_gw, **FP32_GRAD_TOL)


def test_triton_rows_with_many_partial_steps():
    """Row kernels alone on hand-made tiles: 1000 columns in 256-wide steps (the last 232 wide), local
    targets outside the tile, and rows of large negative logits, where a column past the tile's end
    read as 0 instead of -inf would dominate the sum."""
    backend = "triton"
    _needs_triton(backend)
    from rci_fast.kernels import logprob_rows_triton
    gen = torch.Generator().manual_seed(7)
    C, Vb, dev = 6, 1000, device_for(backend)
    logits = torch.randn(C, Vb, generator=gen) * 4
    logits[3:] -= 60.0
    local = torch.randint(0, Vb, (C,), generator=gen)
    local[1], local[4] = -1, Vb + 3  # target in no block / in a later block
    g, g_ent = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
    want = logprob_rows_torch.block_stats(logits.clone().double(), local, 0.5)
    lse, entropy = (x.float() for x in merge_block_stats(*(x[None] for x in want[:3])))
    want_dz = logprob_rows_torch.grad_block_(logits.clone().double(), local, lse.double(),
                                             entropy.double(), g.double(), g_ent.double(), 0.5)
    on_dev = (lambda *xs: [x.to(dev) for x in xs])
    for block_v in (256, 1024):
        got = logprob_rows_triton.block_stats(*on_dev(logits, local), 0.5, block_v=block_v)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu().double(), b, atol=2e-5, rtol=1e-5)
        assert got[3][1] == 0 and got[3][4] == 0
        got_dz = logprob_rows_triton.grad_block_(*on_dev(logits.clone(), local, lse, entropy, g, g_ent),
                                                 0.5, block_v=block_v)
        torch.testing.assert_close(got_dz.cpu().double(), want_dz, atol=1e-6, rtol=1e-5)
        # Written to a separate bf16 buffer (what the tensor-core backward uses): one bf16 rounding
        # of the same values, within 2^-7 relative (the interpreter truncates; a GPU rounds, 2^-8);
        # the input tile is left as it was.
        tile = logits.clone().to(dev)
        out = torch.full((C, Vb), float("nan"), dtype=torch.bfloat16, device=dev)
        got_low = logprob_rows_triton.grad_block_(tile, *on_dev(local, lse, entropy, g, g_ent), 0.5,
                                                  out=out, block_v=block_v)
        assert got_low is out and torch.equal(tile.cpu(), logits)
        torch.testing.assert_close(out.cpu().double(), want_dz, atol=1e-6, rtol=2 ** -7)


def test_block_merge_equals_one_block():
    """Stats of a row split into vocab blocks merge to those of the whole row."""
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(5, 999, generator=gen, dtype=torch.float64) * 6
    local = torch.tensor([0, 998, 500, -1, 333])
    whole = logprob_rows_torch.block_stats(logits.clone(), local, 1.0)
    parts = [logprob_rows_torch.block_stats(logits[:, v0:v0 + 400].clone(), local - v0 * (local >= 0), 1.0)
             for v0 in (0, 400, 800)]
    stacked = [torch.stack([p[i] for p in parts]) for i in range(4)]
    for got, want in zip(merge_block_stats(*stacked[:3]), merge_block_stats(*(x[None] for x in whole[:3]))):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(stacked[3].sum(0), whole[3], atol=0, rtol=0)
    want_lse = torch.logsumexp(logits, 1)
    torch.testing.assert_close(merge_block_stats(*stacked[:3])[0], want_lse, atol=1e-12, rtol=1e-12)


def test_chunking_does_not_change_the_result():
    hidden, weight, targets, _ = make_inputs(37, 40, 1237, seed=2)
    whole = fused_linear_logprob(hidden, weight, targets, backend="torch", chunk_size=37, vocab_block=1237)
    for chunk, block in ((1, 1237), (10, 1237), (37, 1), (10, 129), (4, 1000)):
        got = fused_linear_logprob(hidden, weight, targets, backend="torch", chunk_size=chunk, vocab_block=block)
        torch.testing.assert_close(got, whole, atol=2e-6, rtol=0)


def test_never_saves_full_logits_for_backward():
    """Memory contract: nothing of T x V size is kept between forward and backward."""
    T, H, V = 64, 16, 3000
    hidden, weight, targets, _ = make_inputs(T, H, V)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        logp, entropy = fused_linear_logprob(h, w, targets, return_entropy=True, backend="torch",
                                             chunk_size=16, vocab_block=1000)
    assert saved and max(saved) <= V * H < T * V
    (logp + entropy).sum().backward()
    assert h.grad is not None and w.grad is not None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kept_tile_gives_the_recomputed_results(monkeypatch, temperature):
    """All logits in one small tile on a CPU: the forward keeps it and the backward skips the
    recomputation. Same values to the bit as recomputing, a second backward (retain_graph)
    recomputes, and a budget below T x V keeps nothing."""
    hidden, weight, targets, gen = make_inputs(37, 40, 1237, seed=5)
    g_logp, g_ent = torch.randn(37, generator=gen), torch.randn(37, generator=gen)

    tiles = []  # the logits tiles computed: kept, the backward computes none
    real_tile = linear_logprob._logits_tile
    monkeypatch.setattr(linear_logprob, "_logits_tile", lambda *a: tiles.append(1) or real_tile(*a))

    def forward_backward(twice=False):
        tiles.clear()
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            logp, entropy = fused_linear_logprob(h, w, targets, temperature, return_entropy=True, backend="torch")
        loss = (g_logp * logp + g_ent * entropy).sum()
        loss.backward(retain_graph=twice)
        first = (logp.detach(), entropy.detach(), h.grad.clone(), w.grad.clone())
        if twice:
            h.grad = w.grad = None
            loss.backward()
            assert torch.equal(h.grad, first[2]) and torch.equal(w.grad, first[3])
        return first + (len(tiles),), max(saved)

    kept, _ = forward_backward()
    assert kept[-1] == 1  # one tile in the forward, none in the backward
    assert forward_backward(twice=True)[0][-1] == 2  # the second backward recomputes its tile
    monkeypatch.setitem(linear_logprob.KEEP_TILE_BYTES, "cpu", 4 * 37 * 1237 - 1)
    recomputed, largest_saved = forward_backward()
    assert largest_saved <= 1237 * 40 and recomputed[-1] == 2  # over the budget: nothing of T x V size
    assert all(torch.equal(a, b) for a, b in zip(kept[:4], recomputed[:4]))


def test_zero_tokens():
    hidden, weight, targets, _ = make_inputs(0, 8, 50)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = fused_linear_logprob(h, w, targets, return_entropy=True)
    assert logp.shape == (0,) and entropy.shape == (0,)
    (logp.sum() + entropy.sum()).backward()
    assert h.grad.shape == (0, 8) and w.grad.shape == (50, 8) and (w.grad == 0).all()


def test_auto_backend_on_cpu_is_the_torch_path():
    hidden, weight, targets, _ = make_inputs(5, 16, 300)
    torch.testing.assert_close(fused_linear_logprob(hidden, weight, targets),
                               fused_linear_logprob(hidden, weight, targets, backend="torch"), atol=0, rtol=0)


@pytest.mark.parametrize("case,error,message", [
    ("hidden_3d", ValueError, "hidden must be"),
    ("weight_1d", ValueError, "weight must be"),
    ("hidden_size", ValueError, "hidden size mismatch"),
    ("targets_len", ValueError, "targets has"),
    ("targets_2d", ValueError, "targets must be"),
    ("int32_targets", TypeError, "int64"),
    ("dtype_mismatch", TypeError, "differs"),
    ("int_hidden", TypeError, "float32, bfloat16"),
    ("target_too_big", ValueError, "out of range"),
    ("target_negative", ValueError, "out of range"),
    ("device_mismatch", ValueError, "different devices"),
    ("zero_temperature", ValueError, "temperature"),
    ("bad_backend", ValueError, "backend"),
])
def test_bad_input_raises_clear_error(case, error, message):
    hidden, weight, targets, _ = make_inputs(4, 8, 50)
    kw = {}
    if case == "hidden_3d":
        hidden = hidden[None]
    elif case == "weight_1d":
        weight = weight[0]
    elif case == "hidden_size":
        weight = weight[:, :7]
    elif case == "targets_len":
        targets = targets[:3]
    elif case == "targets_2d":
        targets = targets[:, None]
    elif case == "int32_targets":
        targets = targets.int()
    elif case == "dtype_mismatch":
        weight = weight.double()
    elif case == "int_hidden":
        hidden, weight = hidden.long(), weight.long()
    elif case == "target_too_big":
        targets[2] = 50
    elif case == "target_negative":
        targets[0] = -1
    elif case == "device_mismatch":
        weight = weight.to("meta")
    elif case == "zero_temperature":
        kw["temperature"] = 0.0
    elif case == "bad_backend":
        kw["backend"] = "cuda"
    with pytest.raises(error, match=message):
        fused_linear_logprob(hidden, weight, targets, **kw)


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, targets, _ = make_inputs(4, 8, 50)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_linear_logprob(hidden, weight, targets, backend="triton")


def test_torch_path_works_without_triton_installed():
    """kernels/ imports triton lazily: with triton unimportable the torch path still runs, and asking
    for Triton says what is missing."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from rci_fast.kernels import fused_linear_logprob\n"
        "h, w, y = torch.randn(3, 8, requires_grad=True), torch.randn(20, 8), torch.tensor([0, 5, 19])\n"
        "fused_linear_logprob(h, w, y).sum().backward()\n"
        "assert h.grad is not None\n"
        "try:\n"
        "    fused_linear_logprob(h, w, y, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('backend=triton did not fail without triton')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr

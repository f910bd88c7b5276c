"""Fused CPU RMSNorm, SwiGLU and RoPE (rci_fast/model/cpu_kernels.cpp) against their eager torch
references, values and gradients, on odd shapes and strided inputs. Tolerances: float32
rounding of sums over at most a few hundred terms of size ~1; RoPE, which adds two products, is
the same to the bit on x86 (no FMA in either build)."""
import fcntl
import os
import platform
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from rci_fast.model import cpu_ops, native

ATOL = 1e-5


def _grads(fn, *inputs, seed=0):
    """fn's output and the gradients of a random projection of it w.r.t. every input."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * probe).sum().backward()
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("shape", [(1, 8), (37, 12), (2, 5, 48), (3, 7), (4, 1, 256), (1000, 24)])
def test_rms_norm_matches_eager(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    got, got_grads = _grads(lambda a, b: cpu_ops.rms_norm(a, b, 1e-6), x, w)
    want, want_grads = _grads(lambda a, b: cpu_ops.rms_norm_eager(a.double(), b.double(), 1e-6).float(), x, w)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=ATOL * 10, rtol=1e-5)  # dw sums over every row


@pytest.mark.parametrize("shape", [(1, 8), (37, 80), (1, 3, 13), (16385,)])
def test_silu_mul_matches_eager(shape):
    g = torch.Generator().manual_seed(2)
    gate, up = torch.randn(shape, generator=g) * 4, torch.randn(shape, generator=g)
    got, got_grads = _grads(cpu_ops.silu_mul, gate, up)
    want, want_grads = _grads(lambda a, b: (F.silu(a.double()) * b.double()).float(), gate, up)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("B,heads,T,D,cos_batch", [(2, 3, 5, 8, 2), (1, 4, 7, 12, 1), (3, 2, 4, 20, 1),
                                                     (2, 1, 1, 2, 2)])
def test_rope_matches_eager(B, heads, T, D, cos_batch):
    """x as the model has it, a transposed view of [B, T, heads, D]; positions per row or shared
    by the batch (cos [1, T, D] broadcasts); head dims with and without a vector tail."""
    from rci_fast.model.transformer import rope_cos_sin
    g = torch.Generator().manual_seed(B * T + D)
    x = torch.randn(B, T, heads, D, generator=g).transpose(1, 2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = rope_cos_sin(inv_freq, torch.randint(0, 4000, (cos_batch, T), generator=g), torch.float32)
    got, (got_grad,) = _grads(lambda a: cpu_ops.rope(a, cos, sin), x)
    want, (want_grad,) = _grads(lambda a: cpu_ops.rope_eager(a, cos, sin), x)
    assert got.stride() == want.stride()  # laid out as the eager result: what attention then reads
    exact = platform.machine() in ("x86_64", "AMD64")
    torch.testing.assert_close(got, want, atol=0 if exact else 1e-6, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=0 if exact else 1e-6, rtol=0)
    assert cpu_ops._fused(x, cos, sin)


def test_rms_norm_weight_gradient_does_not_depend_on_the_thread_count():
    """dweight sums per-block partials in a fixed order: bitwise the same on 1 or 2 threads."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(1000, 40, generator=g), torch.randn(40, generator=g)
    threads, grads = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            grads.append(_grads(lambda a, b: cpu_ops.rms_norm(a, b, 1e-6), x, w)[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_strided_inputs_and_the_eager_switch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 10, generator=g).t()  # not contiguous
    w = torch.randn(12, generator=g)
    gate, up = torch.randn(6, 40, generator=g).chunk(2, dim=-1)  # views with a row stride
    assert cpu_ops._fused(x, w)
    with cpu_ops.eager():
        assert not cpu_ops._fused(x, w)
        eager_norm, eager_act = cpu_ops.rms_norm(x, w, 1e-6), cpu_ops.silu_mul(gate, up)
    assert cpu_ops._fused(x, w)
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-6), eager_norm, atol=ATOL, rtol=0)
    torch.testing.assert_close(cpu_ops.silu_mul(gate, up), eager_act, atol=ATOL, rtol=0)
    assert not cpu_ops._fused(x.double(), w.double())  # float32 only


def test_bad_inputs_raise_clear_errors():
    assert native.available()  # registers the ops
    with pytest.raises(RuntimeError, match="weight has 5 elements for rows of 4"):
        torch.ops.rci_fast_cpu.rms_norm_forward(torch.zeros(3, 4), torch.ones(5), 1e-6)
    with pytest.raises(RuntimeError, match="must be a contiguous float32 CPU tensor"):
        torch.ops.rci_fast_cpu.swiglu_forward(torch.zeros(3, 4).t(), torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="rope shapes disagree"):
        torch.ops.rci_fast_cpu.rope_forward(torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 6), torch.zeros(1, 3, 6), False)
    with pytest.raises(RuntimeError, match="head dim contiguous"):
        torch.ops.rci_fast_cpu.rope_forward(torch.zeros(1, 2, 4, 3).transpose(2, 3), torch.zeros(1, 3, 4),
                                            torch.zeros(1, 3, 4), False)


def test_a_failed_build_falls_back_to_eager_with_a_warning(monkeypatch):
    """No compiler (or ninja): a warning says why, the model computes eagerly, the C++ decode
    step refuses with the reason."""
    from rci_fast.model import ModelConfig, Transformer
    from rci_fast.model.cpu_decode import CpuDecodeStep

    def no_compiler():
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(native, "_state", {})  # as in a fresh process
    monkeypatch.setattr(native, "_load", no_compiler)
    with pytest.warns(UserWarning, match="could not be built.*c[+][+]: command not found"):
        assert not native.available()
    assert native.error() == "RuntimeError: c++: command not found"
    x, w = torch.randn(3, 8), torch.randn(8)
    assert not cpu_ops._fused(x, w)
    assert torch.equal(cpu_ops.rms_norm(x, w, 1e-6), cpu_ops.rms_norm_eager(x, w, 1e-6))
    model = Transformer(ModelConfig("qwen2", 64, 16, 32, 1, 2, 1, 8))
    with pytest.raises(RuntimeError, match="could not be built: RuntimeError: c[+][+]: command not found"):
        CpuDecodeStep(model)


@pytest.mark.slow
def test_build_waits_for_a_live_builder_and_clears_a_dead_ones_lock(tmp_path):
    """A real build in a fresh extensions folder. While another process holds the build lock, a
    new one waits; torch's lock file left by a build killed midway (which torch alone would wait
    on forever) is removed once the build lock is free, and the build goes through."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from rci_fast.model import native\n"
            "print(native.build_directory()); sys.exit(0 if native.available() else 1)")
    folder = subprocess.run([sys.executable, "-c", "from rci_fast.model import native; print(native.build_directory())"],
                            env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert folder.startswith(str(tmp_path))
    os.makedirs(folder)
    open(os.path.join(folder, "lock"), "w").close()  # what an interrupted build leaves
    with open(folder + ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live builder
        child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        lines = []  # read until the child says it waits (an EOF first means it did not)
        while not lines or "waiting for another process" not in lines[-1]:
            lines.append(child.stderr.readline())
            assert lines[-1], "".join(lines)
        time.sleep(1)
        assert child.poll() is None  # still waiting for the live builder
        fcntl.flock(held, fcntl.LOCK_UN)
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err[-2000:]
    assert "left by a build that was interrupted" in err
    assert not os.path.exists(os.path.join(folder, "lock"))
    assert any(name.endswith(".so") for name in os.listdir(folder))


def test_rope_backward_is_the_transpose_for_any_cos_sin():
    """Unequal sin halves (not what the model builds, but rope is public): the backward is still
    the rotation's exact transpose, as autograd through the eager ops gives."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 5, 8, generator=g)
    cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    got, (got_grad,) = _grads(lambda a: cpu_ops.rope(a, cos, sin), x)
    want, (want_grad,) = _grads(lambda a: cpu_ops.rope_eager(a, cos, sin), x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=0)


def test_rope_shapes_the_kernel_does_not_take_fall_back_to_eager():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 5, 8, generator=g)
    for cos in (torch.randn(2, 1, 8, generator=g),           # broadcast over positions
                torch.randn(2, 5, 16, generator=g)[..., ::2]):  # head dim not contiguous
        sin = torch.randn(cos.shape, generator=g)
        torch.testing.assert_close(cpu_ops.rope(x, cos, sin), cpu_ops.rope_eager(x, cos, sin), atol=0, rtol=0)


# Packed causal attention. Tolerance: float32 rounding of sums over a few hundred terms of size ~1
# (scores, probabilities times values); its exp is a polynomial good to ~1 ulp.
ATTENTION_TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(params=[True, False], ids=["sgemm", "mm_out"])
def attention_gemm(request):
    """The attention's GEMMs through BLAS's sgemm_ directly, then through at::mm_out."""
    assert native.available()
    before = torch.ops.rci_fast_cpu.varlen_attention_blas(request.param)
    if request.param and not torch.ops.rci_fast_cpu.varlen_attention_blas(True):
        torch.ops.rci_fast_cpu.varlen_attention_blas(before)
        pytest.skip("this torch build's BLAS does not export sgemm_")
    yield request.param
    torch.ops.rci_fast_cpu.varlen_attention_blas(before)


def _packed_qkv(lengths, heads, kv_heads, d, seed, token_major=True):
    """q/k/v [1, heads, N, D] as the model holds them (views of a [N, heads, D] token layout), or
    contiguous per head; float64 leaves for the reference."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    if token_major:
        qkv = torch.randn(n, heads + 2 * kv_heads, d, generator=g, dtype=torch.float64)
        parts = qkv.split([heads, kv_heads, kv_heads], dim=1)
        return [p.permute(1, 0, 2).unsqueeze(0) for p in parts]
    return [torch.randn(1, h, n, d, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads)]


def _per_sequence_reference(q, k, v, cu):
    outs = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=True)
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a]
    return torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape)


@pytest.mark.parametrize("lengths,heads,kv_heads,d,token_major", [
    ([3, 17, 1, 0, 9, 16, 40], 6, 2, 8, True),   # an empty sequence, GQA 3:1
    ([65, 64, 1, 130], 4, 4, 20, True),          # across the 64-row query blocks; D with a vector tail
    ([200, 7], 3, 1, 64, False),                  # one key/value head; contiguous heads
    ([5], 2, 1, 3, True),                         # D below one vector
    ([1], 2, 2, 16, True),                        # one token
])
def test_varlen_attention_matches_each_sequence_alone(attention_gemm, lengths, heads, kv_heads, d, token_major):
    q, k, v = _packed_qkv(lengths, heads, kv_heads, d, seed=sum(lengths) + d, token_major=token_major)
    cu = torch.tensor([0] + lengths).cumsum(0)
    assert cpu_ops.varlen_attention_applies(q.float(), k.float(), v.float())
    got, got_grads = _grads(lambda a, b, c: cpu_ops.varlen_attention(a, b, c, cu), q.float(), k.float(), v.float())
    want, want_grads = _grads(lambda a, b, c: _per_sequence_reference(a, b, c, cu), q, k, v)
    torch.testing.assert_close(got, want.float(), **ATTENTION_TOL)
    assert got.transpose(1, 2).is_contiguous()  # [N, heads, D] memory: the model's reshape is free
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b.float(), **ATTENTION_TOL)


def test_varlen_attention_takes_a_broadcast_gradient(attention_gemm):
    """A gradient whose rows share memory (the backward of a sum over tokens: row stride 0, which
    BLAS refuses as a leading dimension) gives the reference's gradients on both GEMM paths."""
    lengths = [9, 70]
    q, k, v = _packed_qkv(lengths, 4, 2, 16, seed=5)
    cu = torch.tensor([0] + lengths).cumsum(0)
    got = [t.float().requires_grad_() for t in (q, k, v)]
    cpu_ops.varlen_attention(*got, cu).sum(2).pow(2).sum().backward()
    want = [t.clone().requires_grad_() for t in (q, k, v)]
    _per_sequence_reference(*want, cu).sum(2).pow(2).sum().backward()
    for a, b in zip(got, want):  # gradients ~100x the unit scale ATTENTION_TOL is stated for
        torch.testing.assert_close(a.grad, b.grad.float(), atol=2e-5 * float(b.grad.abs().max()), rtol=2e-5)


def test_varlen_attention_is_the_same_on_any_thread_count():
    """One task per (sequence, key/value head), each on one thread: bitwise the same for 1 or 2."""
    lengths = [150, 3, 77, 64, 200]
    q, k, v = (t.float() for t in _packed_qkv(lengths, 4, 2, 32, seed=9))
    cu = torch.tensor([0] + lengths).cumsum(0)
    threads, runs = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(_grads(lambda a, b, c: cpu_ops.varlen_attention(a, b, c, cu), q, k, v))
    finally:
        torch.set_num_threads(threads)
    (out1, grads1), (out2, grads2) = runs
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(grads1, grads2))


def test_varlen_attention_leaves_out_rows_the_caller_does_not_read(attention_gemm):
    """query_from: a sequence's rows below it, in whole 64-row query blocks, come back 0 (their dq
    too); where the caller gives those rows no gradient, every other output row and every
    gradient is the full run's to the bit (what the rows left out add is exactly 0)."""
    lengths, query_from = [200, 7, 130, 64, 70, 0], [150, 0, 70, 64, 63, 0]
    q, k, v = (t.float() for t in _packed_qkv(lengths, 4, 2, 16, seed=3))
    cu = torch.tensor([0] + lengths).cumsum(0)
    read = torch.cat([torch.arange(n) >= f for n, f in zip(lengths, query_from)])  # rows the caller reads
    left_out = torch.cat([torch.arange(n) < f - f % 64 for n, f in zip(lengths, query_from)])

    def attention(query_from):
        return lambda a, b, c: cpu_ops.varlen_attention(a, b, c, cu, query_from) * read[:, None]

    full, full_grads = _grads(attention(None), q, k, v)
    part, part_grads = _grads(attention(torch.tensor(query_from)), q, k, v)
    assert torch.equal(part, full)
    assert all(torch.equal(a, b) for a, b in zip(part_grads, full_grads))
    raw = cpu_ops.varlen_attention(q, k, v, cu, torch.tensor(query_from))
    assert left_out.sum() == 128 + 64 + 64 and (raw[:, :, left_out] == 0).all()
    torch.testing.assert_close(raw[:, :, ~left_out], _per_sequence_reference(q, k, v, cu)[:, :, ~left_out],
                               **ATTENTION_TOL)
    for wrong, match in (([0, 0], "one entry per sequence"), ([0, 8, 0, 0, 0, 0], r"query_from\[1\] = 8 lies outside"),
                         ([-1, 0, 0, 0, 0, 0], r"query_from\[0\] = -1")):
        with pytest.raises(RuntimeError, match=match):
            cpu_ops.varlen_attention(q, k, v, cu, torch.tensor(wrong))


def test_varlen_attention_edges_and_errors():
    q, k, v = (t.float() for t in _packed_qkv([0, 0], 2, 1, 8, seed=1))
    assert cpu_ops.varlen_attention(q, k, v, torch.tensor([0, 0, 0])).shape == (1, 2, 0, 8)
    q, k, v = (t.float() for t in _packed_qkv([4], 2, 1, 8, seed=1))
    with cpu_ops.eager():
        assert not cpu_ops.varlen_attention_applies(q, k, v)
    assert not cpu_ops.varlen_attention_applies(q.double(), k.double(), v.double())
    for cu in ([0, 3], [0], [1, 4]):  # short of N; no sequences for 4 tokens; not from 0
        with pytest.raises(RuntimeError, match="cu_seqlens must run from 0 to N"):
            cpu_ops.varlen_attention(q, k, v, torch.tensor(cu))
    with pytest.raises(RuntimeError, match="heads a multiple of kv_heads"):
        torch.ops.rci_fast_cpu.varlen_attention_forward(q[0], torch.cat([k[0]] * 3), torch.cat([v[0]] * 3),
                                                        torch.tensor([0, 4]), 0.5)

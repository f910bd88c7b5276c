"""The decode step's GEMM (rci_fast/model/small_gemm.cpp) against float64 matmuls, on odd shapes:
row counts around each path's block (8 rows AVX-512, 6 AVX2, 4 portable), widths around the
32-column panel, short and long sums. Every path must give the same bits, and a row's result
must not depend on the other rows of the call or on the thread count."""
import pytest
import torch

from rci_fast.model import KVCache, native
from rci_fast.model.cpu_decode import CpuDecodeStep
from test_cpu_decode import CONFIGS, random_model

pytestmark = pytest.mark.skipif(not native.available(), reason="rci_fast's C++ CPU kernels did not build")
ops = torch.ops.rci_fast_cpu if native.available() else None

# (rows, inputs, outputs)
SHAPES = [(1, 1, 1), (5, 7, 33), (6, 64, 32), (7, 3, 31), (9, 100, 65), (17, 256, 96), (64, 33, 200)]


def operands(m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(k, n, generator=g), torch.randn(n, generator=g)


@pytest.fixture
def paths():
    """Every path this CPU can take (0 portable, 1 AVX2, 2 AVX-512), restoring the default after."""
    before = ops.small_gemm_isa(99)  # clamped to what the CPU has; returns the level set before
    best = ops.small_gemm_isa(before)
    yield list(range(best + 1))
    ops.small_gemm_isa(before)


@pytest.mark.parametrize("n", [70, 64, 7])
@pytest.mark.parametrize("transposed", [False, True])
def test_pack_panels_layout(n, transposed):
    w = torch.arange(1, 5 * n + 1, dtype=torch.float32).view(5, n)
    packed = ops.pack_panels(w.t().contiguous().t() if transposed else w)  # any strides
    panels = (n + 31) // 32
    assert packed.shape == (panels, 5, 32) and packed.is_contiguous()
    for p in range(panels):
        cols = w[:, 32 * p: 32 * p + 32]
        assert torch.equal(packed[p, :, : cols.shape[1]], cols)
    assert torch.equal(packed[-1, :, n - 32 * (panels - 1):], torch.zeros(5, 32 * panels - n))  # padding


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_small_gemm_matches_float64(m, k, n, paths):
    x, w, b = operands(m, k, n)
    packed = ops.pack_panels(w)
    want = x.double() @ w.double() + b.double()
    tol = 1e-6 * (k ** 0.5) * 8  # float32 rounding of k products of size ~1, a few ulps of ~sqrt(k)
    results = []
    for path in paths:
        ops.small_gemm_isa(path)
        got = ops.small_gemm(x, packed, n, b)
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)
        results.append(got)
        torch.testing.assert_close(ops.small_gemm(x, packed, n, None).double(), x.double() @ w.double(),
                                   atol=tol, rtol=0)
    for got in results[1:]:  # one fused multiply-add chain per output on every path
        assert torch.equal(got, results[0])


def test_rows_do_not_depend_on_their_batch_or_threads():
    x, w, b = operands(37, 70, 150, seed=3)
    packed = ops.pack_panels(w)
    full = ops.small_gemm(x, packed, 150, b)
    for i in (0, 8, 36):
        assert torch.equal(ops.small_gemm(x[i:i + 1].contiguous(), packed, 150, b), full[i:i + 1])
    assert torch.equal(ops.small_gemm(x[5:30].contiguous(), packed, 150, b), full[5:30])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.small_gemm(x, packed, 150, b), full)
    finally:
        torch.set_num_threads(threads)


def test_small_gemm_rejects_what_it_cannot_multiply():
    x, w, b = operands(4, 10, 40)
    packed = ops.pack_panels(w)
    with pytest.raises(RuntimeError, match="packed by pack_panels for 10 inputs and 70 outputs"):
        ops.small_gemm(x, packed, 70, None)
    with pytest.raises(RuntimeError, match="packed by pack_panels for 9 inputs"):
        ops.small_gemm(x[:, :9].contiguous(), packed, 40, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.small_gemm(x, packed, 40, b[:39].contiguous())
    with pytest.raises(RuntimeError, match="contiguous float32 CPU matrix"):
        ops.small_gemm(x.t(), packed, 40, None)
    with pytest.raises(RuntimeError, match="float32 CPU matrix"):
        ops.pack_panels(w.double())


def test_decode_step_gives_the_same_bits_on_every_path(paths):
    """The whole C++ decode step (every bias, and the o and down projections added into the
    residual stream) on each path: the same logits and cache to the bit."""
    cfg = CONFIGS["llama-mha-tail"]  # q/k/v, o and MLP biases
    step = CpuDecodeStep(random_model(cfg))
    ids, positions = torch.tensor([3, 50, 7, 96, 0, 9, 11]), torch.tensor([0, 4, 9, 2, 5, 5, 1])
    results = []
    for path in paths:
        ops.small_gemm_isa(path)
        cache = KVCache(cfg, 7, 16, torch.float32)
        logits = [step(ids, positions + t, 0, cache) for t in range(3)]
        results.append((torch.stack(logits), cache.k.clone(), cache.v.clone()))
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


def test_decode_step_refuses_a_head_of_another_width():
    model = random_model(CONFIGS["llama-mha-tail"])  # vocabulary 97, hidden 36, untied head
    model.lm_head.weight = torch.nn.Parameter(torch.randn(98, 36))  # 98 rows: the same 4 panels as 97
    with pytest.raises(ValueError, match="needs 97 outputs for lm_head, got 98"):
        CpuDecodeStep(model)

"""The C++ sampler (rci_fast/rollout/sampling.cpp) against its torch reference
(sampling.inverse_cdf_torch): the same ids, maxima, totals and log-probs bit for bit, so that a
rollout draws the same tokens with either. Odd shapes: rows that fill no block of 8 or a partial last one,
vocabularies that are no multiple of the vector width, masked (-inf) logits as top-k and top-p
leave them, a row of a single finite logit, rows with NaN or +-inf, no rows."""
import pytest
import torch

from rci_fast.model import native
from rci_fast.rollout import sampling
from rci_fast.rollout.sampling import SamplingParams, inverse_cdf_torch, sample

pytestmark = pytest.mark.skipif(not native.available(), reason=f"C++ CPU kernels not built: {native.error()}")


def fused(logits, u):
    return torch.ops.rci_fast_cpu.inverse_cdf_sample(logits, u)


def assert_bits_equal(ours, ref):
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    if ours.is_floating_point():  # bit patterns (-0.0 is not 0.0), NaN where the reference has one
        nan = ref.isnan()
        assert torch.equal(ours.isnan(), nan)
        assert torch.equal(ours[~nan].view(torch.int32), ref[~nan].view(torch.int32))
    else:
        assert torch.equal(ours, ref)


def assert_same_bits(logits, u):
    """inverse_cdf_sample against inverse_cdf_torch, and inverse_cdf_sample_logprob against the
    log-prob sample() forms from the reference's outputs in torch."""
    ref = inverse_cdf_torch(logits, u)
    for ours, expected in zip(fused(logits, u), ref):
        assert_bits_equal(ours, expected)
    ids, top, total = ref
    ref_logp = (logits.gather(-1, ids) - top - total.log()).squeeze(-1)
    for ours, expected in zip(torch.ops.rci_fast_cpu.inverse_cdf_sample_logprob(logits, u), (ids.squeeze(-1), ref_logp)):
        assert_bits_equal(ours, expected)


@pytest.mark.parametrize("rows,vocab", [(1, 1), (1, 5), (7, 1000), (9, 1023), (16, 8192), (64, 1031)])
def test_same_bits_as_the_torch_reference(rows, vocab):
    g = torch.Generator().manual_seed(rows * 10007 + vocab)
    for scale in (0.1, 3.0, 30.0):  # flat to peaked: sums from ~vocab down to ~1
        logits = torch.randn(rows, vocab, generator=g) * scale
        u = torch.rand(rows, 1, generator=g).clamp_(min=1e-12)
        assert_same_bits(logits, u)
        masked = logits.masked_fill(torch.rand(rows, vocab, generator=g) < 0.7, float("-inf"))
        masked[:, 0] = 1.0  # every row keeps a finite logit
        assert_same_bits(masked, u)
    edges = torch.tensor([[1e-12], [1.0 - 2 ** -24]]).repeat(rows, 1)[:rows]  # u at both ends
    assert_same_bits(torch.randn(rows, vocab, generator=g), edges.contiguous())


def test_rows_with_nan_inf_or_a_single_logit():
    logits = torch.randn(10, 300, generator=torch.Generator().manual_seed(0))
    logits[3, 17] = float("nan")
    logits[5] = float("-inf")
    logits[5, 250] = 2.0
    logits[6] = float("-inf")  # nothing to draw: NaN sums, the last index
    logits[8, 40] = float("inf")
    u = torch.rand(10, 1, generator=torch.Generator().manual_seed(1))
    assert_same_bits(logits, u)
    ids, top, total = fused(logits, u)
    assert ids[5, 0] == 250 and top[5, 0] == 2.0 and total[5, 0] == 1.0
    assert top[3, 0].isnan() and ids[6, 0] == 299
    assert_same_bits(torch.full((3, 1), float("-inf")), u[:3].contiguous())
    assert all(t.shape[0] == 0 for t in fused(torch.zeros(0, 7), torch.zeros(0, 1)))


def test_sample_takes_the_same_draws_either_way(monkeypatch):
    """sample() on a CPU goes through the C++ sampler; with the extension hidden, through torch:
    the same ids and log-probs for every sampling mode."""
    logits = torch.randn(24, 517, generator=torch.Generator().manual_seed(2)) * 4
    modes = [SamplingParams(), SamplingParams(temperature=0.7, top_k=40), SamplingParams(top_p=0.9, seed=1)]

    def draws():
        return [sample(logits.clone(), p, torch.Generator().manual_seed(p.seed)) for p in modes]

    def no_torch_path(*args):
        raise AssertionError("sample() took the torch path with the C++ kernels built")

    monkeypatch.setattr(sampling, "inverse_cdf_torch", no_torch_path)
    ours = draws()
    monkeypatch.undo()
    monkeypatch.setattr(native, "available", lambda: False)
    for (ids, logps), (ref_ids, ref_logps) in zip(ours, draws()):
        assert torch.equal(ids, ref_ids) and torch.equal(logps, ref_logps)


def test_rejects_bad_input():
    with pytest.raises(RuntimeError, match="contiguous float32 CPU matrix"):
        fused(torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, 1))
    with pytest.raises(RuntimeError, match="contiguous float32 CPU matrix"):
        fused(torch.zeros(6, 4).t(), torch.zeros(4, 1))
    for u in (torch.zeros(3, 1), torch.zeros(4), torch.zeros(1, 4)):  # the reference would broadcast [4]
        with pytest.raises(RuntimeError, match="one uniform per row"):
            fused(torch.zeros(4, 6), u)


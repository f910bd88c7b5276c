"""The C++ decode step (rci_fast/model/cpu_kernels.cpp) against the Python cached forward it
replaces: the same logits and cache contents to float32 rounding, on odd shapes."""
import pytest
import torch

from rci_fast.model import KVCache, ModelConfig, Transformer
from rci_fast.model.cpu_decode import CpuDecodeStep

# head_dim 8 (vector loops only), 12 (a vector of 8 and a scalar tail of 4), 20 (tail only past
# 16); GQA groups of 3, 1 and 4; every bias combination the model supports; rope scaling.
CONFIGS = {
    "qwen2-group3": ModelConfig("qwen2", 131, 48, 80, 2, 6, 2, 8, qkv_bias=True, tie_word_embeddings=True),
    "llama-mha-tail": ModelConfig("llama", 97, 36, 64, 3, 3, 3, 12, o_bias=True, mlp_bias=True,
                                  qkv_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-group4-llama3-rope": ModelConfig("llama", 113, 80, 96, 2, 4, 1, 20, rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
}
# |error| of float32 logits of magnitude ~1-5 from a different summation order
ATOL = 2e-5


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norm weights and biases random too, so that every tensor matters
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_step_matches_python_forward(name):
    cfg = CONFIGS[name]
    model = random_model(cfg)
    slots, max_len, prefix = 7, 64, 9
    g = torch.Generator().manual_seed(1)
    ours, ref = (KVCache(cfg, slots, max_len, torch.float32) for _ in range(2))
    model.fuse_projections()
    with torch.no_grad():  # the same prompt in every slot through the Python path, into both caches
        ids = torch.randint(0, cfg.vocab_size, (slots, prefix), generator=g)
        for cache in (ours, ref):
            model.forward_cached(ids, torch.arange(prefix).expand(slots, prefix), cache, None)
    step = CpuDecodeStep(model)
    first, rows = 2, 5  # slots 2..6, not starting at 0
    # Rows at different positions, one of them at 0 (a single key), some far apart.
    positions = torch.tensor([prefix, 0, prefix + 3, prefix, 40])
    for t in range(4):
        tokens = torch.randint(0, cfg.vocab_size, (rows,), generator=g)
        pos = positions + t
        with torch.no_grad():
            expected = model.lm_head(model.forward_cached(
                tokens[:, None], pos[:, None], ref, torch.arange(first, first + rows))[:, 0])
        got = step(tokens, pos, first, ours)
        assert got.shape == (rows, cfg.vocab_size)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.k, ref.k, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.v, ref.v, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_step_reads_a_shared_prefix_from_another_slot(name):
    """Rows read their positions below prefix lengths[b] from slot prefix slots[b], the rest
    (their own new key always) from their own slot: the same bits as the same keys and values in
    the row's own slot."""
    cfg = CONFIGS[name]
    step = CpuDecodeStep(random_model(cfg))
    slots, max_len, shared = 5, 40, 6
    g = torch.Generator().manual_seed(2)
    cache = KVCache(cfg, slots, max_len, torch.float32)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    cache.k[:, 2, :, :shared] = cache.k[:, 0, :, :shared]  # slot 2 holds slot 0's prompt
    cache.v[:, 2, :, :shared] = cache.v[:, 0, :, :shared]
    ids, positions = torch.tensor([5, 9, 7]), torch.tensor([shared + 3, 11, shared])

    def logits(cache, prefix=None):
        work = KVCache(cfg, slots, max_len, torch.float32)
        work.k.copy_(cache.k)
        work.v.copy_(cache.v)
        return step(ids, positions, 0, work, prefix), work

    plain, plain_cache = logits(cache)
    # Row 2 reads slot 0's copy of its prompt; rows 0 and 1 their own slots: the same bits.
    same, same_cache = logits(cache, torch.tensor([[0, 1, 0], [shared, 0, shared]]))
    assert torch.equal(same.view(torch.int32), plain.view(torch.int32))
    assert torch.equal(same_cache.k, plain_cache.k) and torch.equal(same_cache.v, plain_cache.v)
    # Row 1 reads slot 4 below position 8 (different values): as if they were in its own slot.
    # A length past the row's position (100) is cut to it: the row's own new key is its own.
    moved = KVCache(cfg, slots, max_len, torch.float32)
    moved.k.copy_(cache.k)
    moved.v.copy_(cache.v)
    moved.k[:, 1, :, :8] = cache.k[:, 4, :, :8]
    moved.v[:, 1, :, :8] = cache.v[:, 4, :, :8]
    for length, reference in ((8, moved), (100, None)):
        if reference is None:
            reference = KVCache(cfg, slots, max_len, torch.float32)
            reference.k.copy_(cache.k)
            reference.v.copy_(cache.v)
            reference.k[:, 1, :, :11] = cache.k[:, 4, :, :11]
            reference.v[:, 1, :, :11] = cache.v[:, 4, :, :11]
        got, _ = logits(cache, torch.tensor([[0, 4, 2], [0, length, 0]]))
        want, _ = logits(reference)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        assert not torch.equal(got[1], plain[1]) and torch.equal(got[0], plain[0])


def test_decode_step_rejects_what_it_cannot_run():
    cfg = CONFIGS["qwen2-group3"]
    model = random_model(cfg)
    with pytest.raises(ValueError, match="float32 model on a CPU"):
        CpuDecodeStep(random_model(cfg).to(torch.bfloat16))
    step = CpuDecodeStep(model)
    cache = KVCache(cfg, 2, 8, torch.float32)
    with pytest.raises(RuntimeError, match="position is outside the cache"):
        step(torch.tensor([1, 2]), torch.tensor([0, 8]), 0, cache)
    with pytest.raises(RuntimeError, match="rows beyond the cache's slots"):
        step(torch.tensor([1, 2]), torch.tensor([0, 1]), 1, cache)
    with pytest.raises(RuntimeError, match="ids and positions must be"):
        step(torch.tensor([1, 2]), torch.tensor([0, 1, 2]), 0, cache)
    ids, positions = torch.tensor([1, 2]), torch.tensor([3, 1])
    with pytest.raises(RuntimeError, match="a prefix slot is outside the cache"):
        step(ids, positions, 0, cache, torch.tensor([[0, 2], [3, 1]]))
    with pytest.raises(RuntimeError, match=r"prefix_slots and prefix_lens must be \[B\] int64"):
        step(ids, positions, 0, cache, torch.tensor([[0], [3]]))
    with pytest.raises(RuntimeError, match="prefix_slots and prefix_lens come together"):
        torch.ops.rci_fast_cpu.decode_step(ids, positions, 0, cache.k, cache.v, step.inv_freq, step.weights,
                                           step.heads, step.kv_heads, step.eps, torch.tensor([0, 1]), None)


def test_decode_step_runs_under_inference_mode_with_the_same_bits():
    """Under torch.inference_mode (a caller's choice) the step's tensors are inference tensors,
    which its worker threads, outside that mode, may not write through views: it runs and gives
    the logits and cache of a no_grad call to the bit, with enough rows for both threads."""
    cfg = CONFIGS["qwen2-group3"]
    step = CpuDecodeStep(random_model(cfg))
    ids, positions = torch.arange(1, 17), torch.arange(16) % 5
    results = []
    for mode in (torch.no_grad, torch.inference_mode):
        cache = KVCache(cfg, 16, 8, torch.float32)
        with mode():
            results.append((step(ids, positions, 0, cache), cache.k.clone(), cache.v.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_engine_rejects_cpu_decode_for_a_bf16_model():
    from rci_fast.rollout import RolloutEngine
    model = random_model(CONFIGS["qwen2-group3"]).to(torch.bfloat16)
    with pytest.raises(ValueError, match="cpu_decode=True needs a float32 model on a CPU"):
        RolloutEngine(model, tokenizer=None, eos_ids=[], cpu_decode=True)
    from rci_fast.rollout import SamplingParams
    engine = RolloutEngine(random_model(CONFIGS["qwen2-group3"]), tokenizer=None, eos_ids=[],
                           cpu_decode=True, cuda_graphs="eager")
    with pytest.raises(ValueError, match="no cuda_graphs"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))

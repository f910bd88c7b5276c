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

"""rci_fast's decoder against transformers on tiny random models: logits, packing, checkpoints."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rci_fast.model import load_pretrained, transformer
from rci_fast.model.transformer import length_groups

SMALL = dict(vocab_size=131, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2)
CONFIGS = {
    "qwen2-tied": (Qwen2ForCausalLM, Qwen2Config(**SMALL, tie_word_embeddings=True)),
    "qwen2-untied": (Qwen2ForCausalLM, Qwen2Config(**SMALL, tie_word_embeddings=False, rope_theta=1e6)),
    "llama-gqa-llama3-rope": (LlamaForCausalLM, LlamaConfig(**SMALL, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-linear-rope-biases": (LlamaForCausalLM, LlamaConfig(
        **SMALL, attention_bias=True, mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


def random_hf_model(name, seed=0):
    cls, cfg = CONFIGS[name]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # random biases and norm weights too, so that every tensor matters
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf = random_hf_model(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path)
    return hf, load_pretrained(path), path


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 131, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_packed_sequences_match_padded_batch(pair):
    hf, ours, _ = pair
    g = torch.Generator().manual_seed(2)
    lengths = [5, 19, 1, 11]
    seqs = [torch.randint(0, 131, (n,), generator=g) for n in lengths]
    padded = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
        mask[i, :len(s)] = 1
    cu = torch.tensor([0] + lengths).cumsum(0)
    with torch.no_grad():
        ref = hf(padded, attention_mask=mask).logits
        packed = ours(torch.cat(seqs).unsqueeze(0), cu_seqlens=cu)[0]
    for i, n in enumerate(lengths):
        torch.testing.assert_close(packed[cu[i]:cu[i] + n], ref[i, :n], atol=1e-4, rtol=0)


def test_length_groups():
    lengths = [5, 190, 180, 7, 100, 6, 190, 0]
    every = length_groups(lengths, 1e12)
    assert every == [list(range(len(lengths) - 1))]                # no limit: one call; no empty sequence
    alone = length_groups(lengths, 0)
    assert sorted(map(tuple, alone)) == [(0,), (1, 6), (2,), (3,), (4,), (5,)]  # equal lengths share
    some = length_groups(lengths, 190 ** 2 - 180 ** 2)
    assert some == [[1, 2, 6], [4], [0, 3, 5]]  # 100 would add more padding than 180 -> 190 allows
    for group in some:
        assert group == sorted(group)
        longest = max(lengths[i] for i in group)
        waste = sum(longest ** 2 - lengths[i] ** 2 for i in group)
        assert waste <= (190 ** 2 - 180 ** 2) * (len(group) - 1)


def test_gpu_area_budget_merges_a_micro_batch_but_not_one_long_sequence():
    """The CUDA budget (launches cost more than padding there) puts a micro-batch of similar
    sequences into one call per layer, and still keeps one long sequence apart from many short
    ones (padding them all to its length would multiply the tokens)."""
    from rci_fast.model.transformer import PADDED_AREA_PER_CALL, PADDED_AREA_PER_CALL_CUDA

    lengths = [150 + 13 * i for i in range(16)]  # 150 .. 345
    assert len(length_groups(lengths, PADDED_AREA_PER_CALL_CUDA / (4 * 64))) == 1
    assert len(length_groups(lengths, PADDED_AREA_PER_CALL / (4 * 64))) > 8
    skewed = [8192] + [100] * 60
    groups = length_groups(skewed, PADDED_AREA_PER_CALL_CUDA / (4 * 64))
    assert [0] in groups and len(groups) == 2


@pytest.mark.parametrize("area_per_call", [0, 1 << 14, 1 << 40])  # singles, two groups, one
def test_packed_attention_matches_per_sequence_with_gradients(monkeypatch, area_per_call):
    """Whatever the grouping, the padded-groups attention gives each sequence's own causal
    attention, forward and backward (GQA: 6 query heads on 2 key/value heads)."""
    monkeypatch.setattr(transformer, "PADDED_AREA_PER_CALL", area_per_call)
    g = torch.Generator().manual_seed(4)
    lengths = [3, 17, 1, 0, 9, 16, 40]  # an empty sequence too
    cu = torch.tensor([0] + lengths).cumsum(0)
    n = sum(lengths)
    q, k, v = (torch.randn(1, h, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (6, 2, 2))
    grad_out = torch.randn(1, 6, n, 8, generator=g, dtype=torch.float64)
    out = transformer.padded_groups_attention(q, k, v, cu)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=True)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a], dim=2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    empty = transformer.padded_groups_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], torch.tensor([0, 0, 0]))
    assert empty.shape == (1, 6, 0, 8)


def test_packed_layout_is_read_once_per_forward(monkeypatch, tmp_path):
    """Every layer of a packed forward shares one PackedLayout: the sequence bounds come to the host
    once and the padded-groups plan is built once (on a GPU each read was a sync, per layer);
    its positions restart in each sequence, as packed_positions says."""
    from rci_fast.model import cpu_ops, packed_positions
    from rci_fast.model.transformer import PackedLayout

    cu = torch.tensor([0, 3, 3, 10, 11])  # an empty sequence too
    assert packed_positions(cu).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0]
    for bad in ([], [1, 3], [0, 5, 4]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            PackedLayout(torch.tensor(bad, dtype=torch.long))
    hf = random_hf_model("qwen2-untied")
    hf.save_pretrained(str(tmp_path))
    model = load_pretrained(str(tmp_path))
    built = []
    real = PackedLayout._build_plan
    monkeypatch.setattr(PackedLayout, "_build_plan",
                        lambda self, waste, device: built.append(waste) or real(self, waste, device))
    ids = torch.randint(0, 131, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), cpu_ops.eager():  # eager: the padded groups, not the C++ kernel
        packed = model(ids, cu_seqlens=cu)[0]
    assert len(built) == 1 and model.config.num_hidden_layers == 2
    with torch.no_grad():
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if b > a:
                torch.testing.assert_close(packed[a:b], hf(ids[:, a:b]).logits[0], atol=1e-4, rtol=0)


def test_our_checkpoint_loads_in_transformers(pair, tmp_path):
    hf, ours, _ = pair
    ours.save_pretrained(str(tmp_path / "ours"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    ids = torch.randint(0, 131, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_sharded_checkpoints_both_ways(tmp_path):
    hf = random_hf_model("qwen2-untied")
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    ours = load_pretrained(str(tmp_path / "hf"))
    ours.save_pretrained(str(tmp_path / "ours"), max_shard_bytes=20_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_bf16_load(pair):
    _, _, path = pair
    m = load_pretrained(path, dtype=torch.bfloat16)
    assert m.lm_head.weight.dtype == torch.bfloat16 and m.inv_freq.dtype == torch.float32
    assert m(torch.arange(8).unsqueeze(0)).dtype == torch.bfloat16


def test_clear_errors(tmp_path, pair):
    _, _, path = pair
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(str(tmp_path / "nothing"))
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    state = load_file(os.path.join(path, "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        load_pretrained(str(broken))


def test_a_tied_model_that_stores_its_own_head_loads_as_transformers_loads_it(tmp_path):
    """tie_word_embeddings with an lm_head.weight in the checkpoint too: equal to the embedding,
    the tie stays; different, transformers unties the two, and so do both of rci_fast's loaders
    (load_pretrained; load_sharded, which the trainers use)."""
    from safetensors.torch import load_file, save_file

    from rci_fast.model.checkpoint import read_config
    from rci_fast.train import init_distributed
    from rci_fast.train.parallelize import load_sharded

    hf = random_hf_model("qwen2-tied")
    hf.save_pretrained(str(tmp_path / "same"))
    state = load_file(str(tmp_path / "same" / "model.safetensors"))
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "same" / "model.safetensors"), metadata={"format": "pt"})
    assert read_config(str(tmp_path / "same")).tie_word_embeddings
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text((tmp_path / "same" / "config.json").read_text())
    state["lm_head.weight"] = torch.randn(state["lm_head.weight"].shape, generator=torch.Generator().manual_seed(4))
    save_file(state, str(tmp_path / "other" / "model.safetensors"), metadata={"format": "pt"})
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "other")).eval()
    ours = load_pretrained(str(tmp_path / "other"))
    assert not ours.config.tie_word_embeddings
    ids = torch.randint(0, 131, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)
    info = init_distributed("cpu")
    try:
        inner = load_sharded(str(tmp_path / "other"), info, torch.float32).model
    finally:
        info.close()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(inner.state_dict()[name], tensor), name


def test_config_round_trip_keeps_the_weights_dtype(tmp_path):
    """A transformers-5 checkpoint says "dtype"; rci_fast saved "torch_dtype" beside the old
    "dtype", which transformers 5 reads first: fp32 weights were then loaded as bf16."""
    hf = random_hf_model("qwen2-untied").to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path / "bf16"))
    ours = load_pretrained(str(tmp_path / "bf16"), dtype=torch.float32)
    ours.save_pretrained(str(tmp_path / "fp32"))
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32")).dtype == torch.float32


def test_rope_settings_that_rci_fast_would_read_otherwise_than_transformers_are_refused():
    from rci_fast.model.config import ModelConfig

    base = dict(model_type="llama", vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64)
    linear = {"rope_type": "linear", "factor": 4.0}
    with pytest.raises(ValueError, match="disagree"):
        ModelConfig.from_hf({**base, "rope_scaling": linear, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    both = ModelConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4},
                                "rope_parameters": {**linear, "rope_theta": 5e5}})
    assert both.rope_scaling == linear and both.rope_theta == 5e5
    with pytest.raises(ValueError, match="disagree"):  # transformers 5 would take theta from rope_scaling's side
        ModelConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 4},
                             "rope_parameters": {**linear, "rope_theta": 5e5}})
    for where in ({"partial_rotary_factor": 0.5}, {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}):
        with pytest.raises(ValueError, match="partial_rotary_factor"):
            ModelConfig.from_hf({**base, **where})
    llama3 = ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0}})
    assert llama3.rope_scaling["original_max_position_embeddings"] == 64  # transformers' default
    assert ModelConfig.from_hf({**base, "hidden_act": "swish"}).model_type == "llama"


def test_rotary_buffers_of_older_checkpoints_are_ignored(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = random_hf_model("qwen2-untied")
    hf.save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(str(tmp_path))(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_activation_checkpointing_keeps_gradients(pair):
    _, ours, _ = pair
    ids = torch.randint(0, 131, (2, 12), generator=torch.Generator().manual_seed(4))

    def grads(flag):
        ours.zero_grad()
        ours.train()
        ours.activation_checkpointing = flag
        ours(ids).float().logsumexp(-1).sum().backward()
        ours.activation_checkpointing = False
        ours.eval()
        return [p.grad.clone() for p in ours.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_hidden_states_feed_the_fused_logprob_kernel(pair):
    _, ours, _ = pair
    from rci_fast.kernels import fused_linear_logprob

    ids = torch.randint(0, 131, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h = ours.hidden_states(ids)[0]
        targets = ids[0].roll(-1)
        ref = torch.log_softmax(ours(ids)[0].double(), -1).gather(-1, targets[:, None]).squeeze(-1)
        got = fused_linear_logprob(h, ours.lm_head.weight, targets, backend="torch")
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)


def test_lazily_zeroed_cache_ignores_stale_memory(pair):
    """KVCache(zero_all=False) zeroes positions on first use: memory that held NaN before gives
    the same cached forward as a zeroed cache (attention reads masked cells too)."""
    from rci_fast.model import KVCache

    _, ours, _ = pair
    ids = torch.randint(0, 131, (3, 9), generator=torch.Generator().manual_seed(3))
    outs = []
    for zero_all in (True, False):
        cache = KVCache(ours.config, 3, 200, torch.float32, zero_all=zero_all)
        if not zero_all:
            cache.k.fill_(float("nan")), cache.v.fill_(float("nan"))
        rows = [ours.forward_cached(ids[:, :4], torch.arange(4).expand(3, 4), cache, None)]
        for t in range(4, 8):  # rows 0 and 1 go ahead, row 2 waits
            rows.append(ours.forward_cached(ids[:2, t:t + 1], torch.full((2, 1), t), cache, None))
        # row 2 at position 4 attends (masked) to cells 5..8 of its slot, never written
        last = torch.tensor([[8], [8], [4]])
        rows.append(ours.forward_cached(ids.gather(1, last), last, cache, None))
        outs.append(rows)
        assert cache.zeroed == (200 if zero_all else 64)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.no_grad():
        full = ours.hidden_states(ids)
    torch.testing.assert_close(outs[1][-1][:, 0], full[[0, 1, 2], [8, 8, 4]], atol=1e-5, rtol=0)


def test_repeat_kv_pairs_heads_as_enable_gqa_does():
    """transformer.sdpa repeats grouped key/value heads for float32 on CUDA (the efficient kernel
    there may refuse enable_gqa): the same attention as enable_gqa, checked here on the CPU."""
    from rci_fast.model.transformer import repeat_kv
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 8, generator=g) for h in (6, 2, 2))
    mask = torch.rand(9, 9, generator=g) > 0.3
    for kwargs in (dict(is_causal=True), dict(attn_mask=mask | torch.eye(9, dtype=torch.bool))):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
        got = torch.nn.functional.scaled_dot_product_attention(q, *repeat_kv(k, v, 3), **kwargs)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)

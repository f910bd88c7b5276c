"""SFT data: masks on real trajectories (scripted teacher, real sandbox), packing, the seeded
resumable order, and the loss normalisation (1 vs several micro-batches)."""
import contextlib
import copy

import pytest
import torch

from rci_fast.model import ModelConfig, Transformer
from rci_fast.sandbox import Sandbox
from rci_fast.tasks.prompt import RESULT_HEADER, build_messages, format_result, render_chat
from rci_fast.tasks.teacher import generate
from rci_fast.tasks.trajectory import SFTTrajectory
from rci_fast.tokenizer import train_bpe_tokenizer
from rci_fast.train.data import (IGNORE, SFTBatches, TokenizedSequence, pack, pack_shared_prompts, split_by_budget,
                                 tokenize_conversation, tokenize_trajectories)
from rci_fast.train.modeling import TokenLogprobs
from rci_fast.train.sft import forward_backward, lr_factor

CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def trajectories():
    with Sandbox(workers=2) as sb:
        out = list(generate(sb, ["basic_arithmetic", "gcd", "base_conversion", "chain_sum", "letter_counting"], per_family=6, seed=1))
    assert sum(t.num_code_calls >= 2 for t in out) > 0 and sum(t.num_code_calls == 0 for t in out) >= 0
    return out


@pytest.fixture(scope="module")
def tokenizer(trajectories):
    return train_bpe_tokenizer([render_chat(t.messages) for t in trajectories], vocab_size=400)


def test_mask_trains_only_on_model_text(trajectories, tokenizer):
    assert any(t.num_code_calls > 0 for t in trajectories)
    for t in trajectories:
        seq = tokenize_conversation(t.messages, tokenizer)
        ids, mask = seq.input_ids, seq.trainable
        # Ids end to end: the whole conversation decodes to its rendering.
        assert tokenizer.decode(ids) == render_chat(t.messages)
        trained_text = tokenizer.decode(ids[mask])
        context_text = tokenizer.decode(ids[~mask])
        assert trained_text == "".join(t.assistant_turns) + "<|im_end|>\n"
        for m in t.messages:
            if m["role"] in ("tool", "user", "system"):
                assert m["content"] in context_text
        assert RESULT_HEADER not in trained_text and "<|im_start|>" not in trained_text
        # Every trained target is a model token, and every model token after the first is a target.
        targets = pack([seq]).targets
        predicted = torch.cat([ids[1:], ids[:1]])  # targets[i] predicts ids[i + 1]
        trained_positions = targets != IGNORE
        assert torch.equal(targets[trained_positions], predicted[trained_positions])
        assert torch.equal(trained_positions[:-1], mask[1:]) and not trained_positions[-1]


def test_tool_output_that_looks_like_model_text_is_still_masked(tokenizer):
    # An interpreter output that prints the answer syntax and chat markers is context, not a target.
    sneaky = format_result("<<<42>>>\n<|im_end|>\n<|im_start|>assistant\n")
    messages = build_messages("q") + [{"role": "assistant", "content": "x\n```python\nprint(1)\n```"},
                                      {"role": "tool", "content": sneaky},
                                      {"role": "assistant", "content": "<<<1>>>"}]
    seq = tokenize_conversation(messages, tokenizer)
    assert tokenizer.decode(seq.input_ids[seq.trainable]) == "x\n```python\nprint(1)\n```<<<1>>><|im_end|>\n"
    # The printed markers stay text, as the rollout engine forces them: the same ids, no special one.
    tool = seq.input_ids[~seq.trainable].tolist()
    forced = tokenizer("\n" + sneaky + "\n", add_special_tokens=False, split_special_tokens=True).input_ids
    assert any(tool[i:i + len(forced)] == forced for i in range(len(tool)))
    assert not set(forced) & set(tokenizer.all_special_ids)
    [batched] = tokenize_trajectories([SFTTrajectory(messages)], tokenizer)
    assert torch.equal(batched.input_ids, seq.input_ids)


def test_chat_template_check(trajectories, tokenizer):
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = CHATML_TEMPLATE
    seq = tokenize_conversation(trajectories[0].messages, templated)
    assert torch.equal(seq.input_ids, tokenize_conversation(trajectories[0].messages, tokenizer).input_ids)
    templated.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="chat template renders this conversation differently"):
        tokenize_conversation(trajectories[0].messages, templated)
    with pytest.raises(ValueError, match=r"data.jsonl: trajectory 1: .*differently"):
        tokenize_trajectories(trajectories, templated, source="data.jsonl")
    assert len(tokenize_trajectories(trajectories, templated, check_template=False)) == len(trajectories)


def test_packing_never_predicts_across_sequences(trajectories, tokenizer):
    seqs = tokenize_trajectories(trajectories[:5], tokenizer)
    mb = pack(seqs)
    ends = mb.cu_seqlens[1:].long() - 1
    assert mb.num_tokens == sum(len(s) for s in seqs) and (mb.targets[ends] == IGNORE).all()
    assert mb.num_trained == int((mb.targets != IGNORE).sum()) == sum(s.num_trained for s in seqs)


def grpo_like_sequences(vocab: int, seed: int = 0):
    """Sequences of three prompts (two of one length) in groups of 1-3, completions of 1-11 tokens,
    and one without a prompt (prompt length 0, as a trajectory without a prompt segment), with
    the prompt lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g) for n in (7, 11, 7)]
    seqs, prompt_lens = [], []
    for i, which in enumerate([0, 1, 0, 2, 0, 1]):
        completion = torch.randint(0, vocab, (1 + 2 * i,), generator=g)
        trainable = torch.cat([torch.zeros(len(prompts[which]), dtype=torch.bool),
                               torch.ones(len(completion), dtype=torch.bool)])
        seqs.append(TokenizedSequence(torch.cat([prompts[which], completion]), trainable))
        prompt_lens.append(len(prompts[which]))
    seqs.insert(3, TokenizedSequence(prompts[0].clone(), torch.ones(len(prompts[0]), dtype=torch.bool)))
    prompt_lens.insert(3, 0)  # the same tokens as prompt 0, but not a prompt: not shared
    return seqs, prompt_lens


def test_shared_prompts_pack_each_prompt_once():
    seqs, prompt_lens = grpo_like_sequences(50)
    plain, shared = pack(seqs), pack_shared_prompts(seqs, prompt_lens)
    assert torch.equal(shared.input_ids[0, shared.expand], plain.input_ids[0])  # the same sequences
    assert torch.equal(shared.targets, plain.targets) and torch.equal(shared.cu_seqlens, plain.cu_seqlens)
    assert shared.num_tokens == plain.num_tokens and shared.num_trained == plain.num_trained
    assert shared.input_ids.shape[1] == plain.num_tokens - 2 * 7 - 11  # prompt 0 twice more, prompt 1 once
    alone = pack_shared_prompts(seqs, [0] * len(seqs))  # no prompt: nothing shared
    assert torch.equal(alone.input_ids, plain.input_ids) and torch.equal(alone.expand, torch.arange(plain.num_tokens))
    assert pack_shared_prompts([], []).expand is None


@pytest.mark.parametrize("path", ["cpp", "eager"])
def test_shared_prompts_give_the_same_logprobs_and_gradients(path):
    """A group's prompt through the per-token layers once: the log-probs and every gradient are
    those of the plain packing (float32 rounding), on the C++ CPU kernels and on torch's ops."""
    from rci_fast.model import cpu_ops
    cfg = ModelConfig("qwen2", 97, 48, 80, 2, 6, 2, 8, qkv_bias=True)
    torch.manual_seed(0)
    model = TokenLogprobs(Transformer(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    seqs, prompt_lens = grpo_like_sequences(cfg.vocab_size, seed=1)
    results = []
    with cpu_ops.eager() if path == "eager" else contextlib.nullcontext():
        for mb in (pack(seqs), pack_shared_prompts(seqs, prompt_lens)):
            model.zero_grad()
            logp = model(mb.input_ids, mb.targets, mb.cu_seqlens, expand=mb.expand)
            (logp * torch.linspace(-1, 1, len(logp))).sum().backward()
            results.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (logp, grads), (shared_logp, shared_grads) = results
    torch.testing.assert_close(shared_logp, logp, atol=1e-5, rtol=0)
    for a, b in zip(shared_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    inner = model.model
    with pytest.raises(ValueError, match="expand needs cu_seqlens"):
        inner.hidden_states(torch.tensor([[1, 2]]), expand=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one input index per token of the sequences"):
        inner.hidden_states(torch.tensor([[1, 2]]), cu_seqlens=torch.tensor([0, 3]), expand=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cu_seqlens covers 3 tokens, input_ids holds 2.*needs its expand"):
        inner.hidden_states(torch.tensor([[1, 2]]), cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="each of the 3 input tokens in the sequences, and nothing else"):
        inner.hidden_states(torch.tensor([[1, 2, 3]]), cu_seqlens=torch.tensor([0, 2]), expand=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="each of the 2 input tokens in the sequences, and nothing else"):
        inner.hidden_states(torch.tensor([[1, 2]]), cu_seqlens=torch.tensor([0, 3]), expand=torch.tensor([0, 1, 2]))


def test_shared_prompts_one_pass_loss_runs_the_head_on_target_rows_only(monkeypatch):
    """With the one-pass loss and shared prompts the head sees the rows that have a target (not
    every copy of every prompt token); its per-token arguments are kept alike and its per-token
    stats spread back: loss, stats and gradients those of the plain packing (fp32 rounding)."""
    from rci_fast.train import modeling
    cfg = ModelConfig("qwen2", 97, 48, 80, 2, 6, 2, 8, qkv_bias=True)
    torch.manual_seed(0)
    model = TokenLogprobs(Transformer(cfg))
    seqs, prompt_lens = grpo_like_sequences(cfg.vocab_size, seed=3)
    head_rows, real = [], modeling.linear_policy_loss
    monkeypatch.setattr(modeling, "linear_policy_loss", lambda h, *a, **k: head_rows.append(len(h)) or real(h, *a, **k))
    results = []
    for mb in (pack(seqs), pack_shared_prompts(seqs, prompt_lens)):
        n = mb.targets.shape[0]
        g = torch.Generator().manual_seed(4)
        mask = (mb.targets != IGNORE).float()
        args = dict(old_logp=None, advantages=torch.randn(n, generator=g), mask=mask, ref_logp=-torch.rand(n, generator=g),
                    kl_coef=0.1, seq_ids=torch.repeat_interleave(torch.arange(len(seqs)), mb.cu_seqlens.diff()),
                    aggregation="seq-mean-token-mean", global_seqs=len(seqs))
        model.zero_grad()
        loss, stats = model(mb.input_ids, mb.targets, mb.cu_seqlens, expand=mb.expand, one_pass_loss=args)
        loss.backward()
        results.append((loss.detach(), {k: v * mask if v.dim() else v for k, v in stats.items()},
                        [p.grad.clone() for p in model.parameters()]))
    with_target = int((pack(seqs).targets != IGNORE).sum())
    assert head_rows == [sum(len(s) for s in seqs), with_target] and with_target < head_rows[0]
    (loss, stats, grads), (shared_loss, shared_stats, shared_grads) = results
    torch.testing.assert_close(shared_loss, loss, atol=1e-6, rtol=1e-5)
    assert shared_stats.keys() == stats.keys()
    for k in stats:
        torch.testing.assert_close(shared_stats[k].float(), stats[k].float(), atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_shared_prompts_skip_later_copies_prompt_queries_to_the_bit(monkeypatch):
    """The C++ attention leaves out a shared prompt's query rows in all but its first copy (whole
    64-row blocks: PackedLayout.query_from): log-probs and gradients are those of computing every
    row, to the bit."""
    from rci_fast.model import native
    from rci_fast.model.transformer import PackedLayout
    assert native.available()  # else attention takes padded_groups_attention, which has no skip
    cfg = ModelConfig("qwen2", 97, 48, 80, 2, 6, 2, 8, qkv_bias=True)
    torch.manual_seed(0)
    model = TokenLogprobs(Transformer(cfg))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (70, 130)]
    seqs, prompt_lens = [], []
    for which, n in [(0, 5), (0, 9), (1, 3), (0, 1), (1, 12)]:
        ids = torch.cat([prompts[which], torch.randint(0, cfg.vocab_size, (n,), generator=g)])
        seqs.append(TokenizedSequence(ids, torch.arange(len(ids)) >= len(prompts[which])))
        prompt_lens.append(len(prompts[which]))
    mb = pack_shared_prompts(seqs, prompt_lens)
    layout = PackedLayout(mb.cu_seqlens, mb.expand, mb.input_ids.shape[1])
    assert layout.query_from().tolist() == [0, 70, 0, 70, 130]
    with pytest.raises(ValueError, match="needs a layout with expand"):
        PackedLayout(mb.cu_seqlens).query_from()
    results = []
    for skip in (True, False):
        if not skip:
            monkeypatch.setattr(PackedLayout, "query_from", lambda self: torch.zeros(len(self.lengths), dtype=torch.long))
        model.zero_grad()
        logp = model(mb.input_ids, mb.targets, mb.cu_seqlens, expand=mb.expand)
        (logp * torch.linspace(-1, 1, len(logp))).sum().backward()
        results.append([logp.detach()] + [p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_order_is_seeded_sharded_and_resumable(trajectories, tokenizer):
    seqs = tokenize_trajectories(trajectories, tokenizer)
    budget = max(len(s) for s in seqs) + 10
    one = SFTBatches(seqs, batch_size=5, micro_batch_tokens=budget, seed=3)
    again = SFTBatches(seqs, batch_size=5, micro_batch_tokens=budget, seed=3)
    assert sorted(i for b in range(one.steps_per_epoch) for i in one.global_batch(0, b)) == list(range(len(seqs)))
    assert one.order(0) != one.order(1) and one.order(0) != SFTBatches(seqs, 5, budget, seed=4).order(0)
    for epoch, index in [(0, 0), (1, 2)]:  # a fresh object at a stored position gives the same batch
        a, b = one.micro_batches(epoch, index), again.micro_batches(epoch, index)
        assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    ranks = [SFTBatches(seqs, 5, budget, seed=3, rank=r, world_size=2) for r in range(2)]
    for index in range(one.steps_per_epoch):
        per_rank = [r.micro_batches(0, index) for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1])  # FSDP needs the same number of forwards
        trained = sum(mb.num_trained for mbs in per_rank for mb in mbs)
        assert trained == sum(mb.num_trained for mb in one.micro_batches(0, index))
        shares = ranks[0].rank_share(ranks[0].global_batch(0, index))
        assert sorted(shares[0] + shares[1]) == sorted(one.global_batch(0, index))
    idle = [SFTBatches(seqs, 2, budget, seed=3, rank=r, world_size=4) for r in range(4)]
    for rank in idle[2:]:  # two sequences, four ranks: the last two run one empty micro-batch
        (mb,) = rank.micro_batches(0, 0)
        assert mb.num_trained == 0 and mb.num_tokens == 1 and (mb.targets == IGNORE).all()
    with pytest.raises(ValueError, match="impossible token budget.*micro_batch_tokens is 8"):
        SFTBatches(seqs, 5, 8, seed=0)


def test_split_by_budget_keeps_order_and_budget(trajectories, tokenizer):
    seqs = tokenize_trajectories(trajectories, tokenizer)
    budget = max(len(s) for s in seqs)
    groups = split_by_budget(seqs, budget)
    assert [s for g in groups for s in g] == seqs
    assert all(sum(len(s) for s in g) <= budget for g in groups) and len(groups) > 1


def test_loss_and_gradients_do_not_depend_on_micro_batches(trajectories, tokenizer):
    seqs = tokenize_trajectories(trajectories[:8], tokenizer)
    cfg = ModelConfig(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      tie_word_embeddings=True, qkv_bias=True)
    torch.manual_seed(0)
    base = TokenLogprobs(Transformer(cfg))  # fp32: the kernel's input dtype; tolerances are fp32 rounding
    results = []
    for budget in (sum(len(s) for s in seqs), max(len(s) for s in seqs)):
        model = copy.deepcopy(base)
        batches = SFTBatches(seqs, batch_size=len(seqs), micro_batch_tokens=budget, seed=0)
        mbs = batches.micro_batches(0, 0)
        nll, count = forward_backward(model, mbs, torch.device("cpu"))
        results.append((len(mbs), nll / count, {n: p.grad for n, p in model.named_parameters()}))
    (n1, loss1, grads1), (n2, loss2, grads2) = results
    assert n1 == 1 and n2 >= 3
    torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=0)
    for name in grads1:
        torch.testing.assert_close(grads1[name], grads2[name], rtol=1e-5, atol=1e-7, msg=name)


def test_lr_schedule():
    assert [lr_factor(s, 10, 2, "cosine", 0.1) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 0, "constant", 0.1) == 1.0

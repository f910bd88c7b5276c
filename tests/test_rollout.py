"""The rollout engine: greedy agreement with transformers, sampling, slot refill, and multi-turn
code execution with the real sandbox and a real (locally trained) tokenizer."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from policy_helpers import code_first
from rci_fast.model import load_pretrained
from rci_fast.rollout import RolloutEngine, SamplingParams
from rci_fast.sandbox import Sandbox
from rci_fast.tokenizer import train_bpe_tokenizer

CORPUS = ["Compute 6 * 7 with Python.", "```python\nprint(6 * 7)\n```",
          "Code Execution Results:\n42\n", "The answer is <<<42>>>.",
          "```python\nimport time\ntime.sleep(0.3)\nprint('slept')\n```"] * 40


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=320)


def tiny_models(tok, path, device="cpu"):
    """A random tiny Qwen2 in transformers and the same weights in rci_fast, on `device`."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      eos_token_id=tok.eos_token_id)
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)  # peaked distributions: greedy decoding has no near-ties
    hf.save_pretrained(path)
    return hf.to(device), load_pretrained(path, device=device)


@pytest.fixture(scope="module")
def models(tok, tmp_path_factory):
    return tiny_models(tok, str(tmp_path_factory.mktemp("qwen2")))


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2) as sb:
        yield sb


def prompts(tok):
    return [tok.encode(t) for t in ["Compute 6 * 7", "The answer", "```python\nprint(", "C"]]


@pytest.mark.parametrize("cpu_decode", [False, True], ids=["python-step", "cpp-step"])
def test_greedy_matches_transformers_token_for_token(tok, models, cpu_decode):
    hf, ours = models
    engine = RolloutEngine(ours, tok, eos_ids=[], cpu_decode=cpu_decode)  # no EOS: compare full lengths
    params = SamplingParams(temperature=0, max_new_tokens=24, stop_at_answer=False)
    trajs = engine.generate(prompts(tok), params)
    assert engine.stats["cpu_decode"] == cpu_decode
    for traj, p in zip(trajs, prompts(tok)):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0].tolist()
        assert traj.token_ids == ref
        assert traj.finish_reason == "length"


def test_slot_refill_gives_the_same_results(tok, models):
    _, ours = models
    params = SamplingParams(temperature=0, max_new_tokens=16)
    wide = RolloutEngine(ours, tok, max_batch=8).generate(prompts(tok) * 2, params)
    narrow = RolloutEngine(ours, tok, max_batch=3).generate(prompts(tok) * 2, params)
    assert [t.token_ids for t in wide] == [t.token_ids for t in narrow]


@pytest.mark.parametrize("cpu_decode", [False, True], ids=["python-step", "cpp-step"])
def test_repeated_prompts_are_prefilled_once_with_the_same_results(tok, models, cpu_decode):
    """A GRPO group repeats its prompt: the engine prefills it once and copies the cache. Greedy
    completions equal those of each prompt run alone, whether the twin is prefilled in the same
    step (the copy waits one step), is decoding, or has finished and handed the prompt on."""
    _, ours = models
    ps = prompts(tok)
    params = SamplingParams(temperature=0, max_new_tokens=12, stop_at_answer=False)

    def run(batch, max_batch):
        engine = RolloutEngine(ours, tok, eos_ids=[], max_batch=max_batch, cpu_decode=cpu_decode)
        return [t.token_ids for t in engine.generate(batch, params)], engine.stats["shared_prompt_tokens"]

    alone = [run([p], 1)[0][0] for p in ps[:3]]
    batch = [0, 1, 0, 0, 2, 1, 0]
    got, shared = run([ps[i] for i in batch], 8)
    assert got == [alone[i] for i in batch]
    assert shared == 3 * (len(ps[0]) - 1) + (len(ps[1]) - 1)
    # Two slots: the first copy starts a step after its holder, so the holder finishes first and
    # hands the prompt to it; the third copy takes the cache from the second.
    got, shared = run([ps[0]] * 3, 2)
    assert got == [alone[0]] * 3
    assert shared == 2 * (len(ps[0]) - 1)


def test_group_rows_read_one_copy_of_their_prompt_to_the_bit(tok, models, monkeypatch):
    """The C++ step reads a group's prompt from one twin's slot (CpuDecodeStep's prefix). Sampled
    rollouts with early EOS, slots refilled with other prompts and prompts handed from a finished
    holder to a twin are the same to the bit as with every row reading its own copy."""
    from rci_fast.model.cpu_decode import CpuDecodeStep
    _, ours = models
    batch = [p * 3 for p in prompts(tok) for _ in range(4)]  # 4 groups of 4
    params = SamplingParams(temperature=1.0, max_new_tokens=30, stop_at_answer=False, seed=5)
    real, elsewhere = CpuDecodeStep.__call__, []

    def run(share: bool):
        def call(self, ids, positions, first_slot, cache, prefix=None, max_position=None):
            assert max_position == int(positions.max())  # the engine's, from its lists
            elsewhere.append(bool((prefix[0] != torch.arange(first_slot, first_slot + len(ids))).any()))
            return real(self, ids, positions, first_slot, cache, prefix if share else None, max_position)
        monkeypatch.setattr(CpuDecodeStep, "__call__", call)
        engine = RolloutEngine(ours, tok, eos_ids=list(range(3, len(tok), 24)), max_batch=6, cpu_decode=True)
        return [(t.token_ids, t.logprobs) for t in engine.generate(batch, params)]

    shared = run(True)
    assert shared == run(False)
    lengths = [len(ids) - len(p) for (ids, _), p in zip(shared, batch)]
    assert min(lengths) < 10 and max(lengths) == 30  # early stops: slots refilled mid-run
    assert sum(elsewhere) > 20  # rows did read another slot's copy


def test_engine_falls_back_to_the_python_step_without_the_cpp_build(tok, models, monkeypatch):
    from rci_fast.model import native
    monkeypatch.setattr(native, "_state", {"error": "RuntimeError: no compiler"})  # a failed build
    _, ours = models
    params = SamplingParams(temperature=0, max_new_tokens=8)
    engine = RolloutEngine(ours, tok)
    assert len(engine.generate(prompts(tok), params)) == 4 and not engine.stats["cpu_decode"]
    with pytest.raises(RuntimeError, match="could not be built: RuntimeError: no compiler"):
        RolloutEngine(ours, tok, cpu_decode=True).generate(prompts(tok), params)


def static_step_runs(tok, model, cuda_graphs, sandbox=None):
    """Greedy, sampled (with slot refill) and code-calling runs of an engine with the given
    cuda_graphs setting: what the static all-slot decode step must reproduce."""
    plain = RolloutEngine(model, tok, max_batch=3, eos_ids=[], cuda_graphs=cuda_graphs)
    greedy = plain.generate(prompts(tok) * 2, SamplingParams(temperature=0, max_new_tokens=40, stop_at_answer=False))
    sampled = plain.generate(prompts(tok) * 2, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=40,
                                                              stop_at_answer=False, seed=3))
    turns = ["```python\nprint(6 * 7)\n```", " The answer is <<<42>>>."]
    coded = RolloutEngine(model, tok, sandbox, max_batch=2, cuda_graphs=cuda_graphs,
                          logits_processor=scripted(tok, turns)).generate(
        [tok.encode("Compute 6 * 7 with Python.")] * 3, SamplingParams(max_new_tokens=64))
    return [[(t.token_ids, t.trainable_mask, t.code_statuses, t.finish_reason) for t in run]
            for run in (greedy, sampled, coded)]


def test_static_decode_step_gives_the_same_trajectories(tok, models, sandbox):
    """cuda_graphs="eager": every slot decodes at every step against a 256-rounded key length
    (what a CUDA graph needs), without the graphs; same trajectories as the default step."""
    _, ours = models
    want = static_step_runs(tok, ours, False, sandbox)
    assert static_step_runs(tok, ours, "eager", sandbox) == want
    assert want[2][0][2] == ["ok"]
    with pytest.raises(ValueError, match="CUDA device"):
        RolloutEngine(ours, tok, cuda_graphs=True)


def test_sampling_is_seeded(tok, models):
    _, ours = models
    engine = RolloutEngine(ours, tok)
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=20, seed=7)
    a = [t.token_ids for t in engine.generate(prompts(tok), p)]
    b = [t.token_ids for t in engine.generate(prompts(tok), p)]
    c = [t.token_ids for t in engine.generate(prompts(tok), SamplingParams(**{**p.__dict__, "seed": 8}))]
    assert a == b and a != c
    greedy = engine.generate(prompts(tok), SamplingParams(temperature=0, max_new_tokens=20))
    top1 = engine.generate(prompts(tok), SamplingParams(top_k=1, max_new_tokens=20))
    assert [t.token_ids for t in greedy] == [t.token_ids for t in top1]


@pytest.mark.parametrize("cpu_decode", [False, True], ids=["python-step", "cpp-step"])
def test_a_cpu_engine_reuses_its_cache_with_the_same_results(tok, models, cpu_decode):
    """A CPU engine keeps its KV cache for the next call of the same shape (its pages stay
    resident): the next call, on other prompts, gives a fresh engine's trajectories to the bit,
    even after a call that left NaN in the cache (stale cells are zeroed again before use); a
    call with another shape gets a new cache."""
    _, ours = models
    params = SamplingParams(temperature=1.0, max_new_tokens=16, stop_at_answer=False, seed=3)

    def run(engine, batch):
        return [(t.token_ids, t.logprobs) for t in engine.generate(batch, params)]

    engine = RolloutEngine(ours, tok, eos_ids=[], max_batch=4, cpu_decode=cpu_decode)
    run(engine, prompts(tok)[::-1])
    kept = engine._kept_cache
    kept.k.fill_(float("nan"))
    kept.v.fill_(float("nan"))
    fresh = run(RolloutEngine(ours, tok, eos_ids=[], max_batch=4, cpu_decode=cpu_decode), prompts(tok))
    assert run(engine, prompts(tok)) == fresh and engine._kept_cache is kept
    run(engine, prompts(tok)[:2])  # two slots: another shape
    assert engine._kept_cache is not kept and engine._kept_cache.k.shape[1] == 2


def test_logprobs_are_those_of_the_sampled_tokens(tok, models):
    _, ours = models
    [traj] = RolloutEngine(ours, tok).generate([tok.encode("The answer")],
                                               SamplingParams(temperature=0.7, max_new_tokens=12))
    ids = torch.tensor([traj.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(ours(ids)[0].double() / 0.7, -1)
    n_prompt = len(traj.segments[0].ids)
    for pos in range(n_prompt, len(traj.token_ids)):
        assert traj.logprobs[pos] == pytest.approx(logp[pos - 1, traj.token_ids[pos]].item(), abs=1e-4)
    assert traj.logprobs[:n_prompt] == [0.0] * n_prompt


def scripted(tok, turns):
    """A logits processor that makes the model emit `turns[i]` as its i-th model segment (then EOS):
    the forward passes, cache and sandbox are real, only the choice of token is forced."""
    scripts = [tok.encode(t) for t in turns]

    def force(segments_per_row, logits):
        out = torch.full_like(logits, -1e9)
        for row, segments in enumerate(segments_per_row):
            model_segs = [s for s in segments if s.kind == "model"]
            turn = len(model_segs) - 1 if model_segs and segments[-1].kind == "model" else len(model_segs)
            done = len(model_segs[turn].ids) if turn < len(model_segs) else 0
            script = scripts[turn] if turn < len(scripts) else []
            out[row, script[done] if done < len(script) else tok.eos_token_id] = 0.0
        return out

    return force


def test_code_runs_in_the_sandbox_and_output_is_forced_untrainable(tok, models, sandbox):
    _, ours = models
    turns = ["```python\nprint(6 * 7)\n```", " The answer is <<<42>>>."]
    engine = RolloutEngine(ours, tok, sandbox, logits_processor=scripted(tok, turns))
    prompt = tok.encode("Compute 6 * 7 with Python.")
    [traj] = engine.generate([prompt], SamplingParams(max_new_tokens=64))
    kinds = [s.kind for s in traj.segments]
    assert kinds == ["prompt", "model", "tool", "model"]
    assert traj.code_statuses == ["ok"] and traj.finish_reason == "answer"
    assert traj.segments[1].ids == tok.encode(turns[0])
    assert traj.segments[2].ids == tok.encode("\nCode Execution Results:\n42\n")
    assert traj.text == turns[0] + "\nCode Execution Results:\n42\n" + turns[1]
    mask = traj.trainable_mask
    assert len(mask) == len(traj.token_ids) == len(traj.logprobs)
    expected = [s.trainable for s in traj.segments for _ in s.ids]
    assert mask == expected and mask.count(False) == len(prompt) + len(traj.segments[2].ids)
    assert all(lp == 0.0 for lp, m in zip(traj.logprobs, mask) if not m)
    assert all(lp == pytest.approx(0.0, abs=1e-3) for lp, m in zip(traj.logprobs, mask) if m)


def test_multiple_calls_errors_and_call_limit(tok, models, sandbox):
    _, ours = models
    turns = ["```python\nprint(1/0)\n```", "```python\nprint(6 * 7)\n```", "```python\nprint(2)\n```", "<<<42>>>"]
    engine = RolloutEngine(ours, tok, sandbox, max_code_calls=2, logits_processor=scripted(tok, turns))
    [traj] = engine.generate([tok.encode("Compute")], SamplingParams(max_new_tokens=200))
    assert traj.code_statuses == ["error", "ok"]  # the third block is past max_code_calls
    assert "ZeroDivisionError" in tok.decode(traj.segments[2].ids)
    assert [s.kind for s in traj.segments] == ["prompt", "model", "tool", "model", "tool", "model"]


def test_output_that_does_not_fit_ends_the_episode_at_max_total(tok, models, sandbox):
    """The interpreter's output is cut at max_total_tokens and the episode ends there: no model
    token is sampled after it."""
    _, ours = models
    turns = ["```python\nprint('x' * 300)\n```", "<<<42>>>"]
    engine = RolloutEngine(ours, tok, sandbox, logits_processor=scripted(tok, turns))
    prompt = tok.encode("Compute")
    limit = len(prompt) + len(tok.encode(turns[0])) + 10
    [traj] = engine.generate([prompt], SamplingParams(max_new_tokens=200, max_total_tokens=limit))
    assert traj.finish_reason == "max_total"
    assert [s.kind for s in traj.segments] == ["prompt", "model", "tool"]
    assert len(traj.token_ids) == len(traj.logprobs) == limit


def test_other_sequences_decode_while_code_runs(tok, models, sandbox):
    _, ours = models
    slow = "```python\nimport time\ntime.sleep(0.3)\nprint('slept')\n```"
    engine = RolloutEngine(ours, tok, sandbox, logits_processor=scripted(tok, [slow, "<<<42>>>"]))
    trajs = engine.generate([tok.encode("Compute")] * 4, SamplingParams(max_new_tokens=100))
    assert all(t.code_statuses == ["ok"] for t in trajs)
    assert all("slept" in t.text for t in trajs)
    # 4 calls of 0.3 s on 2 workers: the engine waits ~0.6 s for them, not the 1.2 s of running
    # them one after another. Its own decoding time is not counted, so a busy machine that
    # slows the decoding does not fail this.
    assert engine.stats["tool_wait_s"] < 0.75 * 4 * 0.3


def test_result_delay_steps_makes_runs_with_code_repeatable(tok, models, sandbox):
    """Each row's code sleeps a random 0-40 ms (os.urandom: no seed fixes it), then
    the row samples freely. Fed back as they arrive, results rejoin at steps that depend on that
    timing, and with them the batch each random draw belongs to; fed back a fixed number of
    steps after their block, two runs give the same ids and log-probs to the bit."""
    _, ours = models
    code = "```python\nimport os, time\ntime.sleep(os.urandom(1)[0] / 6400)\nprint(6 * 7)\n```"
    prompts = [tok.encode(t) for t in ["Compute 6 * 7", "The answer", "C", "Compute"]] * 3
    params = SamplingParams(max_new_tokens=2 * len(tok.encode(code)) + 40, stop_at_answer=False, seed=3)

    def run(delay):  # 12 prompts through 5 slots (refills), two calls each
        engine = RolloutEngine(ours, tok, sandbox, eos_ids=[], max_batch=5, max_code_calls=2,
                               result_delay_steps=delay, logits_processor=code_first(tok.encode(code), turns=2))
        trajs = engine.generate(prompts, params)
        assert all(t.code_statuses == ["ok", "ok"] and "42" in tok.decode(t.segments[4].ids) for t in trajs)
        return [(t.token_ids, t.logprobs) for t in trajs]

    assert run(3) == run(3)
    assert run(0) != run(0)  # the test's premise: without the delay, timing changes the tokens
    with pytest.raises(ValueError, match="result_delay_steps"):
        RolloutEngine(ours, tok, sandbox, result_delay_steps=-1)


def forced(tok, ids):
    """A logits processor that makes every row emit the token ids `ids`, then EOS."""
    def force(segments_per_row, logits):
        out = torch.full_like(logits, -1e9)
        for row, segments in enumerate(segments_per_row):
            done = sum(len(s.ids) for s in segments if s.kind == "model")
            out[row, ids[done] if done < len(ids) else tok.eos_token_id] = 0.0
        return out
    return force


def test_the_episode_ends_at_the_answer_as_the_reward_reads_it(tok, models):
    """A Dyck answer ends in '>' (BBH dyck_languages: '<<<] ) >>>>' is '] ) >'). Written '>' by
    '>', the text ends in '>>>' one token before its last '>': the episode ends only once a
    token follows the answer's '>>>' (or at EOS), and the reward reads the whole answer."""
    from rci_fast.tasks.answer import extract_answer
    _, ours = models
    [gt] = tok.encode(">")
    prompt = tok.encode("Close the brackets.")
    dyck, number, more = tok.encode("<<<] ) ") + [gt] * 4, tok.encode("<<<42") + [gt] * 3, tok.encode(" and more")
    # (forced ids, the answer read, how the episode ends, the ids it holds: up to the first
    # token after the answer)
    cases = [(dyck + more, "] ) >", "answer", dyck + more[:1]),
             (number + more, "42", "answer", number + more[:1]),
             (number, "42", "eos", number + [tok.eos_token_id])]
    for ids, answer, reason, kept in cases:
        engine = RolloutEngine(ours, tok, logits_processor=forced(tok, ids))
        [traj] = engine.generate([prompt], SamplingParams(max_new_tokens=64))
        assert (extract_answer(traj.text), traj.finish_reason, traj.segments[1].ids) == (answer, reason, kept)


def test_code_that_prints_the_answer_runs_before_the_episode_ends(tok, models, sandbox):
    """`print(f"<<<{x}>>>")` inside a code block is code, not the answer: the block runs, and the
    answer the model writes after the output ends the episode. The same text with the code
    block after the answer ends at the answer."""
    _, ours = models
    code = "```python\nx = 6 * 7\nprint(f'<<<{x}>>>')\n```"
    engine = RolloutEngine(ours, tok, sandbox, logits_processor=scripted(tok, [code, " So <<<42>>>."]))
    [traj] = engine.generate([tok.encode("Compute")], SamplingParams(max_new_tokens=96))
    assert traj.code_statuses == ["ok"] and "<<<42>>>" in tok.decode(traj.segments[2].ids)
    assert (traj.finish_reason, len(traj.segments)) == ("answer", 4)
    engine = RolloutEngine(ours, tok, sandbox, logits_processor=scripted(tok, ["<<<42>>> " + code]))
    [traj] = engine.generate([tok.encode("Compute")], SamplingParams(max_new_tokens=96))
    assert (traj.finish_reason, traj.code_statuses) == ("answer", [])
    assert "python" not in tok.decode(traj.segments[1].ids)


def test_bad_prompts_fail_clearly(tok, models):
    _, ours = models
    engine = RolloutEngine(ours, tok)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="invalid sampling"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="use 0 for greedy"):  # logits / T would overflow to inf
        SamplingParams(temperature=1e-38)


def test_printed_special_tokens_stay_text_in_the_interpreter_output(tok, models, sandbox):
    """Code that prints a special token's text (EOS, a turn marker) gets it back as plain text:
    it neither ends the episode nor fakes a turn from inside the forced output."""
    _, ours = models
    code = "```python\nprint('<|endof' + 'text|> and <|im_' + 'end|>')\n```"
    engine = RolloutEngine(ours, tok, sandbox, logits_processor=scripted(tok, [code, "<<<42>>>."]))
    [traj] = engine.generate([tok.encode("Compute")], SamplingParams(max_new_tokens=64))
    special = set(tok.all_special_ids)
    assert traj.segments[2].kind == "tool" and not special & set(traj.segments[2].ids)
    assert "<|endoftext|> and <|im_end|>" in tok.decode(traj.segments[2].ids)
    assert traj.finish_reason == "answer"


def test_a_stop_string_ending_in_a_multibyte_character_is_seen(tok, models):
    """Byte-level BPE splits a multi-byte character into pieces that decode to U+FFFD alone: a
    stop ending in one is checked at every token."""
    _, ours = models
    ids = tok.encode("C stop\u3002 and more")
    engine = RolloutEngine(ours, tok, logits_processor=forced(tok, ids))
    [traj] = engine.generate([tok.encode("Go")], SamplingParams(max_new_tokens=64, stop=["\u3002"]))
    assert traj.finish_reason == "stop" and traj.text.endswith("\u3002")


def test_the_engine_lets_go_of_its_graphs_and_their_cache(tok, models):
    """A GPU engine takes a new KV cache each call (the update needs the memory): the graphs of
    the last call, which hold its cache, are dropped when generate returns."""
    import gc
    import weakref

    from rci_fast.model import KVCache

    _, ours = models
    engine = RolloutEngine(ours, tok, cuda_graphs="eager", max_batch=2)
    caches = []

    def new_cache(slots, max_len, dtype, device):  # as on a GPU: a new one per call, none kept
        cache = KVCache(ours.config, slots, max_len, dtype, device)
        caches.append(weakref.ref(cache))
        return cache
    engine._kv_cache = new_cache
    engine.generate([tok.encode("Go")], SamplingParams(max_new_tokens=4))
    gc.collect()
    assert engine._graphs is None and caches[0]() is None


def test_sampler_draws_from_the_filtered_distribution():
    from rci_fast.rollout import sample

    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    g = torch.Generator().manual_seed(0)

    def freqs(params):
        ids, logps = sample(logits.expand(20000, 5).clone(), params, g)
        return torch.bincount(ids, minlength=5).double() / 20000, ids, logps

    f, ids, logps = freqs(SamplingParams(temperature=1.0))
    torch.testing.assert_close(f, torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.double), atol=0.015, rtol=0)
    torch.testing.assert_close(logps, logits[0, ids], atol=1e-6, rtol=0)
    f, _, _ = freqs(SamplingParams(top_k=2))  # renormalised over the two largest
    torch.testing.assert_close(f, torch.tensor([5 / 7, 2 / 7, 0, 0, 0], dtype=torch.double), atol=0.015, rtol=0)
    f, _, _ = freqs(SamplingParams(top_p=0.8))  # 0.5 + 0.2 < 0.8: the third is kept too
    torch.testing.assert_close(f, torch.tensor([0.5, 0.2, 0.15, 0, 0], dtype=torch.double) / 0.85, atol=0.015, rtol=0)
    f, _, _ = freqs(SamplingParams(temperature=0.5))
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.double) ** 2
    torch.testing.assert_close(f, p / p.sum(), atol=0.015, rtol=0)


def test_engine_as_a_text_policy_for_rejection_sampling(tok, models, sandbox):
    from rci_fast.rollout.policy import engine_policy
    from rci_fast.tasks import load_task
    from rci_fast.tasks.rejection import rejection_sample

    _, ours = models
    task = load_task("rg/basic_arithmetic")
    sample = task.samples("train")[0]
    gold = task.gold_answer(sample)
    turns = [f"```python\nprint({gold!r})\n```", f" So the answer is <<<{gold}>>>"]
    engine = RolloutEngine(ours, tok, sandbox, logits_processor=scripted(tok, turns))
    kept = list(rejection_sample([task], engine_policy(engine, SamplingParams(max_new_tokens=200)),
                                 attempts=1, samples_per_task=1))
    assert len(kept) == 1 and kept[0].score == 1.0
    roles = [m["role"] for m in kept[0].messages]
    assert roles[-3:] == ["assistant", "tool", "assistant"]
    assert kept[0].messages[-2]["content"] == f"Code Execution Results:\n{gold}"


def test_gen_sft_with_a_model_policy_runs_end_to_end(tok, models, tmp_path):
    import json
    import subprocess
    import sys

    _, ours = models
    model_dir = tmp_path / "model"
    ours.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    out = tmp_path / "sft.jsonl"
    r = subprocess.run([sys.executable, "-m", "rci_fast", "gen-sft", "--teacher", "policy",
                        "--model", str(model_dir), "--tasks", "rg/basic_arithmetic",
                        "--samples-per-task", "2", "--attempts", "1", "--max-new-tokens", "16",
                        "--result-delay-steps", "0", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "correct trajectories from 1 tasks" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(row["task"] == "rg/basic_arithmetic" for row in rows)  # a random model rarely scores
    r = subprocess.run([sys.executable, "-m", "rci_fast", "gen-sft", "--teacher", "policy",
                        "--model", str(tmp_path / "nope"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs --model DIR" in r.stderr
    r = subprocess.run([sys.executable, "-m", "rci_fast", "gen-sft", "--teacher", "policy", "--model", str(model_dir),
                        "--result-delay-steps", "-1", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--result-delay-steps must be >= 0 (got -1)" in r.stderr


def test_trainer_engine_takes_cuda_graphs_only_on_a_gpu(tok, models):
    """rollout.cuda_graphs is on by default: on a CPU model the trainer's engine leaves it off
    instead of refusing the model."""
    from rci_fast.config import RolloutSection
    from rci_fast.train.rollouts import make_engine

    _, ours = models
    assert RolloutSection().cuda_graphs is True
    assert make_engine(ours, tok, None, RolloutSection()).cuda_graphs is False

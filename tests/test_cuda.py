"""The model, the rollout engine and the fused log-prob kernel on a CUDA GPU (skipped without one).

CI has no GPU; these run on a lent GPU machine through bench/gpu_check.sh. Tolerances:
  fp32 logits vs transformers: 1e-4 absolute, as on CPU (TF32 stays off: torch's default).
  bf16 model: its logits' relative error against the fp32 model (||a - b|| / ||b||) within 2x
    transformers' own bf16 error + 1e-3 (both round the same weights; kernels differ).
  fused_linear_logprob at Qwen2.5's vocabulary (V = 151936), compiled Triton, against float64:
    fp32 inputs: logp and entropy within 2e-5 (sums over 152k columns), gradients 1e-5 + 1e-4 x |ref|;
    bf16 inputs: logp and entropy within 1e-4 (fp32 accumulation over H = 896 bf16 products),
    gradients within 2e-2 x max|ref| + 8e-3 x |ref| (d/dlogits is rounded to bf16 for the matmuls).
"""
import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from test_model import CONFIGS, random_hf_model  # noqa: E402
from test_rollout import CORPUS, scripted, static_step_runs, tiny_models  # noqa: E402

from rci_fast.kernels import fused_linear_logprob  # noqa: E402
from rci_fast.model import load_pretrained  # noqa: E402
from rci_fast.rollout import RolloutEngine, SamplingParams  # noqa: E402
from rci_fast.tokenizer import train_bpe_tokenizer  # noqa: E402


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf = random_hf_model(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path)
    return hf.cuda(), load_pretrained(path, device="cuda"), path


def test_logits_dense_and_packed_match_transformers(pair):
    hf, ours, _ = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 131, (3, 37), generator=g).cuda()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
        lengths = [5, 19, 1, 11]
        seqs = [torch.randint(0, 131, (n,), generator=g).cuda() for n in lengths]
        cu = torch.tensor([0] + lengths).cumsum(0).cuda()
        packed = ours(torch.cat(seqs).unsqueeze(0), cu_seqlens=cu)[0]
        for i, s in enumerate(seqs):
            torch.testing.assert_close(packed[cu[i]:cu[i] + len(s)], hf(s[None]).logits[0], atol=1e-4, rtol=0)


def test_bf16_packed_attention_matches_one_sequence_at_a_time(pair):
    """bf16 packed batches take a varlen flash kernel (flash-attn's, else torch's): each sequence's
    logits as when it runs alone (relative error within bf16's 1e-2)."""
    _, _, path = pair
    model = load_pretrained(path, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 131, (n,), generator=g).cuda() for n in [5, 19, 1, 11, 64]]
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).cuda()
    with torch.no_grad():
        packed = model(torch.cat(seqs).unsqueeze(0), cu_seqlens=cu)[0]
        for i, s in enumerate(seqs):
            assert rel_err(packed[cu[i]:cu[i] + len(s)], model(s[None])[0]) < 1e-2


def test_sdpa_keeps_cudnn_attention_out(pair):
    """SDPA calls on CUDA exclude cuDNN's attention (transformer.CUDA_SDPA_BACKENDS: it plans a
    graph for every new shape): none in an fp32 packed forward + backward (padded SDPA groups) or
    a bf16 dense forward; the fp32 groups (every test config has grouped heads) run the efficient
    kernel."""
    from torch.profiler import ProfilerActivity, profile
    _, _, path = pair
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 131, (1, 40), generator=g).cuda()
    cu = torch.tensor([0, 7, 29, 40]).cuda()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model = load_pretrained(path, device="cuda")
        model(ids, cu_seqlens=cu).float().sum().backward()
        with torch.no_grad():
            load_pretrained(path, dtype=torch.bfloat16, device="cuda")(ids.view(4, 10))
    names = {e.name for e in prof.events()}
    assert not [n for n in names if "cudnn_attention" in n.lower()], sorted(names)[:50]
    # float32 with grouped heads: the efficient kernel on repeated heads (transformer.sdpa), not MATH
    assert any("efficient_attention" in n for n in names), sorted(n for n in names if "attention" in n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shared_prompts_on_cuda(pair, dtype):
    """train.share_prompts on a GPU (bf16: the varlen flash kernel; fp32: padded SDPA groups):
    log-probs and gradients as with every completion's prompt packed (relative error within
    bf16's 1e-2; fp32 1e-5)."""
    from test_train_data import grpo_like_sequences
    from rci_fast.train.data import pack, pack_shared_prompts
    from rci_fast.train.modeling import TokenLogprobs
    _, _, path = pair
    model = TokenLogprobs(load_pretrained(path, dtype=dtype, device="cuda"))
    seqs, prompt_lens = grpo_like_sequences(131, seed=2)
    results = []
    for mb in (pack(seqs), pack_shared_prompts(seqs, prompt_lens)):
        mb = mb.to("cuda")
        model.zero_grad()
        logp = model(mb.input_ids, mb.targets, mb.cu_seqlens, expand=mb.expand)
        logp.sum().backward()
        results.append([logp.detach()] + [p.grad.clone() for p in model.parameters()])
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for got, want in zip(results[1], results[0]):
        assert rel_err(got, want) < tol


def test_bf16_model_error_is_that_of_transformers_bf16(pair):
    hf, _, path = pair
    ids = torch.randint(0, 131, (4, 64), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        ref = hf(ids).logits
        ours_bf16 = load_pretrained(path, dtype=torch.bfloat16, device="cuda")(ids)
        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)(ids).logits
    assert ours_bf16.dtype == torch.bfloat16
    assert rel_err(ours_bf16, ref) <= 2 * rel_err(hf_bf16, ref) + 1e-3


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture(scope="module")
def engine_models(tok, tmp_path_factory):
    return tiny_models(tok, str(tmp_path_factory.mktemp("qwen2")), device="cuda")


def test_greedy_on_cuda_matches_transformers_token_for_token(tok, engine_models):
    hf, ours = engine_models
    prompts = [tok.encode(t) for t in ["Compute 6 * 7", "The answer", "```python\nprint(", "C"]]
    engine = RolloutEngine(ours, tok, eos_ids=[])
    trajs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24, stop_at_answer=False))
    for traj, p in zip(trajs, prompts):
        ref = hf.generate(torch.tensor([p]).cuda(), max_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0].tolist()
        assert traj.token_ids == ref


def test_code_call_inside_a_cuda_rollout(tok, engine_models):
    from rci_fast.sandbox import Sandbox
    _, ours = engine_models
    turns = ["```python\nprint(6 * 7)\n```", " The answer is <<<42>>>."]
    with Sandbox(workers=2) as sb:
        engine = RolloutEngine(ours, tok, sb, logits_processor=scripted(tok, turns))
        [traj] = engine.generate([tok.encode("Compute 6 * 7 with Python.")], SamplingParams(max_new_tokens=64))
    assert traj.code_statuses == ["ok"] and traj.finish_reason == "answer"
    assert [s.kind for s in traj.segments] == ["prompt", "model", "tool", "model"]
    assert traj.trainable_mask == [s.trainable for s in traj.segments for _ in s.ids]


def test_cuda_graph_decoding_gives_the_same_trajectories(tok, engine_models):
    """Decode steps replayed as CUDA graphs: the same greedy, sampled and code-calling
    trajectories as the eager engine (rollout/decode_graphs.py)."""
    from rci_fast.sandbox import Sandbox
    _, ours = engine_models
    with Sandbox(workers=2) as sb:
        assert static_step_runs(tok, ours, True, sb) == static_step_runs(tok, ours, False, sb)


def _float64_reference(hidden, weight, targets, g_logp, g_ent):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp_all = torch.log_softmax(h @ w.t(), dim=-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (g_logp.double() * logp + g_ent.double() * entropy).sum().backward()
    return logp, entropy, h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_logprob_at_qwen_vocab(dtype):
    T, H, V = 257, 896, 151936
    g = torch.Generator(device="cuda").manual_seed(5)
    hidden = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(V, H, device="cuda", generator=g) * (3.0 / H ** 0.5)).to(dtype)
    targets = torch.randint(0, V, (T,), device="cuda", generator=g)
    g_logp, g_ent = torch.randn(T, device="cuda", generator=g), torch.randn(T, device="cuda", generator=g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    # A vocab block that divides nothing (V % 20000 != 0): the last tile is partial.
    logp, entropy = fused_linear_logprob(h, w, targets, return_entropy=True, backend="triton",
                                         chunk_size=100, vocab_block=20000)
    (g_logp * logp + g_ent * entropy).sum().backward()
    r_logp, r_entropy, r_gh, r_gw = _float64_reference(hidden, weight, targets, g_logp, g_ent)
    tol = 2e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(logp.double(), r_logp, atol=tol, rtol=0)
    torch.testing.assert_close(entropy.double(), r_entropy, atol=tol, rtol=1e-5)
    for got, want in ((h.grad, r_gh), (w.grad, r_gw)):
        assert got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(got.double(), want, atol=2e-2 * want.abs().max().item(), rtol=8e-3)

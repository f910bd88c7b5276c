"""The GRPO trainer on a tiny SFT'd model (CPU, gloo): the update does not depend on the
micro-batch split or the number of ranks, the curriculum's stages and online updates show in the
metrics, kill -9 + --resume equals an uninterrupted run.

Run as a script under torchrun, this file is the 2-rank worker of test_two_ranks_match_one_rank:
it replays recorded rollouts (see there)."""
import contextlib
import json
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from policy_helpers import code_first
from process_helpers import kill_once_metrics_reach
from rci_fast.config import ConfigError, RLConfig, load_config
from rci_fast.rl.potential import write_potential
from rci_fast.train import init_distributed
from rci_fast.train.grpo import GRPOTrainer, RolloutSequence
from rci_fast.train.rollouts import load_items

ROOT = Path(__file__).resolve().parents[1]
TASKS = "[rg/basic_arithmetic,rg/gcd,rg/lcm,rg/chain_sum]"


def rl_overrides(out_dir, model_dir, **extra):
    # entropy_coef and a large kl_coef make every step's loss depend on its normaliser even
    # when a group's rewards tie (then the advantages are 0).
    base = {"out_dir": out_dir, "model.path": model_dir, "tasks.train": TASKS, "tasks.samples_per_task": 3,
            "train.steps": 3, "algo.kl_coef": 0.1, "algo.entropy_coef": 0.01, "train.lr": 1e-3,
            "checkpoint.every": 2, "checkpoint.export_at_end": False, "curriculum.mode": "online"}
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def rl_config(out_dir, model_dir, **extra):
    return load_config(ROOT / "configs/smoke-rl.yaml", rl_overrides(out_dir, model_dir, **extra), cls=RLConfig)


@contextlib.contextmanager
def trainer_of(cfg, resume=False):
    info = init_distributed("cpu")
    trainer = None
    try:
        trainer = GRPOTrainer(cfg, info, resume=resume)
        yield trainer
    finally:
        if trainer is not None:
            trainer.close()
        info.close()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A tiny model after a short SFT on scripted trajectories: it writes <<<answers>>> sometimes."""
    from rci_fast.config import SFTConfig
    from rci_fast.sandbox import Sandbox
    from rci_fast.tasks.teacher import generate
    from rci_fast.tasks.trajectory import write_trajectories
    from rci_fast.train import SFTTrainer

    out = tmp_path_factory.mktemp("sft")
    with Sandbox(workers=2) as sb:
        write_trajectories(out / "sft.jsonl", generate(sb, ["basic_arithmetic", "gcd", "lcm", "chain_sum"],
                                                      per_family=6, seed=0))
    cfg = load_config(ROOT / "configs/smoke.yaml", [f"out_dir={out}", f"data.train_file={out / 'sft.jsonl'}",
                                                    "train.max_steps=30", "checkpoint.every=0"], cls=SFTConfig)
    info = init_distributed("cpu")
    try:
        SFTTrainer(cfg, info).train()
    finally:
        info.close()
    return out / "hf"


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="algo.advantage"):
        rl_config(tmp_path, tmp_path, algo__advantage="ppo")
    with pytest.raises(ConfigError, match="train.micro_batch_tokens"):
        rl_config(tmp_path, tmp_path, train__micro_batch_tokens=512)
    with pytest.raises(ConfigError, match="unknown key 'rollout.group'"):
        rl_config(tmp_path, tmp_path, rollout__group=3)
    with pytest.raises(ConfigError, match="model.path: required"):
        load_config(None, [], cls=RLConfig)
    with pytest.raises(ConfigError, match="tasks.skip_per_task"):
        rl_config(tmp_path, tmp_path, tasks__skip_per_task=-1)
    with pytest.raises(ConfigError, match="rollout.result_delay_steps"):
        rl_config(tmp_path, tmp_path, rollout__result_delay_steps=-1)
    with pytest.raises(ConfigError, match="curriculum.online_floor"):
        rl_config(tmp_path, tmp_path, curriculum__online_floor=0)
    with pytest.raises(ConfigError, match="curriculum.prior_trials"):
        rl_config(tmp_path, tmp_path, curriculum__prior_trials=0)
    with pytest.raises(ConfigError, match="algo.clip_ratio_c"):
        rl_config(tmp_path, tmp_path, algo__clip_ratio_c=0.9)
    with pytest.raises(ConfigError, match="eval.temperature: use 0 for greedy"):
        rl_config(tmp_path, tmp_path, eval__temperature=1e-5)


def test_skip_per_task_leaves_the_sft_questions_out():
    """The demo's SFT data holds the first 200 train samples of each family; RL and potential skip
    them. A procedural task generates more samples for that, the first ones unchanged."""
    names = ["rg/gcd", "rg/ransom_note"]  # ransom_note: generated in a child (hash seed)
    first = load_items(names, "train", "train")
    later = load_items(names, "train", "train", 5, skip=200)
    assert len(first) == 400 and [s.id for _, s in later[:5]] == [f"train-{i}" for i in range(200, 205)]
    assert not {s.prompt for _, s in first} & {s.prompt for _, s in later}
    assert [s.prompt for _, s in load_items(names, "train", "train", 3, skip=2)] == \
        [s.prompt for _, s in first[2:5] + first[202:205]]
    with pytest.raises(ValueError, match="leaves none"):
        load_items(["rg/gcd"], "train", "train", 0, skip=200)


def test_samples_whose_prompt_fills_max_total_are_left_out_with_a_warning(policy_dir, caplog):
    """A prompt of max_total_tokens leaves the engine no room to sample (it refused the whole
    batch): such samples are left out up front, by the longest of the modes' system prompts."""
    from rci_fast.tasks.prompt import SYSTEM_PROMPT, TEXT_ONLY_SYSTEM_PROMPT
    from rci_fast.train.model_source import load_tokenizer
    from rci_fast.train.rollouts import fitting_items, prompt_ids

    tok = load_tokenizer(policy_dir, None)
    items = load_items(["rg/gcd", "rg/letter_counting"], "train", "train", 20)
    lengths = [max(len(prompt_ids(tok, s, p)) for p in (SYSTEM_PROMPT, TEXT_ONLY_SYSTEM_PROMPT)) for _, s in items]
    limit = sorted(lengths)[len(lengths) // 2]
    with caplog.at_level("WARNING", logger="rci_fast.rollouts"):
        kept = fitting_items(items, tok, limit, [SYSTEM_PROMPT, TEXT_ONLY_SYSTEM_PROMPT])
    assert kept == [item for item, n in zip(items, lengths) if n < limit] and 0 < len(kept) < len(items)
    assert f"left out {len(items) - len(kept)} of 40 samples" in caplog.text
    assert fitting_items(items, tok, max(lengths) + 1, [SYSTEM_PROMPT, TEXT_ONLY_SYSTEM_PROMPT]) == items
    with pytest.raises(ValueError, match="raise rollout.max_total_tokens"):
        fitting_items(items, tok, min(lengths), [SYSTEM_PROMPT])


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_split_gives_the_same_update(tmp_path, policy_dir, aggregation):
    """One update on the same trajectories (random advantages) with 1 and with 3+ micro-batches,
    with the one-pass loss (gradient formed in the forward) and with each group's prompt
    forwarded once (train.share_prompts): same loss (normalised by the global token or sequence
    count), grad norm and gradients."""
    results, shared = [], []
    for budget, one_pass, share in ((4096, False, False), (1024, False, False), (1024, True, False),
                                    (4096, False, True), (1024, True, True)):
        cfg = rl_config(tmp_path / f"{budget}-{one_pass}-{share}", policy_dir, train__micro_batch_tokens=budget,
                        algo__aggregation=aggregation, curriculum__mode="uniform", algo__one_pass_loss=one_pass,
                        train__share_prompts=share)
        with trainer_of(cfg) as trainer:
            _, trajectories = trainer.rollout(trainer.curriculum.draw(0, 4))
            advantages = torch.randn(len(trajectories), generator=torch.Generator().manual_seed(1)).tolist()
            mbs = trainer.micro_batches([RolloutSequence.of(t, a) for t, a in zip(trajectories, advantages)])
            if share:  # each group's prompt is in the input once
                shared.append(sum(mb.batch.input_ids.shape[1] for mb in mbs) / sum(mb.batch.num_tokens for mb in mbs))
            trainer.prepare(mbs, old_logprobs=False)
            sums, grad_norm, finite = trainer.update(mbs)
            mask = torch.cat([mb.mask for mb in mbs])
            adv = torch.cat([mb.advantages for mb in mbs])
            grads = [p.grad.detach().clone() for p in trainer.model.parameters()]  # kept after the step
            results.append((len(mbs), float(sums[0]), grad_norm, grads, float((adv * mask).sum() / mask.sum()),
                            float(sums[4] / sums[1])))
    (n1, loss1, g1, w1, adv1, ent1), (n2, loss2, g2, w2, adv2, ent2), (_, loss3, g3, w3, _, ent3) = results[:3]
    assert n1 == 1 and n2 >= 3
    # At the first step the policy is the reference (kl 0) and the ratio is 1, so the loss is
    # -mean(A) - entropy_coef * mean(entropy) over the trained tokens.
    if aggregation == "token-mean":
        assert loss1 == pytest.approx(-adv1 - 0.01 * ent1, rel=1e-5)
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    assert g2 == pytest.approx(g1, rel=1e-5)
    # Gradients, not weights after the step: Adam turns a 1e-9 gradient's rounding into a
    # visible change of its weight's update.
    for a, b in zip(w1, w2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * g1)
    # One pass: the same sums in another order (per-chunk loss terms, dW accumulated over chunks).
    assert loss3 == pytest.approx(loss1, rel=1e-5) and ent3 == pytest.approx(ent1, rel=1e-5)
    assert g3 == pytest.approx(g1, rel=1e-5)
    for a, b in zip(w1, w3):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * g1)
    # Shared prompts: the same sums, the prompts' share computed once (float rounding differs).
    assert results[3][0] == 1 and results[4][0] >= 3 and max(shared) < 0.75
    for _, loss, g, w, _, ent in results[3:]:
        assert loss == pytest.approx(loss1, rel=1e-5) and ent == pytest.approx(ent1, rel=1e-5)
        assert g == pytest.approx(g1, rel=1e-5)
        for a, b in zip(w1, w):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * g1)


def test_mini_batches_recompute_old_logprobs(tmp_path, policy_dir):
    """Recomputed old log-probs equal the update's own (the policy is unchanged until the first
    optimizer step), so the loss is the same either way; with 2 mini-batches one RL step takes 2
    optimizer steps."""
    cfg = rl_config(tmp_path, policy_dir, train__mini_batches=2)
    with trainer_of(cfg) as trainer:
        _, trajectories = trainer.rollout(trainer.curriculum.draw(0, 4))
        sequences = [RolloutSequence.of(t, a) for t, a in zip(trajectories, [1.0, -1.0] * 8)]
        losses = []
        for recompute in (False, True):
            mbs = trainer.micro_batches(sequences)
            trainer.prepare(mbs, old_logprobs=recompute)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            for mb in mbs:  # the loss of the update, without its optimizer step
                b = mb.batch
                logp = trainer.model(b.input_ids, b.targets, b.cu_seqlens, expand=b.expand).detach()
                old = mb.old_logp if recompute else logp
                if recompute:
                    torch.testing.assert_close(mb.old_logp[mb.mask], logp[mb.mask], rtol=0, atol=1e-6)
                loss += float(((logp - old).exp() * -mb.advantages * mb.mask).sum())
            losses.append(loss)
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
        row = trainer.train_step()
        assert trainer.optimizer.state_dict()["state"][0]["step"] == 2  # two AdamW steps in one RL step
        assert 0 <= row["clip_frac"] <= 1 and np.isfinite(row["loss"])
        assert row["dual_clip_frac"] == 0  # ratios stay below clip_ratio_c 3
    # The second mini-batch's ratios move off 1: past a dual-clip of 1.01 under negative advantages.
    cfg = rl_config(tmp_path / "dual", policy_dir, train__mini_batches=2, algo__clip_ratio_c=1.01, train__lr=1e-2)
    with trainer_of(cfg) as trainer:
        assert 0 < trainer.train_step()["dual_clip_frac"] < 1


def test_staged_curriculum_through_the_loop(tmp_path, policy_dir):
    """A potential file with samples in all four groups; one stage per step: the metrics show
    stages 0..3 and the cumulative pool sizes; a checkpoint holds the curriculum state."""
    cfg = rl_config(tmp_path, policy_dir, curriculum__mode="staged", curriculum__steps_per_stage=1,
                    train__steps=4, checkpoint__every=0)
    items = load_items(["rg/basic_arithmetic", "rg/gcd", "rg/lcm", "rg/chain_sum"], "train", "train", 3)
    p = np.array([0.5, 0.4, 0.75, 0.85, 0.9, 1.0, 0.0, 0.5, 0.3, 0.2, 0.95, 0.6])  # Π groups 0..3
    tmp_path.mkdir(exist_ok=True)
    summary = write_potential(str(tmp_path / "potential.jsonl"), items, p)
    sizes = summary["group_sizes"]
    assert min(sizes) > 0
    with trainer_of(cfg) as trainer:
        drawn = []
        rollout = trainer.rollout
        trainer.rollout = lambda indices: (drawn.append(indices.copy()), rollout(indices))[1]
        rows = trainer.train()
        groups = trainer.curriculum.groups
    assert [r["stage"] for r in rows] == [0, 1, 2, 3]
    assert [r["pool"] for r in rows] == list(np.cumsum(sizes))
    for stage, indices in enumerate(drawn):
        assert np.all(groups[indices] <= stage)
    for r in rows:
        assert all(np.isfinite(r[k]) for k in ("loss", "reward_mean", "kl", "entropy", "grad_norm"))
        assert r["rollout_s"] > 0 and r["update_s"] > 0 and sum(r["finish_reasons"].values()) == 16
    state = json.loads((tmp_path / "checkpoints/step_00000004/trainer_state.json").read_text())
    assert state["step"] == 4 and len(state["curriculum"]["trials"]) == 12
    # A resume re-reads the potential file: one rewritten since (samples in other stages) is refused.
    write_potential(str(tmp_path / "potential.jsonl"), items, p[::-1].copy())
    with pytest.raises(ValueError, match="other curriculum stages"), trainer_of(cfg, resume=True):
        pass
    write_potential(str(tmp_path / "potential.jsonl"), items, p)
    with trainer_of(cfg, resume=True) as trainer:
        assert trainer.step == 4


def test_online_curriculum_updates_pass_rates(tmp_path, policy_dir):
    cfg = rl_config(tmp_path, policy_dir, train__steps=2)
    with trainer_of(cfg) as trainer:
        before = trainer.curriculum.trials.sum()
        row = trainer.train_step()
        assert trainer.curriculum.trials.sum() == before + 16  # 4 prompts x 4 completions
        assert row["stage"] is None and 0 <= row["pass_rate_mean"] <= 1
    with pytest.raises(FileNotFoundError, match="rci-fast potential"):
        with trainer_of(rl_config(tmp_path / "s", policy_dir, curriculum__mode="staged")):
            pass


def test_runs_with_code_calls_repeat_to_the_bit(tmp_path, policy_dir):
    """Two runs of the same config give the same rollouts and weights although each code call
    sleeps a random time (os.urandom: the seeded sandbox does not fix it): results rejoin on a
    fixed schedule (rollout.result_delay_steps), not as they arrive."""
    code = "```python\nimport os, time\ntime.sleep(os.urandom(1)[0] / 8500)\nprint(6 * 7)\n```"
    runs = []
    for name in ["a", "b"]:
        cfg = rl_config(tmp_path / name, policy_dir, train__steps=2)
        assert cfg.rollout.result_delay_steps > 0  # the default
        with trainer_of(cfg) as trainer:
            trainer.engine.logits_processor = code_first(trainer.tokenizer.encode(code, add_special_tokens=False))
            rows = trainer.train()
            weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        timing = {"peak_mem_mb"} | {k for k in rows[0] if k.endswith("_s") or "per_s" in k}
        runs.append(([{k: v for k, v in row.items() if k not in timing} for row in rows], weights))
    (rows_a, weights_a), (rows_b, weights_b) = runs
    assert all(row["code_calls_mean"] == 1 for row in rows_a)
    assert rows_a == rows_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, policy_dir):
    """An uninterrupted 1-rank run of 6 steps; its rollouts are recorded for the 2-rank replay."""
    out = tmp_path_factory.mktemp("rl-reference")
    cfg = rl_config(out, policy_dir, train__steps=6)
    recorded = {}
    with trainer_of(cfg) as trainer:
        rollout = trainer.rollout

        def record(indices):
            mine, trajectories = rollout(indices)
            recorded[trainer.step] = trajectories
            return mine, trajectories
        trainer.rollout = record
        rows = trainer.train()
    with open(out / "rollouts.pkl", "wb") as f:
        pickle.dump(recorded, f)
    return {"rows": rows, "out": out}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replay_worker(out_dir, model_dir, rollouts_file):
    """Under torchrun: the RL loop with each rank's share of the recorded rollouts."""
    with open(rollouts_file, "rb") as f:
        recorded = pickle.load(f)
    cfg = rl_config(out_dir, model_dir)
    with trainer_of(cfg) as trainer:
        g, world, rank = cfg.rollout.group_size, trainer.dist.world_size, trainer.dist.rank

        def replay(indices):
            mine = list(range(rank, len(indices), world))
            everything = recorded[trainer.step]
            return mine, [everything[j * g + k] for j in mine for k in range(g)]
        trainer.rollout = replay
        trainer.train()


@pytest.mark.slow
def test_two_ranks_match_one_rank(tmp_path, policy_dir, reference):
    """Rollouts are data-parallel, each rank with its own seeded engine, so 2 ranks sample other
    completions than 1 rank; the 2-rank run replays the 1-rank run's rollouts (each rank its
    share) and everything after generation runs as in training: rewards, advantages, packing,
    reference and update, curriculum. Tolerance: fp32 sums in another order."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), __file__, str(out), str(policy_dir), str(reference["out"] / "rollouts.pkl")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    two, one = metrics(out), reference["rows"][:3]
    assert [row["trained_tokens"] for row in two] == [row["trained_tokens"] for row in one]
    assert [row["reward_mean"] for row in two] == [row["reward_mean"] for row in one]
    assert all(abs(row["loss"]) > 1e-4 for row in one)
    assert [row["loss"] for row in two] == pytest.approx([row["loss"] for row in one], rel=1e-5, abs=1e-7)
    assert [row["grad_norm"] for row in two] == pytest.approx([row["grad_norm"] for row in one], rel=1e-4)
    assert [row["kl"] for row in two] == pytest.approx([row["kl"] for row in one], rel=1e-4, abs=1e-9)


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path, policy_dir, reference):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rci_fast", "rl", "--config", "configs/smoke-rl.yaml", "--device", "cpu",
           *rl_overrides(out, policy_dir, train__steps=6)]
    returncode = kill_once_metrics_reach(cmd, ROOT, out / "metrics.jsonl", rows=3)  # past the step-2 checkpoint
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(metrics(out)) < 6
    r = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    rows = metrics(out)
    assert [row["step"] for row in rows] == list(range(1, 7))
    ref = reference["rows"]
    # Rollouts after the resume are sampled again (seeded by step) from the restored weights.
    assert [row["reward_mean"] for row in rows] == [row["reward_mean"] for row in ref]
    assert [row["loss"] for row in rows] == pytest.approx([row["loss"] for row in ref], rel=1e-6, abs=1e-9)


if __name__ == "__main__":
    replay_worker(*sys.argv[1:4])

"""The SFT trainer end to end on a tiny model (CPU, gloo): 2 ranks = 1 rank, kill -9 + --resume =
an uninterrupted run, the HF export loads in transformers with the same log-probs, non-finite
losses skip steps and abort, bad data fails with its file and line."""
import contextlib
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from process_helpers import kill_once_metrics_reach
from rci_fast.config import load_config
from rci_fast.model import load_pretrained
from rci_fast.sandbox import Sandbox
from rci_fast.tasks.teacher import generate
from rci_fast.tasks.trajectory import TrajectoryFormatError, write_trajectories
from rci_fast.train import SFTTrainer, TrainingDiverged, init_distributed

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    with Sandbox(workers=2) as sb:
        trajectories = list(generate(sb, ["basic_arithmetic", "gcd", "base_conversion", "lcm", "chain_sum", "letter_counting"],
                                     per_family=5, seed=0))
    write_trajectories(path, trajectories)
    return path


def overrides(out_dir, data_file, **extra):
    # Constant LR after a 2-step warmup, so a run cut short at step 3 sees the same LRs as a long one;
    # small micro-batches, so steps have several and ranks get uneven counts.
    base = {"out_dir": out_dir, "data.train_file": data_file, "train.batch_size": 4,
            "train.micro_batch_tokens": 1024, "data.max_seq_len": 1024, "train.schedule": "constant",
            "train.warmup_steps": 2, "train.lr": 3e-3, "train.max_steps": STEPS, "checkpoint.every": 4,
            "checkpoint.export_at_end": False, "model.tiny.vocab_size": 384}
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


@contextlib.contextmanager
def one_rank():
    info = init_distributed("cpu")
    try:
        yield info
    finally:
        info.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_file):
    """An uninterrupted single-process run; its model's log-probs on one sequence, and its export."""
    out = tmp_path_factory.mktemp("reference")
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(out, data_file))
    with one_rank() as info:
        trainer = SFTTrainer(cfg, info)
        rows = trainer.train()
        seq = trainer.batches.sequences[0]
        targets = torch.cat([seq.input_ids[1:], torch.tensor([-100])])
        with torch.no_grad():
            logp = trainer.model(seq.input_ids[None], targets, torch.tensor([0, len(seq)], dtype=torch.int32))
        trainer.export(out / "hf")
    return {"rows": rows, "out": out, "init": out / "init_model", "ids": seq.input_ids, "logp": logp}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_reference_run_learns_and_logs(reference):
    rows = reference["rows"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) == [r["step"] for r in metrics(reference["out"])]
    first, last = sum(r["loss"] for r in rows[:4]) / 4, sum(r["loss"] for r in rows[-4:]) / 4
    assert last < first - 0.5, (first, last)
    assert all(k in rows[0] for k in ("loss", "lr", "tokens_per_s", "grad_norm", "peak_mem_mb", "step_time_s"))
    assert [r["lr"] for r in rows[:3]] == pytest.approx([1.5e-3, 3e-3, 3e-3])
    assert max(r["micro_batches"] for r in rows) >= 2 and not any(r["skipped"] for r in rows)
    ckpts = sorted(p.name for p in (reference["out"] / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000036", "step_00000040"]  # checkpoint.keep=2 of every 4 steps + the last
    assert (reference["out"] / "checkpoints/latest").read_text().strip() == "step_00000040"


@pytest.mark.slow
def test_two_ranks_match_one_rank(tmp_path, data_file, reference):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "rci_fast", "sft", "--config", "configs/smoke.yaml", "--device", "cpu",
           *overrides(out, data_file, train__max_steps=3, model__path=reference["init"])]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    two, one = metrics(out), reference["rows"][:3]
    assert [row["trained_tokens"] for row in two] == [row["trained_tokens"] for row in one]
    # Tolerance: fp32 sums in another order (per-rank partial sums, gloo reduction, 1 vs 2 threads).
    assert [row["loss"] for row in two] == pytest.approx([row["loss"] for row in one], rel=1e-5, abs=0)
    assert [row["grad_norm"] for row in two] == pytest.approx([row["grad_norm"] for row in one], rel=1e-4)


@pytest.mark.slow
def test_checkpoints_move_between_one_process_and_two_ranks(tmp_path, data_file, reference):
    """One process trains without FSDP (plain tensors), two ranks with it (DTensor shards): a
    checkpoint of either resumes in the other, with the same losses as staying put (fp32 sums in
    another order: the two-rank tolerance above)."""
    import shutil

    def resume(out, steps, ranks):
        launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port())] if ranks == 2 else [sys.executable])
        cmd = [*launch, "-m", "rci_fast", "sft", "--config", "configs/smoke.yaml", "--device", "cpu", "--resume",
               *overrides(out, data_file, train__max_steps=steps)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
        return {row["step"]: row for row in metrics(out)}

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(reference["out"], one)
    shutil.copytree(reference["out"], two)
    stay = resume(one, STEPS + 4, ranks=1)
    moved = resume(two, STEPS + 4, ranks=2)  # a one-process checkpoint into two ranks' shards
    stay.update(resume(one, STEPS + 6, ranks=1))
    moved.update(resume(two, STEPS + 6, ranks=1))  # and a two-rank checkpoint back into one process
    new_steps = range(STEPS + 1, STEPS + 7)
    assert [moved[s]["loss"] for s in new_steps] == pytest.approx([stay[s]["loss"] for s in new_steps], rel=1e-5)
    assert [moved[s]["grad_norm"] for s in new_steps] == pytest.approx([stay[s]["grad_norm"] for s in new_steps],
                                                                       rel=1e-4)


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path, data_file, reference):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rci_fast", "sft", "--config", "configs/smoke.yaml",
           *overrides(out, data_file, model__path=reference["init"])]
    returncode = kill_once_metrics_reach(cmd, ROOT, out / "metrics.jsonl", rows=7)  # past the step-4 checkpoint
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done_before = len(metrics(out))
    assert done_before < STEPS
    r = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    rows = metrics(out)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # redone steps are not doubled
    # Same process layout as the reference except in-process vs subprocess: same ops, same order.
    assert [row["loss"] for row in rows] == pytest.approx([row["loss"] for row in reference["rows"]], rel=1e-6, abs=0)


def test_export_loads_in_transformers_with_the_same_logprobs(reference):
    export = reference["out"] / "hf"
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert len(tokenizer) == hf.config.vocab_size
    ids = reference["ids"]
    with torch.no_grad():
        logits = hf(ids[None]).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]
    torch.testing.assert_close(logp, reference["logp"][:-1], atol=1e-4, rtol=0)
    ours = load_pretrained(str(export))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[None])[0], logits, atol=1e-4, rtol=0)
    init = load_pretrained(str(reference["init"]))  # the export holds the trained weights, not the init
    assert not torch.equal(init.model.layers[0].mlp.up_proj.weight, ours.model.layers[0].mlp.up_proj.weight)


def test_non_finite_losses_skip_steps_then_abort(tmp_path, data_file, reference):
    # lr 1e30: the first step makes weights ~1e30, every later forward overflows to NaN.
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(
        tmp_path, data_file, model__path=reference["init"], train__lr=1e30, train__warmup_steps=0,
        train__grad_clip=0, train__max_bad_steps=3))
    with one_rank() as info:
        trainer = SFTTrainer(cfg, info)
        rows = [trainer.train_step()]
        assert not rows[0]["skipped"]
        before = [p.detach().clone() for p in trainer.model.parameters()]
        with pytest.raises(TrainingDiverged, match="3 non-finite losses in a row"):
            for _ in range(5):
                rows.append(trainer.train_step())
        assert len(rows) == 3 and all(r["skipped"] for r in rows[1:])
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # no update


def test_bad_data_fails_with_file_and_line(tmp_path, data_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data_file.read_text().splitlines()[0] + "\n" + '{"messages": []}\n')
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(tmp_path / "run", bad))
    with one_rank() as info, pytest.raises(TrajectoryFormatError, match=f"{bad}:2: "):
        SFTTrainer(cfg, info)
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(tmp_path / "b", data_file, train__micro_batch_tokens=64,
                                                             data__max_seq_len=0))
    with one_rank() as info, pytest.raises(ValueError, match="impossible token budget"):
        SFTTrainer(cfg, info)


def test_a_line_that_is_not_utf8_is_named(tmp_path, data_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(data_file.read_bytes().splitlines()[0] + b"\n" + b'{"messages": "\xff"}\n')
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(tmp_path / "run", bad))
    with one_rank() as info, pytest.raises(TrajectoryFormatError, match=f"{bad}:2: not UTF-8"):
        SFTTrainer(cfg, info)


def test_a_tiny_model_built_from_other_settings_is_refused(tmp_path, data_file):
    """<out_dir>/init_model holds the tiny model a run trains (built once, reused on resume): a
    rerun whose config asks for another model is refused, not trained on the old one. A run on
    a data file without trajectories leaves no model behind."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with one_rank() as info, pytest.raises(ValueError, match="no trajectories"):
        SFTTrainer(load_config(ROOT / "configs/smoke.yaml", overrides(tmp_path / "run", empty)), info)
    assert not (tmp_path / "run" / "init_model").exists()
    with one_rank() as info:
        SFTTrainer(load_config(ROOT / "configs/smoke.yaml", overrides(tmp_path / "run", data_file)), info)
        again = load_config(ROOT / "configs/smoke.yaml", overrides(tmp_path / "run", data_file))
        SFTTrainer(again, info)  # the same settings: reused
        cfg = load_config(ROOT / "configs/smoke.yaml", overrides(tmp_path / "run", data_file, model__tiny__hidden_size=32))
        with pytest.raises(ValueError, match=r"model.tiny.hidden_size: 64 -> 32"):
            SFTTrainer(cfg, info)


def test_a_model_folder_without_a_tokenizer_is_refused(tmp_path, data_file, reference):
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("config.json", "model.safetensors"):
        (weights / name).write_bytes((reference["init"] / name).read_bytes())
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(tmp_path / "run", data_file, model__path=weights))
    with one_rank() as info, pytest.raises(FileNotFoundError, match="model.path: .* holds no tokenizer"):
        SFTTrainer(cfg, info)


def test_resume_refuses_other_data_of_the_same_size(tmp_path, data_file, reference):
    common = dict(model__path=reference["init"], train__max_steps=2, checkpoint__every=1)
    with one_rank() as info:
        SFTTrainer(load_config(ROOT / "configs/smoke.yaml", overrides(tmp_path / "run", data_file, **common)),
                   info).train()
    lines = data_file.read_text().splitlines()
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join([lines[0].replace("print(", "print( ", 1), *lines[1:]]) + "\n")
    assert changed.read_text() != data_file.read_text()
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(tmp_path / "run", changed, **{**common, "train__max_steps": 3}))
    with one_rank() as info, pytest.raises(ValueError, match="other data"):
        SFTTrainer(cfg, info, resume=True)


def test_resume_without_a_checkpoint_starts_the_metrics_over(tmp_path):
    """A run killed before its first checkpoint left metrics rows; --resume starts at step 0 and
    writes them again, so the old ones go."""
    from types import SimpleNamespace

    from rci_fast.train.sft import resume_from_latest

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    trainer = SimpleNamespace(ckpt_root=tmp_path / "checkpoints", out_dir=tmp_path, dist=SimpleNamespace(is_main=True))
    resume_from_latest(trainer, restore=None)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_activation_checkpointing_gives_the_same_steps(tmp_path, data_file, reference):
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(
        tmp_path, data_file, model__path=reference["init"], model__activation_checkpointing="true",
        train__max_steps=2))
    with one_rank() as info:
        trainer = SFTTrainer(cfg, info)
        assert trainer.inner.activation_checkpointing
        rows = [trainer.train_step() for _ in range(2)]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference["rows"][:2]], rel=1e-6)
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in reference["rows"][:2]], rel=1e-5)


def test_a_fresh_run_refuses_an_out_dir_with_checkpoints(data_file, reference):
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(reference["out"], data_file))
    with one_rank() as info, pytest.raises(ValueError, match="already holds checkpoints: pass --resume"):
        SFTTrainer(cfg, info)


def test_export_command_writes_any_checkpoint(tmp_path, data_file, reference):
    from safetensors.torch import load_file

    from rci_fast.train.export import export_checkpoint

    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(reference["out"], data_file))
    with one_rank() as info:  # the latest checkpoint = the weights exported at the end of training
        used = export_checkpoint(cfg, info, tmp_path / "latest", dtype="fp32")
    assert used.name == "step_00000040"
    end, again = (load_file(p / "model.safetensors") for p in (reference["out"] / "hf", tmp_path / "latest"))
    assert end.keys() == again.keys() and all(torch.equal(end[k], again[k]) for k in end)
    r = subprocess.run([sys.executable, "-m", "rci_fast", "export", "--config", "configs/smoke.yaml",
                        *overrides(reference["out"], data_file), "--checkpoint",
                        str(reference["out"] / "checkpoints/step_00000036"), "--out", str(tmp_path / "s36")],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "s36")
    assert hf.dtype == torch.bfloat16
    s36 = load_file(tmp_path / "s36" / "model.safetensors")
    assert not torch.equal(s36["model.norm.weight"].float(), end["model.norm.weight"])  # an earlier step
    with one_rank() as info:  # over an existing export: replaced, nothing left beside it
        export_checkpoint(cfg, info, tmp_path / "latest", dtype="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "s36"]
    again = load_file(tmp_path / "latest" / "model.safetensors")
    assert all(torch.equal(end[k], again[k]) for k in end)
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(tmp_path / "none", data_file))
    with one_rank() as info, pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        export_checkpoint(cfg, info, tmp_path / "x")
    # an RL run's config is read too (its checkpoints hold the same kind of weights)
    r = subprocess.run([sys.executable, "-m", "rci_fast", "export", "--config", "configs/smoke-rl.yaml",
                        f"out_dir={tmp_path / 'rl'}", f"model.path={reference['init']}", "--out", str(tmp_path / "y"),
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 1 and "no complete checkpoint" in r.stderr, r.stderr[-3000:]


def test_resume_drops_later_metrics_rows_and_a_torn_last_one(tmp_path):
    from rci_fast.train.sft import drop_metrics_after

    metrics = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 6)]
    metrics.write_text("\n".join(rows) + '\n{"step": 6, "lo')  # killed mid-write
    drop_metrics_after(tmp_path, 3)
    assert metrics.read_text() == "".join(r + "\n" for r in rows[:3])
    metrics.write_text(rows[0] + "\nnot json\n" + rows[1] + "\n")  # damage inside: named, not dropped
    with pytest.raises(ValueError, match=f"{metrics}:2: not a metrics row"):
        drop_metrics_after(tmp_path, 3)


@pytest.mark.slow
def test_a_rank_without_sequences_still_steps(tmp_path, data_file, reference):
    # batch_size 1 on 2 ranks: rank 1 has nothing to train on and runs an empty micro-batch so that
    # FSDP's collectives line up; the result equals one rank's.
    common = dict(train__max_steps=2, train__batch_size=1, model__path=reference["init"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "rci_fast", "sft", "--config", "configs/smoke.yaml", "--device", "cpu",
           *overrides(tmp_path / "two", data_file, **common)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    with one_rank() as info:
        trainer = SFTTrainer(load_config(ROOT / "configs/smoke.yaml", overrides(tmp_path / "one", data_file, **common)),
                             info)
        one = [trainer.train_step() for _ in range(2)]
    two = metrics(tmp_path / "two")
    assert [row["loss"] for row in two] == pytest.approx([row["loss"] for row in one], rel=1e-5, abs=0)


def test_resuming_a_finished_run_changes_nothing(data_file, reference):
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(reference["out"], data_file))
    before = sorted(p.name for p in (reference["out"] / "checkpoints").iterdir())
    with one_rank() as info:
        trainer = SFTTrainer(cfg, info, resume=True)
        assert trainer.step == STEPS and trainer.train() == []
    assert sorted(p.name for p in (reference["out"] / "checkpoints").iterdir()) == before
    assert len(metrics(reference["out"])) == STEPS


def test_a_resumed_run_follows_its_own_schedule(tmp_path, data_file, reference):
    """Resuming with a longer cosine schedule and another peak lr: the next step's lr is the new
    schedule's at that step, not what the checkpoint's optimizer held."""
    import shutil

    from rci_fast.train.sft import lr_factor

    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(out, data_file, train__max_steps=STEPS + 20,
                                                             train__schedule="cosine", train__lr=1e-3))
    with one_rank() as info:
        trainer = SFTTrainer(cfg, info, resume=True)
    want = 1e-3 * lr_factor(STEPS, STEPS + 20, 2, "cosine", cfg.train.min_lr_ratio)
    assert trainer.step == STEPS and want < 0.5e-3
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([want] * 2, rel=1e-12)
    assert trainer.scheduler.get_last_lr() == pytest.approx([want] * 2, rel=1e-12)


def test_prune_keeps_the_newest_and_drops_stale_futures(tmp_path):
    from rci_fast.train.checkpoint import _prune

    for step in (4, 8, 12, 16):
        (tmp_path / f"step_{step:08d}").mkdir()
    _prune(tmp_path, 12, keep=2)  # step 16: left by a run killed before it named it latest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000008", "step_00000012"]


def test_bf16_compute_tracks_fp32(tmp_path, data_file, reference):
    # The GPU setting (bf16 params in forward/backward, fp32 masters and reduction), run on CPU.
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides(
        tmp_path, data_file, model__path=reference["init"], train__mixed_precision="bf16", train__max_steps=3))
    with one_rank() as info:
        trainer = SFTTrainer(cfg, info)
        rows = [trainer.train_step() for _ in range(3)]
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # masters stay fp32
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference["rows"][:3]], rel=1e-2)
    assert rows[0]["loss"] != reference["rows"][0]["loss"]  # bf16 rounding shows: the forward ran in bf16

"""The smoke pipeline as a user runs it: gen-sft -> sft -> potential -> rl -> eval, each a
`rci-fast` command in a subprocess with configs/smoke.yaml and configs/smoke-rl.yaml."""
import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def rci(*args, timeout=180):
    r = subprocess.run([sys.executable, "-m", "rci_fast", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"rci-fast {args[0]} failed:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    data, sft = tmp / "sft.jsonl", tmp / "sft"
    rci("gen-sft", "--teacher", "scripted", "--out", data, "--per-family", 3, "--families",
        "basic_arithmetic,gcd,lcm,chain_sum")
    rci("sft", "--config", "configs/smoke.yaml", "--device", "cpu", f"out_dir={sft}", f"data.train_file={data}",
        "train.max_steps=20")
    assert (sft / "hf" / "config.json").is_file()
    return sft / "hf"


@pytest.mark.slow
def test_smoke_pipeline_sft_potential_rl_eval(tmp_path, sft_model):
    rl = tmp_path / "rl"
    common = ["--device", "cpu", f"out_dir={rl}", f"model.path={sft_model}"]

    r = rci("potential", "--config", "configs/smoke-rl.yaml", *common)
    rows = [json.loads(line) for line in (rl / "potential.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(0 <= row["p"] <= 1 and row["group"] in (0, 1, 2, 3) for row in rows)
    assert "group 0 (Π>=0.64)" in r.stdout and "group 3 (Π<0.32)" in r.stdout
    assert all(row["p"] * 4 == int(row["p"] * 4) for row in rows)  # k = 4 attempts each
    assert not list(rl.glob("*.partial*"))  # the journal goes once the file is written

    r = rci("rl", "--config", "configs/smoke-rl.yaml", *common)
    metrics = [json.loads(line) for line in (rl / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["stage"] for m in metrics] == [0, 0, 1, 1, 2, 2]  # steps_per_stage 2
    for m in metrics:
        for key in ("loss", "reward_mean", "reward_std", "accuracy", "kl", "clip_frac", "dual_clip_frac", "entropy",
                    "grad_norm", "rollout_s", "logprob_s", "update_s", "rollout_tokens_per_s", "update_tokens_per_s",
                    "peak_mem_mb", "code_calls_mean"):
            assert math.isfinite(m[key]), (key, m)
    assert (rl / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (rl / "hf" / "config.json").is_file() and "rl: step 6" in r.stdout

    r = rci("eval", "--config", "configs/smoke-rl.yaml", *common)
    report = json.loads((rl / "eval.json").read_text())
    assert report["model"] == str(rl / "hf")  # the RL export by default
    assert set(report["modes"]) == {"code", "text"}
    for mode, tasks in report["modes"].items():
        assert [t["task"] for t in tasks] == ["rg/decimal_arithmetic", "rg/prime_factorization"]
        assert all(t["samples"] == 3 and t["attempts"] == 2 and 0 <= t["accuracy"] <= t["pass_at_k"] <= 1
                   for t in tasks)
    assert all(t["mean_code_calls"] == 0 for t in report["modes"]["text"])  # no interpreter in text mode
    assert "[code mode]" in r.stdout and "[text mode]" in r.stdout and "pass@k" in r.stdout
    assert not list(rl.glob("*.partial*"))


@pytest.mark.slow
def test_a_killed_potential_pass_resumes_with_the_same_result(tmp_path, sft_model):
    """SIGKILL once the journal holds a finished batch; the same command again rolls out only the
    rest and writes the file an unbroken pass writes."""
    common = ["--config", "configs/smoke-rl.yaml", "--device", "cpu", f"model.path={sft_model}",
              "potential.batch_size=4"]
    rci("potential", *common, f"out_dir={tmp_path / 'whole'}")
    killed = tmp_path / "killed"
    journal = killed / "potential.jsonl.partial"
    proc = subprocess.Popen([sys.executable, "-m", "rci_fast", "potential", *common, f"out_dir={killed}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (journal.is_file() and len(journal.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "the pass ended before the kill"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "potential.jsonl").exists()
    stale = killed / "potential.jsonl.partial.rank1"  # left by a run under torchrun
    stale.write_text('{"header": {}}\n')
    r = rci("potential", *common, f"out_dir={killed}")
    assert "resuming after" in r.stderr
    assert (killed / "potential.jsonl").read_text() == (tmp_path / "whole" / "potential.jsonl").read_text()
    assert not journal.exists() and not stale.exists()


def torchrun(*args, timeout=240):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), "-m", "rci_fast", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"torchrun rci-fast {args[0]} failed:\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_potential_rl_eval_under_torchrun(tmp_path, sft_model):
    """2 gloo ranks, real rollouts on each: every sample and task is measured once, the RL loop runs
    with its collectives (weight gathering, outcome gathering, checkpoint, export)."""
    rl = tmp_path / "rl"
    common = ["--device", "cpu", f"out_dir={rl}", f"model.path={sft_model}", "rollout.sandbox_workers=1"]
    torchrun("potential", "--config", "configs/smoke-rl.yaml", *common)
    rows = [json.loads(line) for line in (rl / "potential.jsonl").read_text().splitlines()]
    assert len({(row["task"], row["sample_id"]) for row in rows}) == len(rows) == 12
    torchrun("rl", "--config", "configs/smoke-rl.yaml", *common, "train.steps=3", "rollout.prompts_per_step=3")
    metrics = [json.loads(line) for line in (rl / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(sum(m["finish_reasons"].values()) == 12 for m in metrics)  # 3 prompts x 4, over both ranks
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["kl"]) for m in metrics)
    assert (rl / "hf" / "config.json").is_file()
    torchrun("eval", "--config", "configs/smoke-rl.yaml", *common, "eval.modes=[code]")
    report = json.loads((rl / "eval.json").read_text())
    assert [t["samples"] for t in report["modes"]["code"]] == [3, 3]


def test_rl_commands_fail_clearly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rci_fast", "rl", "--config", "configs/smoke-rl.yaml",
                        "algo.kl_estimator=k9"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "algo.kl_estimator" in r.stderr
    r = subprocess.run([sys.executable, "-m", "rci_fast", "potential", "--config", "configs/smoke-rl.yaml",
                        "--device", "cpu", f"out_dir={tmp_path}", f"model.path={tmp_path / 'none'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no model at" in r.stderr
    r = subprocess.run([sys.executable, "-m", "rci_fast", "eval", "--config", "configs/smoke-rl.yaml",
                        "--device", "cpu", "tasks.test=[rg/nope]", f"model.path={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "nope" in r.stderr
    r = subprocess.run([sys.executable, "-m", "rci_fast", "rl", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--resume" in r.stdout
    r = subprocess.run([sys.executable, "-m", "rci_fast", "rl", "--config", "configs/smoke-rl.yaml", "out_dir=/x",
                        "--device", "cpu", "train.steps=9", "--print-config"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)  # overrides before and after options
    assert r.returncode == 0 and "out_dir: /x" in r.stdout and "steps: 9" in r.stdout
    r = subprocess.run([sys.executable, "-m", "rci_fast", "rl", "--config", "configs/smoke-rl.yaml", "--bogus"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr


@pytest.mark.parametrize("name", ["smoke-rl.yaml", "qwen2.5-7b-rl.yaml"])
def test_rl_configs_load_with_the_recipe(name):
    from rci_fast.config import RLConfig, load_config

    cfg = load_config(ROOT / "configs" / name, [], cls=RLConfig)
    if name.startswith("qwen"):  # the paper's GRPO hyperparameters
        assert (cfg.train.lr, cfg.rollout.group_size, cfg.rollout.prompts_per_step) == (1e-6, 5, 128)
        assert (cfg.algo.kl_coef, cfg.algo.kl_estimator, cfg.algo.clip_low) == (0.001, "low_var_kl", 0.2)
        assert (cfg.rollout.temperature, cfg.eval.temperature, cfg.rollout.max_code_calls) == (1.0, 0.6, 8)
        assert (cfg.curriculum.mode, cfg.curriculum.steps_per_stage, cfg.train.steps, cfg.potential.k) == \
            ("staged", 150, 600, 20)

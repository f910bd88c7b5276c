"""`rci-fast demo --quick`: every stage of the demo runs (few steps each), the report has its
table and plots, a rerun continues instead of redoing, and --summary aggregates runs."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def demo(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "rci_fast", "demo", "--device", "cpu", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    r = demo("--quick", "--out", out, "--set", "eval.attempts=2")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.mark.slow
def test_quick_demo_writes_report_table_and_plots(quick_demo):
    out, r = quick_demo
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    for title in ("base", "SFT |", "SFT + GRPO (uniform)", "SFT + GRPO (curriculum)"):
        assert any(line.startswith(f"| {title}") for line in table), title
    assert "held-out samples, code" in report and "held-out families, text" in report
    for png in ("training.png", "code_calls.png", "per_task.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in report
    timings = json.loads((out / "timings.json").read_text())
    assert {"data", "base", "sft", "potential", "rl-curriculum", "rl-uniform"} <= set(timings)
    assert sum(k.startswith("eval ") for k in timings) == 8  # 4 models x 2 evaluation sets
    assert json.loads((out / "eval" / "sft-samples" / "eval.json").read_text())["attempts"] == 2  # --set
    for name in ("base", "sft/hf", "rl-uniform/hf", "rl-curriculum/hf"):
        assert (out / name / "config.json").is_file()
    # the curriculum run really was staged, the uniform one was not
    stages = [json.loads(line)["stage"] for line in (out / "rl-curriculum" / "metrics.jsonl").read_text().splitlines()]
    assert stages == sorted(stages) and stages[-1] > stages[0]
    assert all(json.loads(line)["stage"] is None
               for line in (out / "rl-uniform" / "metrics.jsonl").read_text().splitlines())
    assert "| SFT |" in r.stdout  # the table is printed at the end
    # after SFT two lanes ran side by side: one bar over their stages, none of their own
    assert "demo: rl and eval" in r.stderr and "rl:   0%" not in r.stderr and "eval (code):" not in r.stderr
    assert "the two lanes after SFT side by side" in report
    assert "SFT + GRPO (curriculum) - SFT on held-out samples, code mode:" in report  # paired, with its error


@pytest.mark.slow
def test_demo_rerun_skips_done_stages_resumes_training_and_summary_aggregates(quick_demo):
    out, _ = quick_demo
    before = (out / "timings.json").read_text()
    r = demo("--quick", "--out", out, "--set", "eval.attempts=2", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("already done") == 6 + 8  # every stage skipped
    assert (out / "timings.json").read_text() == before
    # an RL stage killed after its last checkpoint, before its export: the rerun resumes it
    shutil.rmtree(out / "rl-uniform" / "hf")
    for folder in (out / "eval").glob("grpo-uniform-*"):
        shutil.rmtree(folder)
    r = demo("--quick", "--out", out, "--set", "eval.attempts=2", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and (out / "rl-uniform" / "hf" / "config.json").is_file()
    assert r.stderr.count("already done") == 6 + 8 - 3
    r = demo("--summary", out, out)
    assert r.returncode == 0, r.stderr
    assert "2 runs" in r.stdout and "± 0.000" in r.stdout
    assert "SFT + GRPO (curriculum) - SFT" in r.stdout


def test_demo_errors_are_clear(tmp_path):
    r = demo("--summary", tmp_path)
    assert r.returncode == 1 and "no finished demo" in r.stderr
    r = demo("--out", tmp_path / "x", "--rl-config", tmp_path / "missing.yaml")
    assert r.returncode == 2 and "config not found" in r.stderr
    bad = tmp_path / "bad-rl.yaml"
    bad.write_text((ROOT / "configs" / "demo-rl.yaml").read_text().replace("rg/gcd,", "rg/no_such_family,"))
    r = demo("--out", tmp_path / "y", "--rl-config", bad)
    assert r.returncode == 1 and "no_such_family" in r.stderr
    r = demo("--out", tmp_path / "z", "--set", "eval.no_such_key=1")  # a config error: rc 2, before any work
    assert r.returncode == 2 and "no_such_key" in r.stderr and not (tmp_path / "z").exists()


def test_elapsed_time_counts_lanes_side_by_side():
    from rci_fast.demo import elapsed_s

    timings = {"data": 1.0, "sft": 2.0, "rl-a": 30.0, "eval-a": 5.0, "rl-b": 20.0}
    assert elapsed_s(timings) == 58.0
    assert elapsed_s(timings, (("rl-a", "eval-a"), ("rl-b", "eval-b"))) == 3.0 + 35.0


@pytest.mark.slow
def test_a_failing_lane_is_reported_and_the_demo_exits_cleanly(quick_demo, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(quick_demo[0], out)
    for stage in ("rl-uniform", "rl-curriculum", "eval"):
        shutil.rmtree(out / stage)
    (out / "plan.json").unlink()  # other settings than the folder's: taken as a folder from before plan.json
    r = demo("--quick", "--out", out, "--set", "rollout.temperature=0", timeout=120)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "failed" in r.stderr and "rollout.temperature: RL samples" in r.stderr
    assert "Traceback" not in r.stderr.split("failed")[-1]  # the parent ends with a message


def test_a_folder_holds_the_stages_of_one_set_of_settings(tmp_path):
    """A rerun skips the stages already done: with other settings it would report the old results
    as its own, so it is refused (plan.json)."""
    from rci_fast.demo import DemoPlan

    configs = dict(sft_config=str(ROOT / "configs/demo-sft.yaml"), rl_config=str(ROOT / "configs/demo-rl.yaml"))
    (tmp_path / "a").mkdir()
    DemoPlan(tmp_path / "a", **configs).claim_folder()
    DemoPlan(tmp_path / "a", **configs).claim_folder()  # the same settings: continued
    with pytest.raises(ValueError, match="other settings") as err:
        DemoPlan(tmp_path / "a", seed=1, rl_overrides=["eval.attempts=4"], **configs).claim_folder()
    assert "rl.eval.attempts" in str(err.value) and "seed" in str(err.value) and "out_dir" not in str(err.value)
    moved = tmp_path / "b"
    (tmp_path / "a").rename(moved)  # the folder's own paths are not settings
    DemoPlan(moved, **configs).claim_folder()
    # README: delete eval/ to evaluate again with other eval.* settings
    (moved / "eval" / "sft-samples").mkdir(parents=True)
    (moved / "eval" / "sft-samples" / "eval.json").write_text("{}")
    with pytest.raises(ValueError, match="rl.eval.attempts"):
        DemoPlan(moved, rl_overrides=["eval.attempts=4"], **configs).claim_folder()
    shutil.rmtree(moved / "eval")
    DemoPlan(moved, rl_overrides=["eval.attempts=4"], **configs).claim_folder()
    assert json.loads((moved / "plan.json").read_text())["rl"]["eval"]["attempts"] == 4


def test_demo_set_refuses_keys_the_demo_sets(tmp_path):
    r = demo("--out", tmp_path / "x", "--set", "seed=3")
    assert r.returncode == 2 and "sets this key itself" in r.stderr


def test_demo_checks_its_configs_before_any_work(tmp_path):
    for bad, message in (("rollout.tempreature=1", "unknown key 'rollout.tempreature'"),
                         ("eval.attempts=[1", "not a valid YAML value")):
        r = demo("--out", tmp_path / "x", "--set", bad)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not (tmp_path / "x").exists()


def test_paired_gain_and_its_standard_error_over_questions(tmp_path):
    """GRPO - SFT from per-question counts: the mean over tasks of each task's mean difference,
    and sqrt(sum over tasks of var(d) / n) / tasks; the summary prints it for every run."""
    from rci_fast.demo import paired_gain, summarize

    def write(out, name, tasks):
        path = out / "eval" / f"{name}-samples" / "eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        reports = [{"task": t, "attempts": 4, "accuracy": sum(c.values()) / (4 * len(c)), "correct": c,
                    "mean_code_calls": 1.0} for t, c in tasks.items()]
        path.write_text(json.dumps({"attempts": 4, "mean_accuracy": {"code": sum(r["accuracy"] for r in reports) / 2},
                                    "modes": {"code": reports}}))

    for run in ("r0", "r1"):
        out = tmp_path / run
        write(out, "sft", {"a": {"q1": 0, "q2": 2, "q3": 4}, "b": {"q1": 1, "q2": 1}})
        for name in ("base", "grpo-uniform", "grpo-curriculum"):
            write(out, name, {"a": {"q1": 1, "q2": 2, "q3": 4}, "b": {"q1": 3, "q2": 2}})
    gain, se = paired_gain(tmp_path / "r0", "grpo-curriculum")
    d_a, d_b = [0.25, 0.0, 0.0], [0.5, 0.25]  # per question, (correct - sft's) / 4
    assert gain == pytest.approx((sum(d_a) / 3 + sum(d_b) / 2) / 2)
    var = lambda d: sum((x - sum(d) / len(d)) ** 2 for x in d) / (len(d) - 1)  # noqa: E731
    assert se == pytest.approx((var(d_a) / 3 + var(d_b) / 2) ** 0.5 / 2)
    text = summarize([tmp_path / "r0", tmp_path / "r1"])
    assert f"standard error per run (paired over questions): {se:.3f}, {se:.3f}" in text
    # evaluations written before the per-question counts: no error line, no failure
    for path in (tmp_path / "r1" / "eval").glob("*/eval.json"):
        report = json.loads(path.read_text())
        for r in report["modes"]["code"]:
            del r["correct"]
        path.write_text(json.dumps(report))
    assert paired_gain(tmp_path / "r1", "grpo-curriculum") is None
    assert "standard error" not in summarize([tmp_path / "r0", tmp_path / "r1"])


"""The benchmarks in bench/ run end to end (--quick) and print their final JSON line: a benchmark
that nobody runs breaks silently when the code it drives changes (bench_vs_trl did)."""
import dis
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_quick(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last.removeprefix("JSON "))


@pytest.mark.slow
def test_bench_sandbox():
    result = run_quick("bench_sandbox.py")
    assert result["machine"] and result["isolation"]["seccomp_filter_instructions"] > 0


@pytest.mark.slow
def test_bench_logprob():
    result = run_quick("bench_logprob.py")
    assert result["bench"] == "logprob" and result["cpu"]["shape"]["T"] == 256


@pytest.mark.slow
def test_bench_rollout():
    result = run_quick("bench_rollout.py")
    assert result["plain"]["rci_fast_tok_s"] > 0 and result["plain"]["floor_tok_s"] > 0
    rates = result["plain"]["floor"]["gemm_rates"]  # both ways of each decode GEMM, the floor the best
    assert rates and all(r["torch"] > 0 for r in rates)
    from rci_fast.model import native
    if native.available():  # the decode step's own GEMM is measured too
        assert all(r["small_gemm"] > 0 for r in rates)
    assert result["plain"]["floor"]["gemm_gflops"] == max(v for r in rates for k, v in r.items() if k != "shape")
    floor = result["plain"]["floor"]  # and the rate of a whole step's GEMMs in sequence, with its floor
    assert floor["step_gemms_gflops"] > 0 and result["plain"]["rci_fast_vs_in_sequence_floor"] > 0
    code = result["with_code"]
    assert code["lockstep_serial_tools_tok_s"] > 0 and code["lockstep_parallel_tools_tok_s"] > 0
    assert 0 <= code["code_time_hidden_fraction"] <= 1
    assert {r["tok_s"] > 0 for r in code["repeatable"].values()} == {True}


@pytest.mark.slow
def test_bench_train_step():
    result = run_quick("bench_train_step.py", "--shapes", "2")
    for side in ("rci_fast", "transformers"):
        r = result[side]
        assert len(r["first_each_s"]) == 2 and len(r["repeat_each_s"]) == 2 and r["repeat_s"] > 0
        assert r["ops_per_step"] > 100 and r["top"] and r["launches_per_step"] is None  # a CPU run
    assert result["speedup_repeat"] > 0


def test_bench_vs_trl_patches_what_the_trainer_calls(monkeypatch):
    """bench_vs_trl reorders the items rci_fast's GRPOTrainer loads by replacing the loader it
    calls; without trl installed (CI) this checks that the trainer still calls that loader by
    its global name and that the replacement reorders what it returns."""
    from rci_fast.train import grpo

    loads = [i for i in dis.get_instructions(grpo.GRPOTrainer.__init__) if i.opname == "LOAD_GLOBAL"]
    assert "train_items" in {i.argval for i in loads}
    environ = dict(os.environ)  # the bench sets HF_HUB_OFFLINE etc. when imported
    try:
        spec = importlib.util.spec_from_file_location("bench_vs_trl", BENCH / "bench_vs_trl.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        os.environ.clear()
        os.environ.update(environ)
    calls = []
    monkeypatch.setattr(grpo, "train_items", lambda cfg, tokenizer: calls.append((cfg, tokenizer)) or ["a", "b", "c"])
    loader = grpo.train_items
    with bench.items_in_order([2, 0, 1]):
        assert grpo.train_items("cfg", "tok") == ["c", "a", "b"]
    assert grpo.train_items is loader and calls == [("cfg", "tok")]


@pytest.mark.slow
def test_bench_vs_trl():
    pytest.importorskip("trl", reason="bench_vs_trl needs `pip install -e .[bench]`")
    result = run_quick("bench_vs_trl.py", "--threads", "2")
    assert result["grpo"]["speedup_vs_trl"] > 0
    assert 0 < result["grpo"]["floor"]["shared_floor_s"] < result["grpo"]["floor"]["floor_s"]
    sft = result["sft"]
    assert sft["floor"]["floor_s"] > 0 and sft["rci_fast"]["of_floor"] > 0 and sft["transformers"]["of_floor"] > 0

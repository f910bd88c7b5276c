"""`rci-fast demo`: the R1-Code-Interpreter recipe end to end on a tiny model, on a CPU.

Stages (each is skipped when its output already exists, and SFT and RL resume from their last
checkpoint, so an interrupted demo continues):
  data       scripted-teacher trajectories for the training families (code runs in the sandbox)
  base       a byte-level BPE tokenizer trained on them, a tiny random Qwen2, and a copying
             warm-up on random tokens (rci_fast/train/warmup.py: the stand-in for pretraining)
  sft        multi-turn SFT of the base model
  potential  each training sample's pass rate p under the SFT model, and Π = 4p(1-p)
  rl         GRPO from the SFT model twice: curriculum (high- to low-potential) and uniform
  eval       base, SFT and both GRPO models, code-interpreter and text-only mode, on held-out
             samples of the training families and on held-out families
  report     <out>/report.md with the table and the PNG plots

The two configs say everything about the run: configs/demo-sft.yaml (model, SFT) and
configs/demo-rl.yaml (training families = tasks.train, held-out families = tasks.test, RL,
potential, eval). The demo only fills in paths and the seed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("rci_fast.demo")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

MODELS = ("base", "sft", "grpo-uniform", "grpo-curriculum")
MODEL_TITLES = {"base": "base (copying warm-up only)", "sft": "SFT", "grpo-uniform": "SFT + GRPO (uniform)",
                "grpo-curriculum": "SFT + GRPO (curriculum)"}
EVAL_SETS = {"samples": "held-out samples", "families": "held-out families"}
# Small enough for a test to run every stage in about a minute.
QUICK_SFT = ["train.epochs=1", "train.max_steps=6"]
QUICK_WARMUP_STEPS = 4
# RL-config keys the demo fills in itself (DemoPlan.rl_cfg): --set cannot change them.
DEMO_SETS = ("seed", "out_dir", "model.path", "curriculum.mode", "curriculum.potential_file",
             "tasks.skip_per_task", "eval.model")
QUICK_RL = ["train.steps=4", "curriculum.steps_per_stage=1", "tasks.samples_per_task=4", "potential.k=2",
            "eval.samples_per_task=2", "eval.attempts=1", "rollout.max_new_tokens=48"]


@dataclass
class DemoPlan:
    out: Path
    seed: int = 0
    per_family: int = 200                 # teacher samples tried per training family
    direct_share: float = 0.0             # of those, answered without code (teacher.py, "direct")
    warmup_steps: int = 2400              # copying warm-up steps of the base model
    sft_config: str = "configs/demo-sft.yaml"
    rl_config: str = "configs/demo-rl.yaml"
    sft_overrides: list[str] = field(default_factory=list)
    rl_overrides: list[str] = field(default_factory=list)

    def sft_cfg(self):
        from rci_fast.config import SFTConfig, load_config

        return load_config(self.sft_config, [*self.sft_overrides, f"seed={self.seed}",
                                             f"out_dir={self.out / 'sft'}", f"model.path={self.out / 'base'}",
                                             f"data.train_file={self.out / 'sft.jsonl'}"], cls=SFTConfig)

    def rl_cfg(self, out_dir: Path, *extra: str):
        from rci_fast.config import RLConfig, load_config

        return load_config(self.rl_config, [*self.rl_overrides, f"seed={self.seed}", f"out_dir={out_dir}",
                                            f"model.path={self.out / 'sft' / 'hf'}",
                                            f"curriculum.potential_file={self.out / 'potential.jsonl'}",
                                            f"tasks.skip_per_task={self.per_family}",  # not the SFT questions
                                            *extra], cls=RLConfig)

    def settings(self) -> dict:
        """Everything that decides the demo's results (the resolved configs less the paths the
        plan derives from its folder): one folder holds the stages of one set of settings."""
        from rci_fast.config import config_to_dict

        sft, rl = config_to_dict(self.sft_cfg()), config_to_dict(self.rl_cfg(self.out / "rl"))
        for cfg, keys in ((sft, ("model.path", "data.train_file")), (rl, ("model.path", "curriculum.potential_file"))):
            del cfg["out_dir"]
            for key in keys:
                section, name = key.split(".")
                del cfg[section][name]
        return {"seed": self.seed, "per_family": self.per_family, "direct_share": self.direct_share,
                "warmup_steps": self.warmup_steps, "sft": sft, "rl": rl}

    def claim_folder(self) -> None:
        """Writes the settings into out/plan.json, or checks a rerun's against those there: a
        stage already done is skipped, so a run with other settings would report the old results
        as its own. Other eval.* settings are taken once no evaluation is left (README: delete
        eval/ to evaluate again). A folder from before plan.json is taken as it is."""
        from rci_fast.files import atomic_write_text

        file, mine = self.out / "plan.json", self.settings()
        if file.exists():
            changed = diff_keys(json.loads(file.read_text()), mine)
            evaluated = any((self.out / "eval").glob("*/eval.json"))
            if changed and (evaluated or not all(key.startswith("rl.eval.") for key in changed)):
                raise ValueError(f"{self.out} holds a demo run with other settings ({', '.join(changed)}): give "
                                 f"this one another --out, or delete {self.out} to start over (to evaluate "
                                 f"with other eval.* settings, delete {self.out / 'eval'})")
        elif any(self.out.iterdir()):
            log.info("demo: %s holds a run from before plan.json; continuing it", self.out)
        atomic_write_text(file, json.dumps(mine, indent=1))

    @property
    def timings_file(self) -> Path:  # seconds per stage, written by run_stage
        return self.out / "timings.json"

    def model_path(self, name: str) -> Path:
        return {"base": self.out / "base", "sft": self.out / "sft" / "hf",
                "grpo-uniform": self.out / "rl-uniform" / "hf",
                "grpo-curriculum": self.out / "rl-curriculum" / "hf"}[name]


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += diff_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(f"{prefix}{key}")
    return keys


def teacher_families(task_names: list[str]) -> list[str]:
    """The scripted teacher's family of each training task (rg/<family>)."""
    from rci_fast.tasks.teacher import FAMILIES

    families = [name.removeprefix("rg/") for name in task_names]
    missing = [f for f in families if f not in FAMILIES]
    if missing or not families:
        raise ValueError(f"demo: tasks.train must list reasoning-gym tasks the scripted teacher knows "
                         f"(rg/<family>, see `rci-fast gen-sft --list-families`); not known: {missing}")
    return families


# After SFT the stages form two lanes that run side by side on a CPU, one process with one thread
# each: at these sizes a second thread speeds a decode step up by only 1.24x, so two one-thread
# processes do about 1.6x the work of one two-thread process. The uniform run does not read the
# potential file, so it need not wait for it.
LANES = (("potential", "rl-curriculum", "eval grpo-curriculum samples", "eval grpo-curriculum families",
          "eval base families"),
         ("rl-uniform", "eval grpo-uniform samples", "eval grpo-uniform families",
          "eval sft samples", "eval sft families", "eval base samples"))
LANE_STAGES = tuple(name for lane in LANES for name in lane)


def elapsed_s(timings: dict, lanes: tuple = ()) -> float:
    """Wall time of the stages in `timings` (seconds each): lanes ran side by side, so together
    they took as long as the longest of them."""
    in_lanes = {name for lane in lanes for name in lane}
    return (sum(t for name, t in timings.items() if name not in in_lanes)
            + max((sum(timings.get(name, 0.0) for name in lane) for lane in lanes), default=0.0))


def run_stage(timings_file: Path, name: str, done: Path, work) -> None:
    """Runs work() unless the stage's output `done` exists; adds its wall time to timings_file."""
    import fcntl

    from rci_fast.files import atomic_write_text

    if done.exists():
        log.info("demo: %s already done (%s)", name, done)
        return
    log.info("demo: %s ...", name)
    start = time.perf_counter()
    work()
    with open(timings_file.with_suffix(".lock"), "w") as lock:  # the lanes write it too
        fcntl.flock(lock, fcntl.LOCK_EX)
        timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
        timings[name] = round(time.perf_counter() - start, 1)
        atomic_write_text(timings_file, json.dumps(timings, indent=1))


def has_checkpoint(cfg) -> bool:
    """An interrupted training stage left a checkpoint: the rerun resumes from it."""
    from rci_fast.train.checkpoint import latest_checkpoint

    return latest_checkpoint(Path(cfg.out_dir) / "checkpoints") is not None


def demo_stages(plan: DemoPlan, info) -> dict:
    """Every stage in order: name -> (the output that marks it done, the work that writes it)."""
    from rci_fast.tasks.teacher import generate
    from rci_fast.tasks.trajectory import load_trajectories, write_trajectories
    from rci_fast.train import run_sft
    from rci_fast.train.grpo import run_rl
    from rci_fast.train.measure import run_eval, run_potential
    from rci_fast.train.model_source import build_tiny_model
    from rci_fast.train.rollouts import make_sandbox
    from rci_fast.train.warmup import copy_warmup

    sft_cfg, rl_base = plan.sft_cfg(), plan.rl_cfg(plan.out / "rl")
    families = teacher_families(rl_base.tasks.train)
    data = plan.out / "sft.jsonl"

    def write_data():
        with make_sandbox(rl_base.rollout, plan.seed) as sandbox:
            trajectories = list(generate(sandbox, families, per_family=plan.per_family, seed=plan.seed,
                                         direct_share=plan.direct_share))
        write_trajectories(str(data), trajectories)

    def build_base():
        init = plan.out / "init_model"
        if not (init / "config.json").exists():
            build_tiny_model(sft_cfg, load_trajectories(str(data)), init)
        copy_warmup(str(init), str(plan.model_path("base")), plan.warmup_steps, seed=plan.seed)

    stages = {"data": (data, write_data),
              "base": (plan.model_path("base") / "config.json", build_base),
              "sft": (plan.model_path("sft") / "config.json",
                      lambda: run_sft(sft_cfg, info, resume=has_checkpoint(sft_cfg))),
              "potential": (plan.out / "potential.jsonl", lambda: run_potential(rl_base, info))}
    for mode in ("curriculum", "uniform"):
        cfg = plan.rl_cfg(plan.out / f"rl-{mode}", f"curriculum.mode={'staged' if mode == 'curriculum' else mode}")
        stages[f"rl-{mode}"] = (plan.model_path(f"grpo-{mode}") / "config.json",
                                lambda cfg=cfg: run_rl(cfg, info, resume=has_checkpoint(cfg)))
    for name in MODELS:
        for eval_set in EVAL_SETS:
            tasks = rl_base.tasks.train if eval_set == "samples" else rl_base.tasks.test
            cfg = plan.rl_cfg(plan.out / "eval" / f"{name}-{eval_set}", f"eval.model={plan.model_path(name)}",
                              f"tasks.test={json.dumps(tasks)}")
            stages[f"eval {name} {eval_set}"] = (Path(cfg.out_dir) / "eval.json", lambda cfg=cfg: run_eval(cfg, info))
    return stages


def lane_threads(lanes: int) -> int:
    """Threads per lane: this machine's cores shared out (one each on 2 cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // lanes)


def run_lane(plan: DemoPlan, device: str | None, names: tuple[str, ...], threads: int) -> None:
    """One lane, in its own process. Its log lines go to the terminal as usual, its progress bars
    are off (run_lanes shows one)."""
    import torch

    from rci_fast.train import init_distributed

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    torch.set_num_threads(threads)
    info = init_distributed(device)
    try:
        stages = demo_stages(plan, info)
        for name in names:
            run_stage(plan.timings_file, name, *stages[name])
    finally:
        info.close()


def run_lanes(plan: DemoPlan, device: str | None, stages: dict) -> None:
    """Runs the stages of LANES not yet done, the lanes side by side (a process each), with one
    progress bar over their stages. A failing lane is reported at once; the other one finishes
    its stage list (its work is kept), then the error is raised."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    pending = [tuple(name for name in lane if not stages[name][0].exists()) for lane in LANES]
    for name in [name for name in LANE_STAGES if stages[name][0].exists()]:
        run_stage(plan.timings_file, name, *stages[name])  # logs "already done"
    lanes = [lane for lane in pending if lane]
    if not lanes:
        return
    threads = lane_threads(len(lanes))
    log.info("demo: side by side, a process with %d thread(s) each: %s", threads,
             " | ".join(" -> ".join(lane) for lane in lanes))
    # One pool per lane: a lane that dies (killed, out of memory) does not take the other with it.
    context = multiprocessing.get_context("spawn")
    pools = [ProcessPoolExecutor(1, mp_context=context) for _ in lanes]
    # Two bars on one terminal garble each other: the lanes inherit TQDM_DISABLE, which tqdm reads
    # on import (this process has imported it already and keeps its bar). CPython's pool starts a
    # spawn-context worker inside submit(), so the variable need only be set around it.
    before, os.environ["TQDM_DISABLE"] = os.environ.get("TQDM_DISABLE"), "1"
    try:
        futures = [pool.submit(run_lane, plan, device, lane, threads) for pool, lane in zip(pools, lanes)]
    finally:
        if before is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = before
    stages_done = lambda: sum(stages[name][0].exists() for name in LANE_STAGES)  # noqa: E731
    try:
        with tqdm(total=len(LANE_STAGES), initial=stages_done(), desc="demo: rl and eval", unit="stage",
                  dynamic_ncols=True) as bar:
            running = dict(zip(futures, lanes))
            while running:
                time.sleep(1.0)
                bar.update(stages_done() - bar.n)
                for future in [f for f in running if f.done()]:
                    if future.exception() is not None:
                        log.error("demo: lane %s failed: %r; the other lane goes on, then the demo stops",
                                  " -> ".join(running[future]), future.exception())
                    del running[future]
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        future.result()  # the first failed lane's exception, raised here


def run_demo(plan: DemoPlan, device: str | None = None) -> Path:
    """Runs every stage not yet done; returns the report's path."""
    from rci_fast.train import init_distributed

    plan.out.mkdir(parents=True, exist_ok=True)
    plan.claim_folder()
    info = init_distributed(device)
    if info.world_size != 1:
        raise RuntimeError("rci-fast demo runs as one process (use the sft/rl commands under torchrun)")
    try:
        stages = demo_stages(plan, info)
        assert set(LANE_STAGES) <= set(stages) - {"data", "base", "sft"}
        side_by_side = info.device.type == "cpu" and lane_threads(1) >= 2  # a core per lane at least
        for name, (done, work) in stages.items():
            if not (side_by_side and name in LANE_STAGES):
                run_stage(plan.timings_file, name, done, work)
        if side_by_side:
            run_lanes(plan, device, stages)
    finally:
        info.close()
    from rci_fast.demo_report import write_report

    timings = json.loads(plan.timings_file.read_text()) if plan.timings_file.exists() else {}
    return write_report(plan, plan.rl_cfg(plan.out / "rl"), timings, LANES if side_by_side else ())


def read_eval(out: Path, name: str, eval_set: str) -> dict | None:
    """eval.json of one model on one evaluation set of a demo folder, None before that stage ran."""
    path = out / "eval" / f"{name}-{eval_set}" / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def load_results(out: Path) -> dict:
    """{model: {eval_set: {mode: mean accuracy over tasks}}} of a finished demo folder."""
    results: dict = {}
    for name in MODELS:
        for eval_set in EVAL_SETS:
            if (report := read_eval(out, name, eval_set)) is not None:
                results.setdefault(name, {})[eval_set] = report["mean_accuracy"]
    return results


def load_code_calls(out: Path) -> dict:
    """{model: code calls per episode} on held-out samples in code mode, mean over tasks."""
    calls = {}
    for name in MODELS:
        reports = (read_eval(out, name, "samples") or {}).get("modes", {}).get("code", [])
        if reports:
            calls[name] = float(np.mean([r["mean_code_calls"] for r in reports]))
    return calls


def paired_gain(out: Path, name: str) -> tuple[float, float] | None:
    """Model `name` - SFT on the held-out samples in code mode, one run: the accuracy difference
    (mean over tasks) and its standard error over questions, from the per-question counts of
    correct answers (both models answer the same questions, so the difference is paired). The
    error is the evaluation's own noise (which answers were sampled, which questions were asked),
    not the run-to-run noise of training. None for evaluations without per-question counts."""
    from rci_fast.evaluate import mean_over_tasks

    reports = [(read_eval(out, n, "samples") or {}).get("modes", {}).get("code", []) for n in (name, "sft")]
    if not all(reports) or any(not r.get("correct") for r in reports[0] + reports[1]):
        return None
    sft = {r["task"]: r for r in reports[1]}
    return mean_over_tasks([[c / r["attempts"] - sft[r["task"]]["correct"][sid] / sft[r["task"]]["attempts"]
                             for sid, c in r["correct"].items()] for r in reports[0]])


def results_table(cell) -> list[str]:
    """The results as Markdown lines: a row per model, a column per (evaluation set, mode);
    cell(model, eval_set, mode) gives the text of one cell."""
    cols = [(s, m) for s in EVAL_SETS for m in ("code", "text")]
    lines = ["| model | " + " | ".join(f"{EVAL_SETS[s]}, {m}" for s, m in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in MODELS:
        lines.append(f"| {MODEL_TITLES[name]} | " + " | ".join(cell(name, s, m) for s, m in cols) + " |")
    return lines


def summarize(outs: list[Path]) -> str:
    """Mean ± standard deviation over several demo runs (seeds) of every table cell, and the
    GRPO - SFT gain per run, as a Markdown table."""
    runs = [load_results(o) for o in outs]
    if not runs or any(not r for r in runs):
        missing = [str(o) for o, r in zip(outs, runs) if not r]
        raise FileNotFoundError(f"no finished demo (eval/*/eval.json) in: {', '.join(missing) or 'no folder given'}")

    def cell(name, eval_set, mode):
        values = [r[name][eval_set][mode] for r in runs if mode in r.get(name, {}).get(eval_set, {})]
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-"

    lines = [f"{len(runs)} runs: {', '.join(str(o) for o in outs)} (mean ± std of the mean accuracy over tasks)",
             "", *results_table(cell)]
    calls = [load_code_calls(o) for o in outs]
    lines.append("\nCode calls per episode, held-out samples, code mode: " + "; ".join(
        f"{MODEL_TITLES[name]} {np.mean([c[name] for c in calls]):.2f} ± {np.std([c[name] for c in calls]):.2f}"
        for name in MODELS if all(name in c for c in calls)))
    for name in ("grpo-uniform", "grpo-curriculum"):
        gains = [r[name]["samples"]["code"] - r["sft"]["samples"]["code"] for r in runs
                 if "code" in r.get(name, {}).get("samples", {})]
        if gains:
            lines.append(f"\n{MODEL_TITLES[name]} - SFT, held-out samples, code mode: {np.mean(gains):+.3f} "
                         f"± {np.std(gains):.3f} (per run: {', '.join(f'{g:+.3f}' for g in gains)})")
            paired = [paired_gain(o, name) for o in outs]
            if all(paired):
                errors = [se for _, se in paired]
                lines.append(f"  the evaluation's standard error per run (paired over questions): "
                             f"{', '.join(f'{se:.3f}' for se in errors)}; of the mean over runs: "
                             f"{np.sqrt(np.sum(np.square(errors))) / len(errors):.3f}")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole recipe on a tiny model on a CPU, with a report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1] + "\nExamples:\n"
        "  rci-fast demo                          # runs/demo/report.md\n"
        "  rci-fast demo --seed 1 --out runs/demo-seed1 --set eval.attempts=16\n"
        "  rci-fast demo --summary runs/demo runs/demo-seed1 runs/demo-seed2")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/demo, with --quick runs/demo-quick); a rerun with the "
                        "same settings continues it, one with other settings is refused")
    p.add_argument("--seed", type=int, default=0, help="seed of data styles, init, SFT order, sampling (default 0)")
    p.add_argument("--per-family", type=int, default=200, help="teacher samples per training family (default 200)")
    p.add_argument("--direct-share", type=float, default=0.0,
                   help="share of teacher samples answered without code, as a strong model would answer "
                        "from memory (default 0: none)")
    p.add_argument("--warmup-steps", type=int, default=2400,
                   help="copying warm-up steps of the random base model (default 2400)")
    p.add_argument("--sft-config", default="configs/demo-sft.yaml", help="SFT config (default configs/demo-sft.yaml)")
    p.add_argument("--rl-config", default="configs/demo-rl.yaml",
                   help="RL/potential/eval config; tasks.train = training families, tasks.test = held-out "
                        "families (default configs/demo-rl.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="rl_set",
                   help="override a key of the RL config, repeatable: --set eval.attempts=16 evaluates 16 "
                        "answers per question (the README's table); seed, out_dir, model.path, "
                        "curriculum.mode, curriculum.potential_file, tasks.skip_per_task and eval.model "
                        "are the demo's own")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (checks the pipeline, ~1 min)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--summary", nargs="+", metavar="DIR",
                   help="print mean ± std over finished demo folders (seeds) instead of running")
    p.set_defaults(func=_main)


def _main(args) -> int:
    import sys

    from rci_fast.config import ConfigError

    if args.summary:
        try:
            print(summarize([Path(d) for d in args.summary]))
        except FileNotFoundError as e:
            print(f"rci-fast demo: {e}", file=sys.stderr)
            return 1
        return 0
    for path in (args.sft_config, args.rl_config):
        if not os.path.isfile(path):
            print(f"rci-fast demo: config not found: {path} (run from the repository root or pass "
                  f"--sft-config/--rl-config)", file=sys.stderr)
            return 2
    taken = [kv for kv in args.rl_set if kv.split("=", 1)[0].strip() in DEMO_SETS]
    if taken:
        print(f"rci-fast demo: --set {taken[0]}: the demo sets this key itself (see --seed, --out)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    plan = DemoPlan(Path(out), args.seed, args.per_family, args.direct_share, args.warmup_steps,
                    args.sft_config, args.rl_config, QUICK_SFT if args.quick else [],
                    [*(QUICK_RL if args.quick else []), *args.rl_set])
    if args.quick:
        plan.per_family, plan.warmup_steps = min(plan.per_family, 8), QUICK_WARMUP_STEPS
    try:  # both configs with every override, checked before any work starts
        plan.sft_cfg(), plan.rl_cfg(plan.out / "rl")
    except ConfigError as e:
        print(f"rci-fast demo: {e}", file=sys.stderr)
        return 2
    try:
        report = run_demo(plan, args.device)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"rci-fast demo: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        print("rci-fast demo: interrupted; the same command continues where it stopped", file=sys.stderr)
        return 130
    print(f"demo: report in {report}\n")
    table = [line for line in report.read_text().splitlines() if line.startswith("|")][:6]
    print("\n".join(table))
    return 0

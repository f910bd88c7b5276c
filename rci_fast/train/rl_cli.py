"""`rci-fast potential`, `rci-fast rl`, `rci-fast eval`: parse, check the config, dispatch (also
under torchrun). The three share one config (rci_fast.config.RLConfig, e.g. configs/smoke-rl.yaml)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

_EXAMPLES = {
    "potential": "  rci-fast potential --config configs/smoke-rl.yaml potential.k=8\n",
    "rl": "  rci-fast rl --config configs/smoke-rl.yaml train.steps=20\n"
          "  torchrun --nproc_per_node 8 -m rci_fast rl --config configs/qwen2.5-7b-rl.yaml\n"
          "  rci-fast rl --config configs/smoke-rl.yaml --resume\n",
    "eval": "  rci-fast eval --config configs/smoke-rl.yaml eval.model=runs/smoke/sft/hf\n",
}
_HELP = {
    "potential": ("estimate each training sample's pass rate p and improvement potential 4p(1-p)",
                  "Rolls out potential.k attempts per training sample (the tasks of tasks.train, batched "
                  "through the engine with code running in the sandbox), writes one line per sample "
                  "(task, sample_id, p, potential, group) to curriculum.potential_file (default "
                  "<out_dir>/potential.jsonl) and prints the sizes of the 4 potential groups."),
    "rl": ("GRPO with the improvement-potential curriculum (FSDP2; torchrun for several ranks)",
           "Each step: the curriculum draws prompts (staged from the potential file, online, or uniform), "
           "every rank rolls out its share with the current weights, rewards and group advantages, then "
           "the clipped policy loss with KL to a frozen reference, normalised by the global token count. "
           "Writes <out_dir>/metrics.jsonl, <out_dir>/checkpoints/ (--resume continues exactly) and "
           "<out_dir>/hf."),
    "eval": ("per-task accuracy, pass@k, turns and code calls on the test tasks",
             "Evaluates eval.model (default: <out_dir>/hf when the RL run exported it, else model.path) on "
             "the test tasks (tasks.test, or the test split), in code-interpreter mode and text-only mode "
             "(eval.modes); prints a table per mode and writes <out_dir>/eval.json."),
}


def add_parser(subparsers) -> None:
    for name, func in (("potential", _potential), ("rl", _rl), ("eval", _eval)):
        short, long = _HELP[name]
        p = subparsers.add_parser(name, help=short, formatter_class=argparse.RawDescriptionHelpFormatter,
                                  description=long + "\n\n" + _EXAMPLES[name])
        p.add_argument("--config", required=True, help="YAML config (see configs/smoke-rl.yaml)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted overrides, value read as YAML: train.lr=2e-6 out_dir=runs/x")
        p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="an override (repeatable), same as a positional KEY=VALUE")
        p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        if name == "rl":
            p.add_argument("--resume", action="store_true",
                           help="continue from the latest complete checkpoint in <out_dir>/checkpoints")
        p.set_defaults(func=func, command_name=name)


def _setup(args):
    """(config, None) or (None, exit code) after printing why."""
    import yaml

    from rci_fast.config import ConfigError, RLConfig, config_to_dict, load_config

    try:
        cfg = load_config(args.config, [*args.overrides, *args.set_overrides], cls=RLConfig)
    except ConfigError as e:
        print(f"rci-fast {args.command_name}: {e}", file=sys.stderr)
        return None, 2
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return None, 0
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    return cfg, None


def _run(args, work) -> int:
    cfg, code = _setup(args)
    if cfg is None:
        return code
    from rci_fast.tasks import TaskDataError
    from rci_fast.train import TrainingDiverged, init_distributed

    info = init_distributed(args.device)
    try:
        result = work(cfg, info)
    except (ValueError, FileNotFoundError, TaskDataError, TrainingDiverged) as e:
        print(f"rci-fast {args.command_name}: {e}", file=sys.stderr)
        return 1
    finally:
        info.close()
    if info.is_main:
        print(result)
    return 0


def _potential(args) -> int:
    def work(cfg, info):
        from rci_fast.train.measure import run_potential

        s = run_potential(cfg, info)
        if s is None:
            return None
        groups = ", ".join(f"group {g} ({lo}): {n}" for g, (lo, n) in
                           enumerate(zip(["Π>=0.64", "0.48<=Π<0.64", "0.32<=Π<0.48", "Π<0.32"], s["group_sizes"])))
        return (f"potential: {s['samples']} samples, mean p {s['mean_pass_rate']:.3f}; {groups}\n"
                f"written to {s['path']}")
    return _run(args, work)


def _rl(args) -> int:
    def work(cfg, info):
        from rci_fast.train.grpo import run_rl

        rows = run_rl(cfg, info, resume=args.resume)
        if not rows:
            return f"rl: nothing to do (already at step {cfg.train.steps})"
        last = rows[-1]
        return (f"rl: step {last['step']} reward {last['reward_mean']:.3f} accuracy {last['accuracy']:.3f} "
                f"kl {last['kl']:.4f}; {cfg.out_dir}/metrics.jsonl, checkpoints in {cfg.out_dir}/checkpoints"
                + (f", export in {cfg.out_dir}/hf" if cfg.checkpoint.export_at_end else ""))
    return _run(args, work)


def _eval(args) -> int:
    def work(cfg, info):
        from rci_fast.evaluate import format_table
        from rci_fast.train.measure import run_eval

        out = run_eval(cfg, info)
        if out is None:
            return None
        parts = [f"model: {out['model']} ({out['attempts']} attempts per sample, temperature {out['temperature']})"]
        for mode, reports in out["reports"].items():
            parts.append(f"\n[{mode} mode]\n{format_table(reports)}")
        parts.append(f"\nwritten to {cfg.out_dir}/eval.json")
        return "\n".join(parts)
    return _run(args, work)

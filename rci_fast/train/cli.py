"""`rci-fast sft`: parse, check the config, dispatch (also under torchrun)."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def add_parser(subparsers) -> None:
    sft = subparsers.add_parser(
        "sft", help="multi-turn SFT on trajectory JSONL (FSDP2; torchrun for several ranks)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Supervised fine-tuning on multi-turn code-interpreter trajectories: the loss is "
                    "on the assistant's tokens only (prompts and interpreter output are context), "
                    "sequences are packed without padding, the loss is the token mean over the "
                    "whole global batch.\n\n"
                    "  rci-fast sft --config configs/smoke.yaml train.max_steps=20\n"
                    "  torchrun --nproc_per_node 8 -m rci_fast sft --config configs/qwen2.5-7b-sft.yaml\n\n"
                    "Writes <out_dir>/metrics.jsonl (one row per step), <out_dir>/checkpoints/ "
                    "(sharded, --resume continues exactly) and <out_dir>/hf (safetensors + tokenizer).")
    sft.add_argument("--config", required=True, help="YAML config (see configs/)")
    sft.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="dotted overrides, value read as YAML: train.lr=2e-5 out_dir=runs/x")
    sft.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="an override (repeatable), same as a positional KEY=VALUE")
    sft.add_argument("--resume", action="store_true",
                     help="continue from the latest complete checkpoint in <out_dir>/checkpoints")
    sft.add_argument("--device", choices=("cuda", "cpu"), default=None,
                     help="default: cuda when available")
    sft.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    sft.set_defaults(func=_sft)

    export = subparsers.add_parser(
        "export", help="write a training checkpoint as a Hugging Face folder",
        description="Gathers the sharded weights of a checkpoint into a Hugging Face folder "
                    "(config.json, safetensors, tokenizer) that transformers and vLLM load. "
                    "Runs as one process or under torchrun.")
    export.add_argument("--config", required=True, help="the run's YAML config, SFT or RL (for out_dir and the model)")
    export.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as for sft")
    export.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override, as for sft (repeatable)")
    export.add_argument("--checkpoint", help="a checkpoint folder (default: the latest in <out_dir>/checkpoints)")
    export.add_argument("--out", required=True,
                        help="folder to write (a previous one is replaced only once the new one is complete)")
    export.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weights dtype (default bf16)")
    export.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    export.set_defaults(func=_export)


def _sft(args) -> int:
    import yaml

    from rci_fast.config import ConfigError, config_to_dict, load_config

    try:  # every key and type is checked before anything heavy starts
        cfg = load_config(args.config, [*args.overrides, *args.set_overrides])
    except ConfigError as e:
        print(f"rci-fast sft: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    if not os.path.isfile(cfg.data.train_file):
        print(f"rci-fast sft: data.train_file not found: {cfg.data.train_file} (write one with "
              f"`rci-fast gen-sft --teacher scripted --out {cfg.data.train_file}`)", file=sys.stderr)
        return 2
    from rci_fast.tasks.trajectory import TrajectoryFormatError
    from rci_fast.train import TrainingDiverged, init_distributed, run_sft

    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    info = init_distributed(args.device)
    try:
        rows = run_sft(cfg, info, resume=args.resume)
    except (TrajectoryFormatError, ValueError, FileNotFoundError, TrainingDiverged) as e:
        print(f"rci-fast sft: {e}", file=sys.stderr)
        return 1
    finally:
        info.close()
    if rows and info.is_main:
        last = rows[-1]
        print(f"sft: step {last['step']} loss {last['loss']:.4f}; {cfg.out_dir}/metrics.jsonl, "
              f"checkpoints in {cfg.out_dir}/checkpoints"
              + (f", export in {cfg.out_dir}/hf" if cfg.checkpoint.export_at_end else ""))
    return 0


def _export(args) -> int:
    from rci_fast.config import ConfigError, RLConfig, SFTConfig, load_config

    errors = []
    for cls in (SFTConfig, RLConfig):  # an SFT run's config or an RL run's
        try:
            cfg = load_config(args.config, [*args.overrides, *args.set_overrides], cls=cls)
            break
        except ConfigError as e:
            errors.append(e)
    else:
        print(f"rci-fast export: {errors[0]} (read as an RL config: {errors[1]})", file=sys.stderr)
        return 2
    from rci_fast.train import init_distributed
    from rci_fast.train.export import export_checkpoint

    info = init_distributed(args.device)
    try:
        path = export_checkpoint(cfg, info, args.out, args.checkpoint, args.dtype)
    except FileNotFoundError as e:
        print(f"rci-fast export: {e}", file=sys.stderr)
        return 1
    finally:
        info.close()
    if info.is_main:
        print(f"exported {path} to {args.out}")
    return 0

"""`rci-fast tasks` (the registry as a table) and `rci-fast gen-sft` (SFT trajectories)."""
from __future__ import annotations

import collections
import os
import sys

from rci_fast.config import RolloutSection


def add_parser(subparsers) -> None:
    tasks = subparsers.add_parser(
        "tasks", help="list the task registry as a table",
        description="Prints every registered task: source, name, number of samples, its side of "
                    "the fixed 107/37 task split (extra = registered, outside the split) and how "
                    "answers are verified (exact match, constraint checker, reasoning-gym scorer).")
    tasks.add_argument("--source", choices=("symbench", "bbh", "rg"), help="only this source")
    tasks.add_argument("--split", choices=("train", "test", "extra"), help="only tasks on this side of the split")
    tasks.add_argument("--data-dir", help="folder holding bbh/ and symbench/ (default: $RCI_FAST_DATA, "
                                          "else ../shared/data next to the project)")
    tasks.set_defaults(func=_tasks)

    gen = subparsers.add_parser(
        "gen-sft", help="write multi-turn SFT trajectories (JSONL)",
        description="Writes SFT trajectories in the JSONL format of rci_fast/tasks/README.md. "
                    "--teacher scripted: a scripted teacher writes Python for procedurally "
                    "generated reasoning-gym tasks, runs it in the sandbox, and keeps the "
                    "trajectories whose final answer the task's verifier scores 1.0. "
                    "--teacher policy: a model (--model, a Hugging Face Qwen2/Llama folder with "
                    "its tokenizer) rolls out on the train tasks with the rollout engine, code "
                    "running in the sandbox; correct, well-formed attempts are kept (rejection "
                    "sampling, as the paper did with GPT-4o).")
    gen.add_argument("--teacher", choices=("scripted", "policy"), default="scripted",
                     help="who writes the trajectories (scripted: no model needed)")
    gen.add_argument("--model", help="--teacher policy: model folder (config.json, safetensors, tokenizer)")
    gen.add_argument("--tasks", help="--teacher policy: comma-separated task names (default: all train tasks)")
    gen.add_argument("--data-dir", help="folder holding bbh/ and symbench/ (default: $RCI_FAST_DATA, "
                                        "else ../shared/data)")
    gen.add_argument("--attempts", type=int, default=4, help="--teacher policy: attempts per sample (default 4)")
    gen.add_argument("--max-per-task", type=int, default=50, help="--teacher policy: kept per task (default 50)")
    gen.add_argument("--samples-per-task", type=int, default=None,
                     help="--teacher policy: samples tried per task (default: all of the split)")
    gen.add_argument("--temperature", type=float, default=1.0,
                     help="--teacher policy: sampling temperature (default 1.0)")
    gen.add_argument("--max-new-tokens", type=int, default=1024,
                     help="--teacher policy: per episode (default 1024)")
    gen.add_argument("--result-delay-steps", type=int, default=RolloutSection.result_delay_steps,
                     help="--teacher policy: decode steps after which a code result rejoins its sequence "
                          f"(default: the trainer's rollout.result_delay_steps, {RolloutSection.result_delay_steps}: "
                          "runs repeat to the bit; 0: as soon as it arrives, faster)")
    gen.add_argument("--device", choices=("cuda", "cpu"), default=None,
                     help="--teacher policy: where the model runs (default: cuda, in bf16, when available; "
                          "else cpu, in float32)")
    gen.add_argument("--out", help="output JSONL file (overwritten); required unless --list-families")
    gen.add_argument("--families",
                     help="--teacher scripted: comma-separated teacher families (default: all; see --list-families)")
    gen.add_argument("--per-family", type=int, default=50,
                     help="--teacher scripted: samples tried per family (default 50)")
    gen.add_argument("--split", choices=("train", "validation"), default="train",
                     help="per-task sample split the questions come from (default train)")
    gen.add_argument("--seed", type=int, default=0,
                     help="seed of the style choices, and with --teacher policy of sampling and the sandbox "
                          "(default 0)")
    gen.add_argument("--direct-share", type=float, default=0.0,
                     help="--teacher scripted: share of samples answered without code (style direct; default 0)")
    gen.add_argument("--workers", type=int, default=2, help="sandbox workers (default 2)")
    gen.add_argument("--timeout", type=float, default=10.0, help="seconds per code run (default 10)")
    gen.add_argument("--list-families", action="store_true", help="print the teacher families and exit")
    gen.set_defaults(func=_gen_sft)


def _tasks(args) -> int:
    from rci_fast.tasks import TaskDataError, list_tasks, load_task, task_split

    try:
        names = list_tasks(source=args.source, split=args.split, data_dir=args.data_dir)
        rows = []
        for name in names:
            task = load_task(name, data_dir=args.data_dir) if not name.startswith("rg/") else None
            count = str(len(task.samples())) if task else "procedural"
            verifier = task.verifier if task else "reasoning-gym"
            source, _, short = name.partition("/")
            rows.append((source, short, count, task_split(name) or "-", verifier))
    except TaskDataError as e:
        print(f"rci-fast tasks: {e}", file=sys.stderr)
        return 2
    header = ("source", "task", "samples", "split", "verifier")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    by = collections.Counter((r[0], r[3]) for r in rows)
    sources = sorted({r[0] for r in rows})
    print("\n" + "; ".join(f"{s}: {sum(v for (src, _), v in by.items() if src == s)} "
                          f"(train {by[(s, 'train')]}, test {by[(s, 'test')]}, extra {by[(s, 'extra')]})"
                          for s in sources) + f"; total {len(rows)}")
    return 0


def _gen_sft(args) -> int:
    from rci_fast.tasks.teacher import FAMILIES, generate
    from rci_fast.tasks.trajectory import write_trajectories

    if args.list_families:
        print("\n".join(f"{name}  (styles: {', '.join(f.styles)})" for name, f in sorted(FAMILIES.items())))
        return 0
    if not args.out:
        print("rci-fast gen-sft: --out FILE is required", file=sys.stderr)
        return 2
    try:  # before the work: a bad --out would otherwise fail only once everything is generated
        if os.path.isdir(args.out):
            raise IsADirectoryError(f"--out {args.out} is a folder; give a file name")
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"--out {args.out}: cannot write in {folder}")
    except OSError as e:
        print(f"rci-fast gen-sft: {e}", file=sys.stderr)
        return 2
    if args.teacher == "policy":
        return _gen_sft_policy(args)
    families = args.families.split(",") if args.families else None
    unknown = [f for f in families or [] if f not in FAMILIES]
    if unknown:
        print(f"rci-fast gen-sft: unknown families {unknown}; known: {', '.join(sorted(FAMILIES))}", file=sys.stderr)
        return 2
    from rci_fast.sandbox import Sandbox

    with Sandbox(workers=args.workers, seed=args.seed % 2**32) as sandbox:
        trajectories = list(generate(sandbox, families, per_family=args.per_family, seed=args.seed,
                                     split=args.split, timeout_s=args.timeout, direct_share=args.direct_share))
    n = write_trajectories(args.out, trajectories)
    styles = collections.Counter(t.source for t in trajectories)
    tried = args.per_family * len(families or FAMILIES)
    print(f"wrote {n} correct trajectories of {tried} tried to {args.out} "
          f"({', '.join(f'{k}: {v}' for k, v in sorted(styles.items()))})")
    return 0


def _gen_sft_policy(args) -> int:
    if not args.model or not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"rci-fast gen-sft: --teacher policy needs --model DIR holding config.json "
              f"(got {args.model!r})", file=sys.stderr)
        return 2
    from rci_fast.model import load_pretrained
    from rci_fast.rollout import RolloutEngine, SamplingParams
    from rci_fast.rollout.policy import engine_policy
    from rci_fast.sandbox import Sandbox
    from rci_fast.tasks import TaskDataError, list_tasks, load_task
    from rci_fast.tasks.rejection import rejection_sample
    from rci_fast.tasks.trajectory import write_trajectories
    from rci_fast.train.model_source import load_tokenizer

    if args.result_delay_steps < 0:
        print(f"rci-fast gen-sft: --result-delay-steps must be >= 0 (got {args.result_delay_steps})", file=sys.stderr)
        return 2
    try:
        names = args.tasks.split(",") if args.tasks else list_tasks(split="train", data_dir=args.data_dir)
        tasks = [load_task(n, data_dir=args.data_dir) for n in names]
    except (TaskDataError, KeyError, ValueError) as e:
        print(f"rci-fast gen-sft: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = load_tokenizer(args.model, model_key="--model")
    except FileNotFoundError as e:
        print(f"rci-fast gen-sft: {e}", file=sys.stderr)
        return 2
    model = load_pretrained(args.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            max_total_tokens=args.max_new_tokens + 2048, seed=args.seed)
    with Sandbox(workers=args.workers, seed=args.seed % 2**32) as sandbox:
        engine = RolloutEngine(model, tokenizer, sandbox, code_timeout_s=args.timeout,
                               result_delay_steps=args.result_delay_steps)
        trajectories = list(rejection_sample(
            tasks, engine_policy(engine, params), attempts=args.attempts,
            max_per_task=args.max_per_task, samples_per_task=args.samples_per_task,
            split=args.split, source=f"policy:{os.path.basename(os.path.normpath(args.model))}"))
    n = write_trajectories(args.out, trajectories)
    print(f"wrote {n} correct trajectories from {len(tasks)} tasks to {args.out}")
    return 0

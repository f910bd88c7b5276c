"""Run configuration: dataclasses read from YAML, with dotted command-line overrides.

    cfg = load_config("configs/smoke.yaml", ["train.lr=1e-5", "out_dir=runs/x"])
    cfg.train.lr, cfg.data.train_file, cfg.model.path

Every key is checked before any work starts: an unknown key or a value of the wrong type raises
ConfigError naming the dotted key (`train.lrr`, `train.lr`). Overrides are `key=value` with the
value read as YAML (`train.epochs=2`, `model.path=null`, `train.betas=[0.9,0.95]`).
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad config file or override; the message names the dotted key."""


@dataclass
class TinyModelConfig:
    """A random Qwen2 built locally when model.path is null (smoke tests, demos)."""
    vocab_size: int = 512            # of the byte-level BPE tokenizer trained on the SFT data
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = True
    init_std: float = 0.02


@dataclass
class ModelSection:
    path: str | None = None          # HF folder (config.json + safetensors); null: build `tiny`
    tokenizer: str | None = None     # tokenizer folder; default: model.path
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    activation_checkpointing: bool = False


@dataclass
class DataSection:
    train_file: str = ""             # SFT trajectory JSONL (rci_fast/tasks/README.md)
    max_seq_len: int = 0             # longer trajectories are dropped with a warning; 0: no limit
    min_score: float | None = None   # keep rows whose score >= this (null: keep all)
    check_chat_template: bool = True  # segments must render as the tokenizer's chat template does


@dataclass
class TrainSection:
    epochs: int = 1
    max_steps: int = 0               # > 0: stop after this many optimizer steps
    batch_size: int = 32             # sequences per optimizer step, over all ranks
    micro_batch_tokens: int = 8192   # token budget of one packed micro-batch on one rank
    lr: float = 1e-5
    min_lr_ratio: float = 0.0        # cosine decays to lr * min_lr_ratio
    schedule: str = "cosine"         # cosine | constant (both after warmup)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0        # used when warmup_steps is 0: a fraction of all steps
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0           # max global grad norm; 0: no clipping (the norm is still logged)
    max_bad_steps: int = 5           # abort after this many non-finite losses in a row
    mixed_precision: str = "auto"    # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32


@dataclass
class CheckpointSection:
    every: int = 0                   # save every N optimizer steps; 0: only at the end
    keep: int = 2                    # complete checkpoints kept (older ones are deleted)
    export_at_end: bool = True       # write <out_dir>/hf (safetensors + tokenizer) after training


@dataclass
class SFTConfig:
    out_dir: str = "runs/sft"
    seed: int = 0
    log_every: int = 1               # progress-bar refresh (metrics.jsonl gets every step)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def validate(self) -> None:
        """Value checks beyond types, each naming its key."""
        t = self.train
        positive = {"train.epochs": t.epochs, "train.batch_size": t.batch_size,
                    "train.micro_batch_tokens": t.micro_batch_tokens, "train.max_bad_steps": t.max_bad_steps,
                    "log_every": self.log_every, "checkpoint.keep": self.checkpoint.keep}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1 (got {value})")
        for key, value in {"train.max_steps": t.max_steps, "train.warmup_steps": t.warmup_steps,
                           "checkpoint.every": self.checkpoint.every, "data.max_seq_len": self.data.max_seq_len,
                           "train.grad_clip": t.grad_clip, "train.weight_decay": t.weight_decay}.items():
            if value < 0:
                raise ConfigError(f"{key}: must be >= 0 (got {value})")
        if not t.lr > 0:
            raise ConfigError(f"train.lr: must be > 0 (got {t.lr})")
        if t.schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.schedule: expected cosine or constant (got {t.schedule!r})")
        if t.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.mixed_precision: expected auto, bf16 or fp32 (got {t.mixed_precision!r})")
        if not 0 <= t.warmup_ratio < 1 or not 0 <= t.min_lr_ratio <= 1:
            raise ConfigError("train.warmup_ratio must be in [0, 1) and train.min_lr_ratio in [0, 1]")
        if len(t.betas) != 2:
            raise ConfigError(f"train.betas: expected two numbers (got {t.betas})")
        if not self.data.train_file:
            raise ConfigError("data.train_file: required (an SFT trajectory JSONL file)")
        m = self.model.tiny
        if self.model.path is None:
            for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads"):
                if getattr(m, key) < 1:
                    raise ConfigError(f"model.tiny.{key}: must be >= 1 (got {getattr(m, key)})")
            if m.hidden_size % m.num_attention_heads:
                raise ConfigError("model.tiny.hidden_size: must be a multiple of num_attention_heads")
            if m.num_attention_heads % m.num_key_value_heads:
                raise ConfigError(f"model.tiny.num_key_value_heads: must divide num_attention_heads "
                                  f"({m.num_attention_heads}), got {m.num_key_value_heads}")


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value, hint, key: str):
    """`value` checked against the type hint `hint`; returns it (ints widen to float; YAML 1.1
    reads `1e-5` as a string, which a float field accepts)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} keys, got {value!r}")
        return _build(hint, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        number = None
        try:
            if isinstance(value, str) and _NUMBER.match(value.strip()):
                number = float(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
        except OverflowError:  # an int past float's range
            number = float("inf")
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is bool or hint is str:
        if isinstance(value, hint):
            return value
    else:
        raise TypeError(f"config field {key} has an unsupported type {hint}")
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got "
                      f"{type(value).__name__} {value!r}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in hints:
            raise ConfigError(f"unknown key '{prefix}{key}' (known under {prefix[:-1] or 'the top level'}: "
                              f"{', '.join(names)})")
    defaults = cls()
    kwargs = {}
    for name in names:
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], prefix + name)
        else:
            kwargs[name] = getattr(defaults, name)
    return cls(**kwargs)


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error's reason in one line (its str() spans lines and names "<unicode string>")."""
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    return ", ".join(p for p in parts if p) or str(error).splitlines()[0]


def apply_override(tree: dict, assignment: str) -> None:
    """`a.b.c=value` sets tree['a']['b']['c'] (the value read as YAML)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {assignment!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: {raw!r} is not a valid YAML value ({yaml_problem(e)})") from None
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = (), cls=SFTConfig):
    """The config in YAML file `path` (None: defaults) with `overrides` applied, type-checked
    and validated."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: not valid YAML ({yaml_problem(e)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for assignment in overrides:
        apply_override(tree, assignment)
    config = _build(cls, tree)
    if hasattr(config, "validate"):
        config.validate()
    return config


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


# ---- RL: `rci-fast potential`, `rci-fast rl`, `rci-fast eval` share one config ------------------

@dataclass
class TasksSection:
    train: list[str] = field(default_factory=list)   # task names; empty: every task of the train split
    test: list[str] = field(default_factory=list)    # for eval; empty: every task of the test split
    samples_per_task: int = 0        # train samples per task (the task's "train" sample split); 0: all
    skip_per_task: int = 0           # first train samples of each task left out (e.g. the SFT data's questions)
    data_dir: str | None = None      # folder holding bbh/ and symbench/ (default: $RCI_FAST_DATA, ../shared/data)


@dataclass
class RolloutSection:
    group_size: int = 5              # completions per prompt (the GRPO group)
    prompts_per_step: int = 128      # prompts per optimizer step, over all ranks
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 2048       # model tokens per episode
    max_total_tokens: int = 6144     # prompt + everything appended
    max_code_calls: int = 8
    code_timeout_s: float = 10.0
    max_batch: int = 64              # sequences decoded together per rank
    sandbox_workers: int = 0         # 0: one per core
    # A code result rejoins its sequence this many decode steps after the block closed (the
    # batch waits for a late one): fixed seeds then give the same rollouts to the bit. 0 feeds
    # it back as soon as it arrives: no waiting (a timed-out call stalls nobody), not repeatable.
    result_delay_steps: int = 8
    cuda_graphs: bool = True         # on a GPU, decode steps replayed as CUDA graphs (ignored on a CPU)


@dataclass
class AlgoSection:
    advantage: str = "grpo"          # grpo: (r - mean) / std per group | drgrpo: r - mean
    aggregation: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (Dr.GRPO)
    clip_low: float = 0.2
    clip_high: float = 0.2           # > clip_low: DAPO's clip-higher
    clip_ratio_c: float = 3.0        # dual-clip for negative advantages (verl's default); 0: off
    kl_coef: float = 0.001           # 0: no reference model at all
    kl_estimator: str = "low_var_kl"  # k1 | k3 | low_var_kl
    entropy_coef: float = 0.0
    one_pass_loss: bool = False      # the loss's gradient inside the forward: 6THV lm-head FLOPs, not 8THV


@dataclass
class RLTrainSection:
    steps: int = 600                 # optimizer steps (one rollout batch each, split in mini_batches)
    mini_batches: int = 1            # optimizer steps per rollout batch (old log-probs then differ)
    micro_batch_tokens: int = 16384  # packed tokens per micro-batch per rank
    share_prompts: bool = True       # a group's prompt through the per-token layers once per micro-batch
    lr: float = 1e-6
    schedule: str = "constant"       # cosine | constant (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    max_bad_steps: int = 5
    mixed_precision: str = "auto"


@dataclass
class CurriculumSection:
    mode: str = "staged"             # staged | online | uniform
    potential_file: str | None = None  # `rci-fast potential` output; default <out_dir>/potential.jsonl
    steps_per_stage: int = 150
    online_floor: float = 0.05
    prior_trials: float = 2.0


@dataclass
class RewardSection:
    correct: float = 1.0
    well_formed: float = 0.1
    malformed: float = -0.1
    max_turns: int = 6
    too_many_turns: float = -0.1
    partial_credit: bool = False


@dataclass
class PotentialSection:
    k: int = 20                      # attempts per training sample
    batch_size: int = 256            # conversations per engine call


@dataclass
class EvalSection:
    model: str | None = None         # HF folder; default <out_dir>/hf (the RL export), else model.path
    attempts: int = 4                # per sample (pass@k with k = attempts)
    samples_per_task: int = 20       # samples per test task (the tasks' "validation" sample split); 0: all
    temperature: float = 0.6
    modes: list[str] = field(default_factory=lambda: ["code", "text"])
    batch_size: int = 256


@dataclass
class RLConfig:
    out_dir: str = "runs/rl"
    seed: int = 0
    log_every: int = 1
    model: ModelSection = field(default_factory=ModelSection)
    tasks: TasksSection = field(default_factory=TasksSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    train: RLTrainSection = field(default_factory=RLTrainSection)
    curriculum: CurriculumSection = field(default_factory=CurriculumSection)
    reward: RewardSection = field(default_factory=RewardSection)
    potential: PotentialSection = field(default_factory=PotentialSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    @property
    def potential_file(self) -> str:
        return self.curriculum.potential_file or f"{self.out_dir}/potential.jsonl"

    def validate(self) -> None:
        r, t, a = self.rollout, self.train, self.algo
        for key, value in {"rollout.group_size": r.group_size, "rollout.prompts_per_step": r.prompts_per_step,
                           "rollout.max_new_tokens": r.max_new_tokens, "rollout.max_batch": r.max_batch,
                           "train.steps": t.steps, "train.mini_batches": t.mini_batches,
                           "train.micro_batch_tokens": t.micro_batch_tokens, "train.max_bad_steps": t.max_bad_steps,
                           "curriculum.steps_per_stage": self.curriculum.steps_per_stage,
                           "potential.k": self.potential.k, "potential.batch_size": self.potential.batch_size,
                           "eval.attempts": self.eval.attempts, "eval.batch_size": self.eval.batch_size,
                           "log_every": self.log_every, "checkpoint.keep": self.checkpoint.keep}.items():
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1 (got {value})")
        for key, value in {"rollout.max_code_calls": r.max_code_calls, "rollout.sandbox_workers": r.sandbox_workers,
                           "rollout.result_delay_steps": r.result_delay_steps,
                           "tasks.samples_per_task": self.tasks.samples_per_task,
                           "tasks.skip_per_task": self.tasks.skip_per_task,
                           "eval.samples_per_task": self.eval.samples_per_task, "train.warmup_steps": t.warmup_steps,
                           "train.grad_clip": t.grad_clip, "checkpoint.every": self.checkpoint.every,
                           "algo.kl_coef": a.kl_coef, "algo.entropy_coef": a.entropy_coef,
                           "rollout.temperature": r.temperature, "eval.temperature": self.eval.temperature}.items():
            if value < 0:
                raise ConfigError(f"{key}: must be >= 0 (got {value})")
        if r.max_total_tokens <= r.max_new_tokens:
            raise ConfigError(f"rollout.max_total_tokens ({r.max_total_tokens}) must exceed rollout.max_new_tokens "
                              f"({r.max_new_tokens}): it holds the prompt too")
        if t.micro_batch_tokens < r.max_total_tokens:
            raise ConfigError(f"train.micro_batch_tokens ({t.micro_batch_tokens}) must hold one whole trajectory "
                              f"(rollout.max_total_tokens = {r.max_total_tokens})")
        if r.prompts_per_step % t.mini_batches:
            raise ConfigError(f"train.mini_batches ({t.mini_batches}) must divide rollout.prompts_per_step "
                              f"({r.prompts_per_step})")
        if not t.lr > 0:
            raise ConfigError(f"train.lr: must be > 0 (got {t.lr})")
        for key, value in {"rollout.temperature": r.temperature, "eval.temperature": self.eval.temperature}.items():
            if 0 < value < 1e-3:  # SamplingParams refuses these: logits / T overflows near 1e-37
                raise ConfigError(f"{key}: use 0 for greedy decoding, or at least 1e-3 (got {value})")
        if not self.curriculum.online_floor > 0:  # online draws weight Π + floor: p = 0 or 1 weighs 0 without it
            raise ConfigError(f"curriculum.online_floor: must be > 0 (got {self.curriculum.online_floor})")
        if not self.curriculum.prior_trials > 0:  # online p starts as successes / trials: 0/0 without it
            raise ConfigError(f"curriculum.prior_trials: must be > 0 (got {self.curriculum.prior_trials})")
        choices = {"algo.advantage": (a.advantage, ("grpo", "drgrpo")),
                   "algo.aggregation": (a.aggregation, ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")),
                   "algo.kl_estimator": (a.kl_estimator, ("k1", "k3", "low_var_kl")),
                   "train.schedule": (t.schedule, ("cosine", "constant")),
                   "train.mixed_precision": (t.mixed_precision, ("auto", "bf16", "fp32")),
                   "curriculum.mode": (self.curriculum.mode, ("staged", "online", "uniform"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}: expected one of {', '.join(allowed)} (got {value!r})")
        for mode in self.eval.modes:
            if mode not in ("code", "text"):
                raise ConfigError(f"eval.modes: expected code and/or text (got {mode!r})")
        if not 0 <= a.clip_low < 1 or a.clip_high < 0:
            raise ConfigError("algo.clip_low must be in [0, 1) and algo.clip_high >= 0")
        if a.clip_ratio_c and not a.clip_ratio_c > 1:
            raise ConfigError(f"algo.clip_ratio_c: must be > 1, or 0 for no dual-clip (got {a.clip_ratio_c})")
        if not 0 < r.top_p <= 1:
            raise ConfigError(f"rollout.top_p: must be in (0, 1] (got {r.top_p})")
        if len(t.betas) != 2:
            raise ConfigError(f"train.betas: expected two numbers (got {t.betas})")
        if self.model.path is None:
            raise ConfigError("model.path: required (the policy to start from, e.g. the SFT run's <out_dir>/hf)")

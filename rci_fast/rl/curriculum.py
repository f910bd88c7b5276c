"""The improvement-potential curriculum of R1-Code-Interpreter.

A sample with pass rate p has improvement potential Π = 4·p·(1−p): 1 at p = ½, 0 when the policy
always or never solves it (then every answer in a GRPO group gets the same reward and the
advantage is zero). Samples fall into groups by Π (paper: [0.64, 1], [0.48, 0.64), [0.32, 0.48),
[0, 0.32)); training starts on the highest-Π group and adds the next group every
`steps_per_stage` steps (cumulative stages). Modes:
  - "staged": the paper's schedule over the pass rates measured before RL (`rci-fast potential`);
  - "online": each sample's p is updated from its own GRPO group's rewards (no extra inference)
    and samples are drawn with probability proportional to Π (plus a floor so none starves);
  - "uniform": every sample equally likely (the ablation).
Everything is vectorised over numpy arrays, one entry per sample, so pools of 10^5 samples cost
microseconds per draw.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAPER_THRESHOLDS = (0.64, 0.48, 0.32)  # group g holds Π in [t[g], t[g-1]); group 0 is Π >= 0.64
MODES = ("staged", "online", "uniform")


def improvement_potential(p):
    """Π = 4p(1-p), rounded to 12 decimals: in floating point Π(0.8) came out below 0.64 while
    Π(0.2) came out above, which put p = 4/20 and p = 16/20 (the paper's k = 20) in different
    groups."""
    p = np.asarray(p, dtype=np.float64)
    return np.round(4.0 * p * (1.0 - p), 12)


def potential_groups(potential, thresholds=PAPER_THRESHOLDS) -> np.ndarray:
    """Group index per sample: 0 for the highest-Π group, len(thresholds) for the lowest."""
    t = np.asarray(thresholds, dtype=np.float64)
    if np.any(np.diff(t) >= 0):
        raise ValueError(f"thresholds must be strictly decreasing, got {thresholds}")
    # Group g = how many thresholds lie above Π: Π in [t[g], t[g-1]).
    return (np.asarray(potential, dtype=np.float64)[..., None] < t).sum(-1)


@dataclass
class CurriculumConfig:
    mode: str = "staged"
    steps_per_stage: int = 150
    thresholds: tuple[float, ...] = PAPER_THRESHOLDS
    online_floor: float = 0.05     # online mode: weight Π + floor, so p = 0 or 1 samples still appear
    prior_trials: float = 2.0      # online mode: p starts from the measured rate as if seen this often
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"curriculum mode must be one of {MODES}, got {self.mode!r}")
        if self.steps_per_stage < 1:
            raise ValueError("steps_per_stage must be >= 1")
        if not self.prior_trials > 0:
            raise ValueError(f"prior_trials must be > 0 (got {self.prior_trials}): online p starts at successes / trials")
        if not self.online_floor > 0:
            raise ValueError(f"online_floor must be > 0 (got {self.online_floor}): online draws weight Π + floor")


class Curriculum:
    """Draws the prompts of each RL step. `pass_rates[i]` is sample i's measured p."""

    def __init__(self, pass_rates, config: CurriculumConfig | None = None):
        self.config = config or CurriculumConfig()
        p = np.asarray(pass_rates, dtype=np.float64)
        if p.ndim != 1 or p.size == 0 or np.any((p < 0) | (p > 1)) or np.any(np.isnan(p)):
            raise ValueError("pass_rates must be a non-empty 1-D array of values in [0, 1]")
        self.groups = potential_groups(improvement_potential(p), self.config.thresholds)
        # Online estimates: successes and trials, seeded with the measured rate.
        self.successes = p * self.config.prior_trials
        self.trials = np.full_like(p, self.config.prior_trials)
        self.rng = np.random.default_rng(self.config.seed)

    @property
    def num_samples(self) -> int:
        return self.groups.size

    @property
    def pass_rates(self) -> np.ndarray:
        return self.successes / self.trials

    def stage(self, step: int) -> int:
        """0-based stage of a step; the last stage holds every group."""
        return min(step // self.config.steps_per_stage, len(self.config.thresholds))

    def pool(self, step: int) -> np.ndarray:
        """Indices of the samples a step may draw from (cumulative: groups 0..stage)."""
        if self.config.mode != "staged":
            return np.arange(self.num_samples)
        pool = np.flatnonzero(self.groups <= self.stage(step))
        stage = self.stage(step)
        while pool.size == 0 and stage < len(self.config.thresholds):  # empty leading groups
            stage += 1
            pool = np.flatnonzero(self.groups <= stage)
        return pool

    def draw(self, step: int, n: int) -> np.ndarray:
        """`n` sample indices for `step`, without replacement when the pool is large enough."""
        pool = self.pool(step)
        replace = n > pool.size
        if self.config.mode == "online":
            weights = improvement_potential(self.pass_rates[pool]) + self.config.online_floor
            return self.rng.choice(pool, size=n, replace=replace, p=weights / weights.sum())
        return self.rng.choice(pool, size=n, replace=replace)

    def update(self, indices, correct) -> None:
        """Adds a GRPO group's outcomes (1 = correct) to its samples' pass-rate estimates; the
        same index may appear many times (one entry per completion)."""
        indices = np.asarray(indices, dtype=np.int64)
        correct = np.asarray(correct, dtype=np.float64)
        np.add.at(self.successes, indices, correct)
        np.add.at(self.trials, indices, 1.0)

    def state_dict(self) -> dict:
        return {"successes": self.successes.copy(), "trials": self.trials.copy(),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state["successes"].shape != self.successes.shape:
            raise ValueError("curriculum state is for a different number of samples")
        self.successes = np.array(state["successes"], dtype=np.float64)
        self.trials = np.array(state["trials"], dtype=np.float64)
        self.rng.bit_generator.state = state["rng"]

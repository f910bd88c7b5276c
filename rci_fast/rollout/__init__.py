"""rci_fast.rollout: batched multi-turn rollouts that execute code while decoding."""
from rci_fast.rollout.engine import RolloutEngine, Segment, Trajectory
from rci_fast.rollout.sampling import SamplingParams, sample

__all__ = ["RolloutEngine", "Trajectory", "Segment", "SamplingParams", "sample"]

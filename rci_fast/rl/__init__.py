"""rci_fast.rl: the RL pieces that need no model: curriculum sampling and GRPO advantages."""
from rci_fast.rl.advantages import group_advantages
from rci_fast.rl.curriculum import (MODES, PAPER_THRESHOLDS, Curriculum, CurriculumConfig,
                                    improvement_potential, potential_groups)

__all__ = ["Curriculum", "CurriculumConfig", "improvement_potential", "potential_groups",
           "group_advantages", "PAPER_THRESHOLDS", "MODES"]

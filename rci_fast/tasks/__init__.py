"""The task suite: SymBench, BIG-Bench Hard and Reasoning-Gym behind one registry.

    from rci_fast.tasks import load_task, list_tasks
    task = load_task("bbh/date_understanding")          # data_dir=... or $RCI_FAST_DATA
    sample = task.samples("train")[0]                   # .id, .prompt, .data
    task.score(sample, "... <<<(B)>>>")                 # 1.0 or 0.0 (reasoning-gym: its own score)

Tasks know nothing of models: text in, score out. See README.md in this folder.
"""
from rci_fast.tasks.answer import extract_answer
from rci_fast.tasks.base import Sample, Task, TaskDataError, resolve_data_dir
from rci_fast.tasks.prompt import SYSTEM_PROMPT, build_messages, extract_code, format_result, render_chat
from rci_fast.tasks.registry import list_tasks, load_task
from rci_fast.tasks.reward import Reward, RewardConfig, compute_reward, has_void_turn
from rci_fast.tasks.split import load_split, task_split

__all__ = [
    "Sample", "Task", "TaskDataError", "resolve_data_dir", "extract_answer", "list_tasks", "load_task",
    "load_split", "task_split", "SYSTEM_PROMPT", "build_messages", "extract_code", "format_result",
    "render_chat", "Reward", "RewardConfig", "compute_reward", "has_void_turn",
]

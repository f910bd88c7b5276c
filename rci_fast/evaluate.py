"""Per-task evaluation: accuracy, pass@k, turns and code calls, for any text policy.

Code-interpreter mode and text-only mode differ only in the policy and the system prompt: an
engine with a sandbox and SYSTEM_PROMPT, or an engine without one (code blocks are not run) and
TEXT_ONLY_SYSTEM_PROMPT.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import comb

from rci_fast.files import BatchJournal
from rci_fast.tasks.prompt import SYSTEM_PROMPT, build_messages
from rci_fast.tasks.trajectory import trajectory_from_pieces


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n attempts of which c were correct (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class TaskReport:
    task: str
    samples: int
    attempts: int                  # per sample
    accuracy: float                # mean over all attempts (pass@1)
    pass_at_k: float               # k = attempts
    mean_turns: float              # assistant turns per attempt
    mean_code_calls: float
    correct: dict[str, int] = field(default_factory=dict)  # sample id -> correct attempts: paired comparisons


def judged_batches(policy, jobs: list[tuple], batch_size: int, judge, progress=None,
                   journal: BatchJournal | None = None) -> list:
    """judge(job, pieces) for every job, in order: the policy rolls out `batch_size` conversations
    (each job's last element) per call. A journal's finished batches are not run again, and each
    new one is added to it; records must therefore be plain JSON values."""
    records = []
    if progress is not None:  # the bar shows before the first batch, which takes the longest
        progress(0, len(jobs))
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        done = journal.done.get(start) if journal is not None else None
        if done is None or len(done) != len(batch):
            done = [judge(job, pieces) for job, pieces in zip(batch, policy([job[-1] for job in batch]))]
            if journal is not None:
                journal.add(start, done)
        records += done
        if progress is not None:
            progress(min(start + batch_size, len(jobs)), len(jobs))
    return records


def evaluate(policy, items, attempts: int = 1, system_prompt: str = SYSTEM_PROMPT,
             batch_size: int = 64, progress=None, journal: BatchJournal | None = None) -> list[TaskReport]:
    """`items`: (task, sample) pairs; `policy`: conversations -> [(kind, text), ...] pieces, as
    rci_fast.rollout.policy.engine_policy returns. One report per task, in first-seen order.
    With a journal, a killed evaluation resumes at its first unfinished batch."""
    jobs = [(task, sample, build_messages(sample.prompt, system_prompt))
            for task, sample in items for _ in range(attempts)]

    def judge(job, pieces) -> list:  # [correct, assistant turns, code calls]
        task, sample, messages = job
        t = trajectory_from_pieces(messages, pieces, task=task, sample=sample, source="eval")
        return [float(t.score == 1.0), sum(m["role"] == "assistant" for m in t.messages),
                sum(kind == "tool" for kind, _ in pieces)]

    per_sample: dict[tuple[str, str], list[float]] = {}
    stats: dict[str, dict] = {}
    for (task, sample, _), (correct, turns, calls) in zip(
            jobs, judged_batches(policy, jobs, batch_size, judge, progress, journal)):
        per_sample.setdefault((task.name, sample.id), []).append(correct)
        s = stats.setdefault(task.name, {"turns": 0, "calls": 0})
        s["turns"] += turns
        s["calls"] += calls
    reports = []
    for name, s in stats.items():
        results = [v for (task, _), v in per_sample.items() if task == name]
        n_attempts = len(results) * attempts
        reports.append(TaskReport(
            task=name, samples=len(results), attempts=attempts,
            accuracy=sum(map(sum, results)) / n_attempts,
            pass_at_k=sum(pass_at_k(attempts, int(sum(r)), attempts) for r in results) / len(results),
            mean_turns=s["turns"] / n_attempts, mean_code_calls=s["calls"] / n_attempts,
            correct={sid: int(sum(v)) for (task, sid), v in per_sample.items() if task == name}))
    return reports


def mean_over_tasks(per_task: list[list[float]]) -> tuple[float, float]:
    """The mean over tasks of each task's mean over its questions (a value per question: its
    accuracy, or a difference in accuracy between two models), and that mean's standard error
    over questions: how much it would move with other questions and other sampled answers."""
    if not per_task:
        return float("nan"), float("nan")
    means = [sum(v) / len(v) for v in per_task]
    variance = sum(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v) for v, m in zip(per_task, means) if len(v) > 1)
    return sum(means) / len(means), variance ** 0.5 / len(means)


def format_table(reports: list[TaskReport]) -> str:
    lines = [f"{'task':<48}{'samples':>8}{'acc':>8}{'pass@k':>8}{'turns':>7}{'code':>6}"]
    for r in reports:
        lines.append(f"{r.task:<48}{r.samples:>8}{r.accuracy:>8.3f}{r.pass_at_k:>8.3f}"
                     f"{r.mean_turns:>7.2f}{r.mean_code_calls:>6.2f}")
    if reports:
        mean = sum(r.accuracy for r in reports) / len(reports)
        line = f"{'mean over tasks':<48}{'':>8}{mean:>8.3f}"
        if all(r.correct for r in reports):
            _, error = mean_over_tasks([[c / r.attempts for c in r.correct.values()] for r in reports])
            line += f"  ± {error:.3f} (standard error over questions)"
        lines.append(line)
    return "\n".join(lines)

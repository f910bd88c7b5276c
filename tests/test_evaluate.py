"""Evaluation: pass@k, per-task accuracy, turns and code calls from a scripted text policy."""
import pytest

from rci_fast.evaluate import TaskReport, evaluate, format_table, pass_at_k
from rci_fast.tasks import load_task
from rci_fast.tasks.prompt import TEXT_ONLY_SYSTEM_PROMPT


def test_pass_at_k():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_evaluate_counts_accuracy_pass_at_k_turns_and_calls():
    task = load_task("rg/basic_arithmetic")
    samples = task.samples("validation")[:2]
    gold = {s.prompt: task.gold_answer(s) for s in samples}
    seen = []

    def policy(conversations):
        out = []
        for m in conversations:
            assert m[0]["content"] == TEXT_ONLY_SYSTEM_PROMPT
            prompt = m[-1]["content"]
            seen.append(prompt)
            attempt = seen.count(prompt)
            if prompt == samples[0].prompt:   # right once in three, with a code call each time
                answer = gold[prompt] if attempt == 2 else "0.5"
                out.append([("model", "```python\nprint(1)\n```"), ("tool", "Code Execution Results:\n1"),
                            ("model", f"<<<{answer}>>>")])
            else:                             # always right, text only
                out.append([("model", f"<<<{gold[prompt]}>>>")])
        return out

    calls = []
    [report] = evaluate(policy, [(task, s) for s in samples], attempts=3,
                        system_prompt=TEXT_ONLY_SYSTEM_PROMPT, batch_size=4, progress=lambda *a: calls.append(a))
    assert calls == [(0, 6), (4, 6), (6, 6)]  # the bar shows before the first batch
    assert report.task == "rg/basic_arithmetic" and report.samples == 2 and report.attempts == 3
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.pass_at_k == pytest.approx(1.0)
    assert report.mean_code_calls == pytest.approx(3 / 6)
    assert report.mean_turns == pytest.approx((3 * 2 + 3 * 1) / 6)
    assert report.correct == {samples[0].id: 1, samples[1].id: 3}  # per question, for paired comparisons
    assert "rg/basic_arithmetic" in format_table([report])


def test_merged_shards_keep_every_questions_count():
    """Ranks evaluate disjoint samples; the merged report weights by samples and keeps each
    question's count of correct answers (what `rci-fast demo --summary` pairs models on)."""
    from rci_fast.train.measure import merge_reports

    a = TaskReport("t", 2, 4, 0.5, 0.5, 1.0, 1.0, {"q1": 4, "q2": 0})
    b = TaskReport("t", 1, 4, 0.25, 1.0, 2.0, 0.0, {"q3": 1})
    [merged] = merge_reports([[a], [b]])
    assert merged.samples == 3 and merged.accuracy == pytest.approx((0.5 * 2 + 0.25) / 3)
    assert merged.correct == {"q1": 4, "q2": 0, "q3": 1}


def test_mean_over_tasks_and_its_standard_error():
    from rci_fast.evaluate import mean_over_tasks

    mean, error = mean_over_tasks([[1.0, 0.0, 0.5], [0.25, 0.75]])
    assert mean == pytest.approx((0.5 + 0.5) / 2)
    assert error == pytest.approx((0.25 / 3 + 0.125 / 2) ** 0.5 / 2)  # sample variances 0.25 and 0.125
    assert mean_over_tasks([[1.0]]) == (1.0, 0.0)  # one question: no spread to measure
    report = TaskReport("t", 2, 2, 0.5, 1.0, 1.0, 0.0, {"q1": 2, "q2": 0})
    assert "0.500  ± 0.500 (standard error over questions)" in format_table([report])


def test_a_journal_resumes_a_killed_evaluation_with_the_same_report(tmp_path):
    """The policy dies in the second batch (a killed run): started again with the same header,
    only the unfinished batches roll out and the report equals an unbroken run's. Another header
    (another model or setting) starts afresh; a line cut short by the kill is ignored."""
    from rci_fast.files import BatchJournal

    task = load_task("rg/basic_arithmetic")
    samples = task.samples("validation")[:3]
    gold = {s.prompt: task.gold_answer(s) for s in samples}
    rolled = []

    def policy(conversations, die_at=None):
        rolled.append(len(conversations))
        if len(rolled) == die_at:
            raise KeyboardInterrupt
        return [[("model", f"<<<{gold[m[-1]['content']] if i % 2 else 'no'}>>>")] for i, m in enumerate(conversations)]

    items = [(task, s) for s in samples]
    whole = evaluate(policy, items, attempts=2, batch_size=4)
    header, path = {"model": "a", "k": (2,)}, tmp_path / "eval.partial"
    rolled.clear()
    with pytest.raises(KeyboardInterrupt):
        evaluate(lambda c: policy(c, die_at=2), items, attempts=2, batch_size=4, journal=BatchJournal(path, header))
    with open(path, "a") as f:
        f.write('{"start": 4, "reco')  # the kill cut this line
    rolled.clear()
    journal = BatchJournal(path, header)
    assert sorted(journal.done) == [0]
    assert evaluate(policy, items, attempts=2, batch_size=4, journal=journal) == whole
    assert rolled == [2]  # only the batch of attempts 5 and 6
    rolled.clear()
    assert evaluate(policy, items, attempts=2, batch_size=4, journal=BatchJournal(path, {"model": "b"})) == whole
    assert rolled == [4, 2]
    journal.finish()
    assert not path.exists()

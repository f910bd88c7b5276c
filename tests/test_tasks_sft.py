"""SFT trajectories: the JSONL format and its loader, turning a policy's pieces into a
trajectory, and the scripted teacher executed in the real sandbox."""
import json
import re

import pytest

from rci_fast.tasks import load_task
from rci_fast.tasks.prompt import build_messages, extract_code, format_result
from rci_fast.tasks.teacher import FAMILIES, generate
from rci_fast.tasks.trajectory import (SFTTrajectory, TrajectoryFormatError, load_trajectories,
                                       trajectory_from_pieces, write_trajectories)

CODE_TURN = "Let me compute.\n```python\nprint(6 * 7)\n```"
GOOD = build_messages("What is 6*7?") + [
    {"role": "assistant", "content": CODE_TURN},
    {"role": "tool", "content": format_result("42\n")},
    {"role": "assistant", "content": "<<<42>>>"},
]


def _write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_round_trip(tmp_path):
    t = SFTTrajectory(messages=GOOD, task="bbh/x", sample_id="3", score=1.0, source="test",
                      extra={"note": "kept"})
    path = tmp_path / "t.jsonl"
    assert write_trajectories(path, [t, t]) == 2
    back = load_trajectories(path)
    assert len(back) == 2 and back[0] == t
    assert back[0].num_code_calls == 1 and back[0].assistant_turns == [CODE_TURN, "<<<42>>>"]


def test_an_interrupted_write_keeps_the_previous_file(tmp_path):
    t = SFTTrajectory(messages=GOOD, task="bbh/x", sample_id="3", score=1.0, source="test")
    path = tmp_path / "new" / "t.jsonl"  # the folder is created
    assert write_trajectories(path, [t]) == 1
    before = path.read_text()

    def failing():
        yield t
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_trajectories(path, failing())
    assert path.read_text() == before and [p.name for p in path.parent.iterdir()] == ["t.jsonl"]


@pytest.mark.parametrize("bad_row, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "JSON object"),
    ({"task": "x"}, "missing 'messages'"),
    ({"messages": []}, "non-empty"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "string"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "then a user message"),
    ({"messages": GOOD[:4]}, "last message must be an assistant"),
    ({"messages": GOOD[:2] + [{"role": "assistant", "content": "no code"}] + GOOD[3:]}, "closed ```python"),
    ({"messages": GOOD[:2] + [GOOD[2], GOOD[2]] + GOOD[4:]}, "alternate"),
    ({"messages": GOOD[:3] + [{"role": "tool", "content": "42"}] + GOOD[4:]}, "Code Execution Results"),
    ({"messages": GOOD, "score": "high"}, "'score'"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad_row, message):
    path = _write_rows(tmp_path / "bad.jsonl", [{"messages": GOOD}, "", bad_row])
    with pytest.raises(TrajectoryFormatError) as err:
        load_trajectories(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_trajectories(tmp_path / "nope.jsonl")


def test_trajectory_from_policy_pieces():
    task = load_task("bbh/multistep_arithmetic_two")
    sample = task.samples()[0]
    gold = task.gold_answer(sample)
    prompt = build_messages(sample.prompt)
    # as a rollout yields them: sampled text (possibly in several pieces) and forced tool text
    pieces = [("model", "Let me compute.\n```python\n"), ("model", "print(1)\n```"),
              ("tool", "\n" + format_result("1\n") + "\n"), ("model", f"So <<<{gold}>>>")]
    t = trajectory_from_pieces(prompt, pieces, task=task, sample=sample, source="policy")
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert t.messages[3]["content"] == format_result("1\n") and t.score == 1.0
    cut = trajectory_from_pieces(prompt, pieces[:3], task=task, sample=sample, source="policy")
    assert cut.score == 0.0  # ended on a tool result: no answer turn
    wrong = trajectory_from_pieces(prompt, [("model", "<<<0.5>>>")], task=task, sample=sample, source="p")
    assert wrong.score == 0.0
    with pytest.raises(ValueError):
        trajectory_from_pieces(prompt, [("image", "x")], task=task, sample=sample, source="p")
    # an empty output keeps its own newline: the template's one each side is what comes off
    for stdout in ("", "\n\n"):
        empty = trajectory_from_pieces(prompt, [pieces[1], ("tool", "\n" + format_result(stdout) + "\n")],
                                       task=task, sample=sample, source="policy")
        assert empty.messages[-1]["content"] == format_result(stdout)


def test_tool_text_matches_the_rollout_engine():
    engine = pytest.importorskip("rci_fast.rollout.engine")
    from types import SimpleNamespace

    from rci_fast.tasks.prompt import merge_for_rendering

    fake = SimpleNamespace(code_timeout_s=10.0, max_tool_output_chars=1024,
                           tool_template=engine.DEFAULT_TOOL_TEMPLATE)
    for status, stdout, stderr in [("ok", "42\n", ""), ("error", "", "Traceback\nNameError: x\n"),
                                   ("timeout", "partial\n", ""), ("ok", "y" * 3000, "")]:
        result = SimpleNamespace(status=status, stdout=stdout, stderr=stderr)
        forced = engine.RolloutEngine.format_tool_output(fake, result)
        merged = merge_for_rendering([{"role": "assistant", "content": "A"},
                                      {"role": "tool", "content": format_result(stdout, stderr, status)},
                                      {"role": "assistant", "content": "B"}])
        assert merged == [{"role": "assistant", "content": "A" + forced + "B"}]


# --- the scripted teacher in the real sandbox ------------------------------------------------
@pytest.fixture(scope="module")
def sandbox():
    from rci_fast.sandbox import Sandbox

    with Sandbox(workers=2) as sb:
        yield sb


@pytest.fixture(scope="module")
def teacher_output(sandbox):
    return list(generate(sandbox, per_family=8, seed=0, keep_wrong=True))


def test_teacher_covers_at_least_twelve_families_with_all_styles(teacher_output):
    assert len(FAMILIES) >= 12
    correct = [t for t in teacher_output if t.score == 1.0]
    per_family = {name: sum(t.task == f"rg/{name}" for t in correct) for name in FAMILIES}
    assert all(n >= 6 for n in per_family.values()), per_family  # of 8 tried
    styles = {t.source for t in correct}
    assert styles == {"scripted:code", "scripted:check", "scripted:text"}
    assert any(t.num_code_calls >= 2 for t in correct) and any(t.num_code_calls == 0 for t in correct)


def test_teacher_answers_score_one_with_the_registry(teacher_output):
    tasks = {}
    for t in teacher_output:
        if t.score != 1.0:
            continue
        task = tasks.setdefault(t.task, load_task(t.task, train_size=8, validation_size=8))
        sample = next(s for s in task.samples("train") if s.id == t.sample_id)
        assert t.messages[1]["content"] == sample.prompt
        assert task.score(sample, t.messages[-1]["content"]) == 1.0


def test_teacher_tool_turns_are_real_interpreter_output(teacher_output, sandbox):
    for t in teacher_output[::5]:
        for turn, result in zip(t.messages[2::2], t.messages[3::2]):
            rerun = sandbox.run(extract_code(turn["content"]), timeout_s=10)
            assert result["content"] == format_result(rerun.stdout, rerun.stderr, rerun.status)
        if t.num_code_calls and t.score == 1.0:  # the answer is what the code printed
            answer = re.search(r"<<<(.*)>>>", t.messages[-1]["content"], re.S).group(1)
            assert answer in t.messages[3]["content"]


def test_direct_share_answers_without_code_and_leaves_the_rest_as_before(sandbox, teacher_output):
    families = ["gcd", "count_bits", "fraction_simplification"]
    mixed = list(generate(sandbox, families, per_family=8, seed=0, direct_share=0.5))
    direct = [t for t in mixed if t.source == "scripted:direct"]
    assert 4 <= len(direct) <= 20 and all(t.score == 1.0 for t in mixed)
    for t in direct:  # one assistant turn, no code, the verified answer
        assert [m["role"] for m in t.messages[2:]] == ["assistant"] and "```" not in t.messages[-1]["content"]
    assert all(t.source != "scripted:direct" for t in teacher_output)  # off by default
    assert len(list(generate(sandbox, ["gcd"], per_family=4, direct_share=1.0))) == 4
    with pytest.raises(ValueError, match="direct_share"):
        next(generate(sandbox, ["gcd"], per_family=1, direct_share=1.5))


def test_teacher_file_round_trip_and_cli(tmp_path, teacher_output):
    from rci_fast.cli import main

    path = tmp_path / "sft.jsonl"
    correct = [t for t in teacher_output if t.score == 1.0]
    write_trajectories(path, correct)
    assert load_trajectories(path) == correct
    out = tmp_path / "cli.jsonl"
    assert main(["gen-sft", "--teacher", "scripted", "--out", str(out), "--families", "gcd,spell_backward",
                 "--per-family", "3"]) == 0
    rows = load_trajectories(out)
    assert {r.task for r in rows} == {"rg/gcd", "rg/spell_backward"} and all(r.score == 1.0 for r in rows)
    assert main(["gen-sft", "--out", str(out), "--families", "nope"]) == 2


def test_tasks_command_prints_the_registry(capsys):
    from rci_fast.cli import main

    assert main(["tasks", "--source", "bbh"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^bbh\s+date_understanding\s+250\s+(train|test)\s+exact$", out, re.M)
    assert "bbh: 27 (train 20, test 7, extra 0)" in out


def test_rejection_sampling_keeps_correct_attempts_and_caps_per_task():
    from rci_fast.tasks.rejection import rejection_sample

    task = load_task("bbh/multistep_arithmetic_two")
    samples = task.samples("train")[:6]
    gold = {s.prompt: task.gold_answer(s) for s in samples}
    calls = []

    def policy(batch):  # right on every other attempt, one code call each time
        calls.append(len(batch))
        out = []
        for i, messages in enumerate(batch):
            answer = gold[messages[1]["content"]] if i % 2 else "999999"
            out.append([("model", CODE_TURN), ("tool", format_result("42\n")), ("model", f"<<<{answer}>>>")])
        return out

    kept = list(rejection_sample([task], policy, attempts=2, samples_per_task=6, max_per_task=4, batch_size=4))
    assert len(kept) == 4 and len({t.sample_id for t in kept}) == 4
    assert all(t.score == 1.0 and t.num_code_calls == 1 for t in kept)
    assert calls == [4, 4]  # stopped asking once the cap was reached
    unclosed = list(rejection_sample([task], lambda b: [[("model", f"```python\nx\n<<<{gold[m[1]['content']]}>>>")]
                                                         for m in b], attempts=1, samples_per_task=3))
    assert unclosed == []  # right answers in malformed trajectories are not kept

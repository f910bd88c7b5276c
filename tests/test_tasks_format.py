"""Answer extraction and normalisation edge cases, the reward table, the conversation format."""
from fractions import Fraction

import pytest

from rci_fast.tasks import RewardConfig, compute_reward, extract_answer, has_void_turn, load_task
from rci_fast.tasks.answer import (ints_in, normalize_text, numbers_equal, parse_list, parse_number,
                                   parse_positions, strip_wrapping)
from rci_fast.tasks.prompt import (RESULT_HEADER, SYSTEM_PROMPT, build_messages, conversation_segments,
                                   extract_code, format_result, render_chat)
from rci_fast.tasks.reward import format_problems, has_unclosed_code_block


@pytest.mark.parametrize("text, expected", [
    ("<<<42>>>", "42"),
    ("first <<<1>>> then <<<2>>>", "2"),                    # the last one counts
    ("<<< spaced answer \n>>>", "spaced answer"),
    ("<<<\nrow1\nrow2\n>>>", "row1\nrow2"),                 # multi-line answers
    ("<<<] >>>>", "] >"),                                    # answers ending in '>'
    ("<<<> ) >>>", "> )"),
    ("<<<[1, 2]>>> and more text", "[1, 2]"),
    ("<<<>>>", ""),
    ("no answer", None),
    ("<<<unclosed", None),
    # answers in code have not run: outside ```python blocks only, closed or still open
    ("```python\nprint(f'<<<{x}>>>')\n```", None),
    ("```python\nprint(f'<<<{x}>>>')", None),
    ("<<<7>>> then ```python\nprint('<<<8>>>')\n```", "7"),
    ("```python\nprint(1)\n``` so <<<9>>>", "9"),
    ("<<```python\nx\n```<5>>>", None),                   # no answer across a block
    ("<<<a ```python\nx=1\n``` b>>>", None),
    ("<<<a\x00b>>>", None),                                # nor across a NUL (the blocks' mark)
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalisation_helpers():
    assert strip_wrapping(' "abc". ') == "abc"
    assert strip_wrapping("`x`") == "x"
    assert strip_wrapping("12.") == "12." and parse_number("12.") == 12  # a decimal point, not a full stop
    assert normalize_text("  Hello   World ") == "hello world"
    assert parse_number("1,234") == 1234 and parse_number("-3/4") == Fraction(-3, 4)
    assert parse_number("2.50") == Fraction(5, 2) and parse_number("[7]") == 7
    assert parse_number("seven") is None and parse_number("1/0") is None
    assert numbers_equal(Fraction(1, 3), 0.3333333) and not numbers_equal(Fraction(1, 3), 0.33)
    assert ints_in("[[1, -2], [3, 4]]") == [1, -2, 3, 4] and ints_in("1, 2.5") is None
    assert parse_list('["A", \'B\', C ]') == ["A", "B", "C"] and parse_list("a,, b") == ["a", "b"]
    assert parse_positions("0 3, 1 0") == [(0, 3), (1, 0)] == parse_positions("[(0,3),(1,0)]")
    assert parse_positions("0 3, 1") is None


def test_reward_table():
    task = load_task("bbh/multistep_arithmetic_two")
    sample = task.samples()[0]
    gold = task.gold_answer(sample)
    code_turn = "Compute it.\n```python\nprint(1)\n```"
    cases = [  # (turns, total)
        ([f"<<<{gold}>>>"], 1.1),                                  # correct, well formed
        ([f"<<<{int(gold) + 1}>>>"], 0.1),                         # wrong, well formed
        ([f"The answer is {gold}"], -0.1),                         # no <<<>>>: malformed, no credit
        ([code_turn, f"<<<{gold}>>>"], 1.1),
        (["```python\nprint(1)\n", f"<<<{gold}>>>"], 0.9),        # unclosed code block
        ([code_turn] * 6 + [f"<<<{gold}>>>"], 1.0),               # 7 turns > 6
        ([code_turn] * 5 + [f"<<<{gold}>>>"], 1.1),               # 6 turns is allowed
        ([code_turn] * 6 + [""], -0.1),                            # cut after the 6th result: 6 turns
        ([code_turn] * 7 + [""], -0.2),
        ([], -0.1),
    ]
    for turns, total in cases:
        assert compute_reward(task, sample, turns).total == pytest.approx(total), turns
    custom = RewardConfig(correct=2.0, well_formed=0.0, malformed=-1.0, max_turns=1, too_many_turns=-0.5)
    assert compute_reward(task, sample, [code_turn, f"<<<{gold}>>>"], custom).total == pytest.approx(1.5)


def test_partial_credit_is_off_by_default():
    task = load_task("rg/fraction_simplification", train_size=1, validation_size=0)
    [s] = task.samples()
    partial = task.score(s, "<<<1/999999>>>")  # reasoning-gym gives 0.01 to a wrong fraction
    assert 0.0 < partial < 1.0
    assert compute_reward(task, s, ["<<<1/999999>>>"]).correct == 0.0
    assert compute_reward(task, s, ["<<<1/999999>>>"], RewardConfig(partial_credit=True)).correct == partial


def test_format_problems_and_void_turns():
    assert format_problems(["<<<1>>>"]) == []
    assert format_problems(["thinking", "<<<1>>>"]) == []
    assert len(format_problems(["```python\nx=1", "no answer"])) == 2
    assert format_problems(["<<< >>>"]) == ["an empty <<<>>> answer in the final turn"]
    assert has_unclosed_code_block("```python\nx\n```\n```python\ny") and not has_unclosed_code_block("```python\nx\n```")
    assert has_void_turn(["I am thinking.", "<<<1>>>"])
    assert not has_void_turn(["```python\nprint(1)\n```", "<<<1>>>"])


def test_code_extraction_and_results():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```python\nprint(x)\n```") == "print(x)\n"
    assert extract_code("```python\nunclosed") is None and extract_code("```\nnot python\n```") is None
    assert format_result("4\n") == RESULT_HEADER + "4"
    assert format_result("", "Traceback ...\nNameError: x", "error").endswith("NameError: x")
    assert format_result("", "", "timeout", timeout_s=5).endswith("TimeoutError: the code ran longer than 5 s")
    assert format_result("1\n", "", "memory_limit") == RESULT_HEADER + "1\n[sandbox: memory_limit]"
    long = format_result("x" * 5000, max_chars=100)
    assert long.endswith("(output truncated)") and len(long) < 200


def test_rendering_default_and_with_a_chat_template():
    messages = build_messages("What is 2+2?") + [
        {"role": "assistant", "content": "```python\nprint(2+2)\n```"},
        {"role": "tool", "content": format_result("4\n")},
        {"role": "assistant", "content": "<<<4>>>"},
    ]
    text = render_chat(messages)
    assert text.startswith("<|im_start|>system\n" + SYSTEM_PROMPT)
    assert text.count("<|im_start|>assistant") == 1  # tool output stays inside the model's stream
    assert text.endswith("Code Execution Results:\n4\n<<<4>>><|im_end|>\n")
    segments = conversation_segments(messages)
    assert "".join(t for _, t, _ in segments) == text
    assert [(k, trainable) for k, _, trainable in segments] == [
        ("prompt", False), ("model", True), ("tool", False), ("model", True), ("model", True)]
    assert render_chat(messages[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")

    class TemplatedTokenizer:  # stands in for a Hugging Face tokenizer that has a chat template
        chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"

        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            assert tokenize is False
            return "".join(f"[{m['role']}] {m['content']}" for m in msgs) + ("[assistant]" if add_generation_prompt else "")

    templated = render_chat(messages, tokenizer=TemplatedTokenizer())
    assert templated.startswith("[system] ") and templated.count("[assistant]") == 1

"""Answer extraction and the normalisation helpers the verifiers share.

The model's final answer is the text inside the LAST `<<<...>>>` of its final assistant turn,
outside its ```python blocks: code that prints an answer (`print(f"<<<{x}>>>")`) has not run yet.
Every helper here is pure text -> value; a helper returns None when the text cannot be read,
and verifiers treat None as wrong (a malformed answer must never crash a training step).
"""
from __future__ import annotations

import re
from fractions import Fraction

# The lazy body stops at the first '>>>' that is not followed by another '>', so answers that
# end in '>' (Dyck words such as "] >") keep their last character: "<<<] >>>>" -> "] >". It never
# crosses a NUL: the mark a code block leaves in the prose (_prose).
ANSWER_RE = re.compile(r"<<<([^\x00]*?)>>>(?!>)")


# A ```python block, closed or still open at the end of the text.
_CODE_RE = re.compile(r"```python.*?(?:```|\Z)", re.DOTALL)


def _prose(text: str) -> str:
    """`text` with each code block replaced by a NUL, which no answer spans."""
    return _CODE_RE.sub("\x00", text) if "```" in text else text


def _answer_region(prose: str) -> str:
    """`prose` up to its last '>>>' and the '>'s right after it. Every answer ANSWER_RE finds lies
    there, and in it the search is linear (with many '<<<' and no '>>>' after them the lazy
    pattern rescans to the end from each one: 90 KB took 38 s)."""
    end = prose.rfind(">>>")
    if end < 0:
        return ""
    end += 3
    while end < len(prose) and prose[end] == ">":
        end += 1
    return prose[:end]


def answer_state(text: str) -> str | None:
    """For a rollout that stops at the answer: None while `text` holds none, 'open' when an answer
    ends the text (the next token may still add a '>' to it: '<<<] >>>' then '>'), else 'closed'."""
    prose = _prose(text)
    region = _answer_region(prose)
    answer = ANSWER_RE.search(region)
    if answer is None:
        return None
    return "open" if answer.end() == len(prose) else "closed"


# "<<<Answer: 42>>>": a label is never part of an answer (every verifier scored it 0 or less).
_LABEL_RE = re.compile(r"(?:final\s+)?answer\s*[:：]\s*", re.I)


def extract_answer(text: str | None) -> str | None:
    """The stripped text inside the last <<<...>>> in `text`, less a leading "Answer:" label, or
    None when there is none."""
    matches = ANSWER_RE.findall(_answer_region(_prose(text or "")))
    if not matches:
        return None
    answer = matches[-1].strip()
    label = _LABEL_RE.match(answer)
    return answer[label.end():].strip() if label else answer


_QUOTES = "\"'`"


def strip_wrapping(s: str) -> str:
    """Drop surrounding whitespace, quotes/backticks and one trailing full stop: '"abc".' -> 'abc'."""
    s = s.strip()
    if s.endswith(".") and not re.fullmatch(r"-?\d+\.", s):
        s = s[:-1].rstrip()
    while len(s) >= 2 and s[0] == s[-1] and s[0] in _QUOTES:
        s = s[1:-1].strip()
    return s


def normalize_text(s: str) -> str:
    """Case-, quote- and whitespace-insensitive form of a short textual answer."""
    return " ".join(strip_wrapping(s).lower().split())


_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
# Fraction("1e999999999") builds 10**999999999 exactly and does not return: a number written with
# a larger exponent, or longer, than any answer needs is unreadable.
MAX_EXPONENT, MAX_NUMBER_CHARS = 400, 1000


def _fraction(text: str) -> Fraction:
    """Fraction(text) for a number of sane size; ValueError otherwise (an unreadable answer)."""
    exponent = text.lower().partition("e")[2]
    if len(text) > MAX_NUMBER_CHARS or (exponent and (len(exponent) > 5 or abs(int(exponent)) > MAX_EXPONENT)):
        raise ValueError(f"number out of range: {text[:40]}")
    return Fraction(text)


def parse_number(s: str) -> Fraction | None:
    """One number written as an int, decimal, fraction 'a/b' or with thousands commas; else None."""
    s = strip_wrapping(s).replace(",", "").replace(" ", "")
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    try:
        if "/" in s:
            num, den = s.split("/")
            return _fraction(num) / _fraction(den)
        if _NUMBER_RE.fullmatch(s):
            return _fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def numbers_equal(a: Fraction | float | None, b: Fraction | float | None, rel: float = 1e-6) -> bool:
    """Equal, up to a relative tolerance for decimals that a model rounds (1e-6 by default)."""
    if a is None or b is None:
        return False
    if a == b:
        return True
    return abs(float(a) - float(b)) <= rel * max(1.0, abs(float(b)))


def decimals_in(s: str) -> list[tuple[Fraction, int]]:
    """Every number in `s` with its places after the point as written ('3.560, 7' -> [(89/25, 3),
    (7, 0)]; '1.5e-3' has 4); ValueError as numbers_in."""
    out = []
    for text in _NUMBER_RE.findall(s):
        mantissa, _, exponent = text.lower().partition("e")
        value = _fraction(text)  # checks the exponent's size first
        out.append((value, max(len(mantissa.partition(".")[2]) - int(exponent or 0), 0)))
    return out


def rounds_to(value: Fraction, exact: Fraction, places: int) -> bool:
    """Whether value is exact rounded to `places` decimals (either way at a tie)."""
    return abs(value - exact) <= Fraction(1, 2 * 10**places)


def numbers_in(s: str) -> list[Fraction]:
    """Every number in `s`, in order ('[[1, -2], [3.5, 4]]' -> [1, -2, 7/2, 4]); ValueError for
    one beyond MAX_EXPONENT or MAX_NUMBER_CHARS."""
    return [_fraction(x) for x in _NUMBER_RE.findall(s)]


def ints_in(s: str) -> list[int] | None:
    """Every integer in `s`, in order; a decimal such as 2.5 makes the answer unreadable (None)."""
    values = numbers_in(s)
    if any(v.denominator != 1 for v in values):
        return None
    return [int(v) for v in values]


def parse_list(s: str) -> list[str]:
    """A flat list written as '[a, "b", c]' or 'a, b, c' -> ['a', 'b', 'c'] (items unquoted)."""
    s = strip_wrapping(s)
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    items = [strip_wrapping(x) for x in s.split(",")]
    return [x for x in items if x != ""]


def parse_positions(s: str) -> list[tuple[int, int]] | None:
    """Cell positions '0 3, 1 0' or '(0,3), (1,0)' or '[[0,3],[1,0]]' -> [(0, 3), (1, 0)]."""
    values = ints_in(s)
    if values is None or len(values) % 2:
        return None
    return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]

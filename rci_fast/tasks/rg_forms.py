"""Reasoning-gym answers written another way than their gold: what counts as the gold.

The package's scorers compare text: an answer in quotes as a prompt's own example writes it,
"87.0" for 87, "3,544" for 3544, a list without spaces after its commas, trailing spaces on a
grid's lines or "true" for True scored 0 or partial credit (an audit of all 99 datasets,
session 20; a leading "Answer:", which scored 0 in 94 datasets, extract_answer takes off for
every source). `clean` takes off what is never part of an answer; `same_as_gold` says whether the
rest is the gold written another way, and the scorer is then given the gold itself. Anything
else goes to the scorer as written: these rules only ever map an answer onto its own gold.
"""
from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from decimal import Decimal, InvalidOperation

# Datasets whose answer is a word the prompt spells in one case (True/False, Yes/No, Pass/Peng,
# undetermined, infeasible, a weekday) and whose scorers compare case-sensitively: the gold
# word in any case is the gold. Not elsewhere: where an answer is a string to transform, case
# is part of it.
CASE_FREE_ANSWERS = {"course_schedule", "isomorphic_strings", "ransom_note", "syllogism", "acre",
                     "mahjong_puzzle", "shortest_path", "calendar_arithmetic"}

# codeio's answers are JSON values: quotes make a string of a number, a bool or a list, and 87.0
# is a float where 87 is an int (the type is part of the prediction). Only a full stop after the
# value and JSON's own whitespace are not.
QUOTES_ARE_CONTENT = {"codeio"}

_QUOTES = "\"'`"
# 3544, -3,544.5; no leading zeros ("00" is a row of two cells, "0,000" a list of roots)
_NUMBER = re.compile(r"[+-]?(?:0|[1-9]\d{0,2}(?:,\d{3})+|[1-9]\d*)(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
_FRACTION = re.compile(r"\s*([+-]?\d+)\s*/\s*(\d+)\s*")
MAX_STRUCTURED_CHARS = 100_000  # longer lists are compared as text only


def _wrapped(text: str) -> bool:
    """Whether text sits inside one pair of quotes or backticks that it does not hold itself."""
    return len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES and text[0] not in text[1:-1]


def clean(answer: str, gold: str, dataset: str) -> str:
    """The answer (extract_answer took a leading "Answer:" label off) without quotes or backticks
    around it, unless quotes are content (codeio) or the gold itself is quoted
    (polynomial_equations' prompt shows its example in quotes)."""
    answer = answer.strip()
    if dataset not in QUOTES_ARE_CONTENT and not _wrapped(gold.strip()):
        while _wrapped(answer):
            answer = answer[1:-1].strip()
    return answer


def _is_wrapped_gold(answer: str, gold: str, any_case: bool, quotes: bool) -> bool:
    """Whether the answer is the gold behind full stops and, where quotes are not content, pairs of
    quotes or backticks ('"x".', '`x`', '" x ".', ...); in any case where any_case. Each step
    takes one layer off the outside (a form that ends in '.' cannot also end in a quote), moving
    two indices: linear in the answer's length however many layers it has."""
    target = gold.strip()
    i, j = 0, len(answer)
    while True:
        while i < j and answer[i].isspace():
            i += 1
        while j > i and answer[j - 1].isspace():
            j -= 1
        if j - i <= len(target):
            form = answer[i:j]
            return form.lower() == target.lower() if any_case else form == target
        if answer[j - 1] == ".":
            j -= 1
        elif quotes and answer[i] == answer[j - 1] and answer[i] in _QUOTES:
            i, j = i + 1, j - 1
        else:
            return False


def _same_number(answer: str, gold: str) -> bool:
    """87.0 for 87, 0.67 for 0.670, 3,544 for 3544: the same decimal value, exactly."""
    if len(answer) > 200 or not _NUMBER.fullmatch(answer) or not _PLAIN_NUMBER.fullmatch(gold):
        return False
    try:
        return Decimal(answer.replace(",", "")) == Decimal(gold)
    except InvalidOperation:
        return False


def _same_fraction(answer: str, gold: str) -> bool:
    """1819 / 4200 for 1819/4200."""
    a, g = _FRACTION.fullmatch(answer), _FRACTION.fullmatch(gold)
    return bool(a and g and a.groups() == g.groups())


def _one_literal(text: str) -> bool:
    """Whether Python reads text as one literal and nothing else: no comment (a second guess
    after '#') and no two strings in a row ("u" "u" is "uu" to Python, not to the scorers)."""
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
                  if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER)]
    except (tokenize.TokenError, SyntaxError):
        return False
    return all(t.type != tokenize.COMMENT for t in tokens) and not any(
        a.type == b.type == tokenize.STRING for a, b in zip(tokens, tokens[1:]))


def _canonical(text: str, parse) -> str | None:
    """A list, tuple or dict as compact JSON (JSON keeps 1, 1.0 and true apart), or None."""
    if not text[:1] in "[({" or len(text) > MAX_STRUCTURED_CHARS:
        return None
    if parse is ast.literal_eval and not _one_literal(text):
        return None
    try:
        value = parse(text)
        return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, tuple, dict)) else None
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None


def _same_structure(answer: str, gold: str, json_only: bool) -> bool:
    """The same list, tuple or dict written with other spacing or (outside JSON answers) other
    quotes: [95,94] for [95, 94], [['a', 'b']] for [["a", "b"]]."""
    parse = json.loads if json_only else ast.literal_eval
    g = _canonical(gold, parse)
    return g is not None and _canonical(answer, parse) == g


def same_as_gold(answer: str, gold: str, dataset: str) -> bool:
    """Whether the (cleaned) answer is the gold written another way (module doc)."""
    g = gold.strip()
    quotes = dataset not in QUOTES_ARE_CONTENT
    if _is_wrapped_gold(answer, g, any_case=dataset in CASE_FREE_ANSWERS, quotes=quotes):
        return True
    answer = answer.strip()
    if "\n" in g and [line.rstrip() for line in answer.split("\n")] == [line.rstrip() for line in g.split("\n")]:
        return True  # a grid with spaces after its lines
    if g.endswith(".") and answer == g[:-1].rstrip():
        return True  # a sentence without its full stop
    if not quotes:
        return _same_structure(answer, g, json_only=True)
    return _same_number(answer, g) or _same_fraction(answer, g) or _same_structure(answer, g, json_only=False)

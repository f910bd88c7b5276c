"""Solvers for SymBench questions that state their rules but leave how to apply them open: every
final answer a reading the question allows gives (the checkers take any of them).

string_deletion_and_modification: "Cycle through the following operations one at a time until no
further operations can be performed" reads as a pass through the operations in order, each done
once where it applies, repeated until a pass does nothing; the published answers apply the first
operation that applies and start again from the first (27 of 100 differ). Doing one operation
as often as it applies before the next is not taken: "one at a time" rules it out. "Remove the
middle character" of a string of even length can take either of its two middle characters.

string_synthesis: "Cycle through Methods 1..6 repeatedly until no more changes can be made" reads
as passes through the methods, each done once where it can be, or each done as often as it can
be before the next (the published answers), or the first method that can be done, then again from
the first.
"""
from __future__ import annotations

import functools
import re

MAX_STEPS = 10_000  # operations done before a reading counts as never ending

_S = r"'([a-z]+)'"  # a quoted substring in an operation's text
# Each operation: its text as a pattern, and what it does to a string (None where it does not apply).
_OPERATIONS = [
    (rf"If the string (?:ends with|suffix is) {_S}, replace it with {_S}\.",
     lambda s, a, b: s[:-len(a)] + b if s.endswith(a) else None),
    (rf"If the string contains {_S} \(not at the start\), remove the first occurrence found after the first character\.",
     lambda s, a: s[:i] + s[i + len(a):] if (i := s.find(a, 1)) >= 1 else None),
    (rf"If the string contains {_S}, replace the first occurrence with {_S}\.",
     lambda s, a, b: s.replace(a, b, 1) if a in s else None),
    (rf"If the string contains {_S}, replace the first occurrence with its reverse \({_S}\)\.",
     lambda s, a, b: s.replace(a, b, 1) if a in s else None),
    (rf"If the string contains {_S}, delete the first occurrence entirely\.",
     lambda s, a: s.replace(a, "", 1) if a in s else None),
    (rf"If the string starts with {_S}, remove the second character\.",
     lambda s, a: s[0] + s[2:] if s.startswith(a) else None),
    (rf"If the string suffix is {_S}, replace it with {_S} and prepend {_S} to the start\.",
     lambda s, a, b, c: c + s[:-len(a)] + b if s.endswith(a) else None),
    (r"If the string contains an even number of '([a-z])'s \(and at least one '\1'\), append " + _S + r" at the end\.",
     lambda s, x, a: s + a if s.count(x) and s.count(x) % 2 == 0 else None),
    (rf"If the string prefix is {_S}, delete the first two characters and append {_S} to the end\.",
     lambda s, a, b: s[2:] + b if s.startswith(a) else None),
    (rf"If the string suffix is {_S}, delete the last two characters\.",
     lambda s, a: s[:-2] if s.endswith(a) else None),
    (rf"If the string prefix is {_S}, replace it with {_S}\.",
     lambda s, a, b: b + s[len(a):] if s.startswith(a) else None),
    (rf"If the string prefix is {_S}, replace it with {_S} and append {_S} to the end\.",
     lambda s, a, b, c: b + s[len(a):] + c if s.startswith(a) else None),
    (rf"If the string prefix is {_S}, remove the first character\.",
     lambda s, a: s[1:] if s.startswith(a) else None),
    (rf"If the string prefix is {_S}, replace it with {_S} and delete the last character\.",
     lambda s, a, b: (b + s[len(a):])[:-1] if s.startswith(a) else None),
    (rf"If the string starts with {_S}, remove the first two characters\.",
     lambda s, a: s[2:] if s.startswith(a) else None),
    (rf"If the string starts with {_S}, replace the first two characters with {_S}\.",
     lambda s, a, b: b + s[2:] if s.startswith(a) else None),
    (rf"If the string ends with {_S}, remove the last character\.",
     lambda s, a: s[:-1] if s.endswith(a) else None),
]
_MIDDLE = r"If the string length is greater than (\d+), remove the middle character\."


def _operation(text: str, upper_middle: bool):
    """The operation a line of the question states, as a function of the string; KeyError where
    no pattern reads it."""
    m = re.fullmatch(_MIDDLE, text)
    if m:
        def remove_middle(s, limit=int(m.group(1))):
            i = (len(s) - 1) // 2 if upper_middle else len(s) // 2
            return s[:i] + s[i + 1:] if len(s) > limit else None
        return remove_middle
    for pattern, apply in _OPERATIONS:
        m = re.fullmatch(pattern, text)
        if m:
            return lambda s, apply=apply, args=m.groups(): apply(s, *args)
    raise KeyError(f"no rule reads {text!r}")


def _apply(s: str, operations, max_chars: int, restart: bool) -> str | None:
    """The string once no operation applies: each operation in turn, done once where it applies,
    in passes until one does nothing; with restart, back to the first after each one done. None
    where that never ends (a string seen again, MAX_STEPS passes, or longer than max_chars)."""
    seen = set()
    while s not in seen and len(seen) < MAX_STEPS and len(s) <= max_chars:
        seen.add(s)
        done = False
        for op in operations:
            t = op(s)
            if t is not None:
                s, done = t, True
                if restart:
                    break
        if not done:
            return s
    return None


@functools.lru_cache(maxsize=1024)
def deletion_answers(question: str) -> frozenset[str]:
    """The final strings of string_deletion_and_modification's question under each reading (module
    doc); empty where an operation's text is not one these rules read."""
    start = re.search(r'For the string "([a-z]*)"', question)
    lines = re.findall(r"^\d+\. (.*\S)\s*$", question, re.MULTILINE)
    if start is None or not lines:
        return frozenset()
    answers = set()
    for upper_middle in (False, True):
        try:
            operations = [_operation(line, upper_middle) for line in lines]
        except KeyError:
            return frozenset()
        # no operation in the data makes a string more than a few characters longer for good
        max_chars = 4 * len(start.group(1)) + 200
        answers |= {_apply(start.group(1), operations, max_chars, restart) for restart in (True, False)}
    return frozenset(answers - {None})


_COUNTS = {"one": 1, "two": 2, "three": 3, "four": 4}


def _method(line: str, blocks: list[str]) -> tuple[list[int], list[int]]:
    """'One [A] and one [B] can be combined to form one {C}.' -> (blocks used, blocks made) as
    counts per block; KeyError or ValueError where the line reads otherwise."""
    used, made = re.fullmatch(r"(.+) can be combined to form (.+)\.", line).groups()

    def counts(text):
        out = [0] * len(blocks)
        for number, block in re.findall(r"(\w+) ([\[{(][A-Z][\]})])", text):
            out[blocks.index(block)] += _COUNTS[number.lower()]
        return out
    return counts(used), counts(made)


class _Endless(Exception):
    pass


def _synthesise(counts: list[int], methods, reading: str) -> tuple[int, ...] | None:
    """The counts at the end under one reading ("once", "exhaust" or "restart"); None where
    MAX_STEPS combinations do not reach an end."""
    counts, steps = list(counts), 0

    def do(method) -> bool:
        nonlocal steps
        used, made = method
        if any(c < u for c, u in zip(counts, used)):
            return False
        steps += 1
        if steps > MAX_STEPS:
            raise _Endless
        counts[:] = [c - u + m for c, u, m in zip(counts, used, made)]
        return True

    try:
        while True:
            if reading == "restart":
                changed = any(do(m) for m in methods)  # stops at the first method done
            elif reading == "once":
                changed = any([do(m) for m in methods])  # a list: every method has its turn
            elif reading == "exhaust":
                changed = False
                for m in methods:
                    while do(m):
                        changed = True
            else:
                raise ValueError(f"unknown reading {reading!r}")
            if not changed:
                return tuple(counts)
    except _Endless:
        return None


@functools.lru_cache(maxsize=1024)
def synthesis_answers(question: str) -> frozenset[tuple[int, ...]]:
    """The final counts of string_synthesis's nine blocks under each reading (module doc); empty
    where the question reads otherwise."""
    head = re.search(r"There are \w+ different blocks (.+?) that satisfy", question)
    start = re.search(r"If we now have (.+?), what will", question)
    lines = re.findall(r"^\d+\. (.*\S)\s*$", question, re.MULTILINE)
    if head is None or start is None or not lines:
        return frozenset()
    blocks = re.findall(r"[\[{(][A-Z][\]})]", head.group(1))
    try:
        methods = [_method(line, blocks) for line in lines]
        counts = [0] * len(blocks)
        for number, block in re.findall(r"(\d+) ([\[{(][A-Z][\]})])", start.group(1)):
            counts[blocks.index(block)] += int(number)
    except (AttributeError, KeyError, ValueError):
        return frozenset()
    return frozenset({_synthesise(counts, methods, r) for r in ("once", "exhaust", "restart")} - {None})

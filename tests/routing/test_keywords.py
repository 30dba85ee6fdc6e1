"""The keyword layer: case-insensitive word-boundary patterns with any/all/none."""

from __future__ import annotations

import time

import pytest

from routing.config import KeywordRule
from routing.keywords import KEYWORD_TEXT_CHARS, KeywordMatcher

CASES = [
    # (rules, text, matches)
    ([("any", ["python", "git"])], "How do I use Git rebase?", True),
    ([("any", ["python", "git"])], "The digital camera", False),  # 'git' inside a word
    ([("any", ["python"])], "PYTHON or not", True),
    ([("any", ["python"])], "pythons are snakes", False),
    ([("any", [r"c\+\+"])], "a C++ template question", True),
    ([("any", [r"\d+ ?mg"])], "take 500 mg twice", True),
    ([("all", ["contract", "breach"])], "breach of the contract", True),
    ([("all", ["contract", "breach"])], "a contract question", False),
    ([("any", ["python"]), ("none", ["snakes?"])], "python snake care", False),
    ([("any", ["python"]), ("none", ["snakes?"])], "python list sorting", True),
    ([("any", ["stack ?trace"])], "here is the stacktrace", True),
    ([], "anything at all", False),  # no rules: the keyword layer never picks the route
    ([("any", ["python"])], "cafépython", False),  # word characters are Unicode ones, as with Python's \w
    ([("any", ["python"])], "(python)", True),
    ([("any", ["python"])], "python", True),  # at both ends of the text
    ([("any", [r"\.py"])], "the .py files", True),  # starts with a non-word char
    ([("any", ["straße"])], "STRASSE", False),
    ([("any", ["Ärzt"])], "der ärzt kommt", True),  # case-insensitive beyond ASCII
]


@pytest.mark.parametrize(("rules", "text", "matches"), CASES)
def test_keyword_rules(rules, text: str, matches: bool) -> None:
    matcher = KeywordMatcher.compile([KeywordRule(operator=op, patterns=p) for op, p in rules])
    assert matcher.matches(text) is matches


# Patterns that make a backtracking engine take exponential time on these texts.
PATHOLOGICAL = [
    (r"(a+)+$", "a" * 1_000_000 + "!"),
    (r"(x+x+)+y", "x" * 1_000_000),
    (r"(\w+\s?)*$", "word " * 200_000 + "!"),
]


@pytest.mark.parametrize(("pattern", "text"), PATHOLOGICAL)
def test_pathological_patterns_take_linear_time_on_a_megabyte(pattern: str, text: str) -> None:
    matcher = KeywordMatcher.compile([KeywordRule(patterns=[pattern])])
    start = time.perf_counter()
    matcher.matches(text)
    assert time.perf_counter() - start < 1.0  # a backtracking engine would not finish this in hours


def test_only_the_start_of_the_text_is_examined() -> None:
    matcher = KeywordMatcher.compile([KeywordRule(patterns=["traceback"])])
    assert matcher.matches(" " * (KEYWORD_TEXT_CHARS - 10) + "traceback")
    assert not matcher.matches(" " * KEYWORD_TEXT_CHARS + "traceback")

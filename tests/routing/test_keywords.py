"""The keyword layer: case-insensitive word-boundary patterns with any/all/none."""

from __future__ import annotations

import pytest

from routing.config import KeywordRule
from routing.keywords import KeywordMatcher

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
]


@pytest.mark.parametrize(("rules", "text", "matches"), CASES)
def test_keyword_rules(rules, text: str, matches: bool) -> None:
    matcher = KeywordMatcher.compile([KeywordRule(operator=op, patterns=p) for op, p in rules])
    assert matcher.matches(text) is matches

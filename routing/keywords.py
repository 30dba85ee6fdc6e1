"""The keyword layer: exact, cheap, checked before any embedding is computed."""

from __future__ import annotations

import re
from dataclasses import dataclass

from routing.config import KeywordRule


@dataclass(frozen=True)
class CompiledRule:
    operator: str
    patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def compile(cls, rule: KeywordRule) -> CompiledRule:
        # (?<!\w)/(?!\w) rather than \b: a pattern may start or end with a non-word char ("c++", ".py").
        compiled = tuple(re.compile(rf"(?<!\w)(?:{p})(?!\w)", re.IGNORECASE) for p in rule.patterns)
        return cls(rule.operator, compiled)

    def holds(self, text: str) -> bool:
        found = (p.search(text) is not None for p in self.patterns)
        if self.operator == "any":
            return any(found)
        if self.operator == "all":
            return all(found)
        return not any(found)


@dataclass(frozen=True)
class KeywordMatcher:
    """A route's rules; the route matches when every rule holds (and it has at least one)."""

    rules: tuple[CompiledRule, ...]

    @classmethod
    def compile(cls, rules: list[KeywordRule]) -> KeywordMatcher:
        return cls(tuple(CompiledRule.compile(r) for r in rules))

    def matches(self, text: str) -> bool:
        return bool(self.rules) and all(rule.holds(text) for rule in self.rules)

"""The keyword layer: exact, cheap, checked before any embedding is computed.

Patterns come from admins (config files and the runtime routes API) and run
on prompts from anyone, so they are compiled with RE2 (google-re2), whose
matching time is linear in the text: no pattern can make a prompt backtrack
for minutes. RE2 has no lookaround and no backreferences; such patterns are
refused when the routes are loaded (:func:`compile_pattern`). The layer only
examines the first :data:`KEYWORD_TEXT_CHARS` characters of a prompt, which
keeps a request's cost bounded however many rules there are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import re2

Pattern: TypeAlias = re2._Regexp  # google-re2 has no public name for a compiled pattern

KEYWORD_TEXT_CHARS = 8192
"""How much of the routing text (from its start) the keyword rules see; the rest is never searched."""

_NOT_WORD = r"[^\pL\pN_]"  # Python's \W: RE2's \w is ASCII-only, and prompts are not
_OPTIONS = re2.Options()
_OPTIONS.case_sensitive = False
_OPTIONS.log_errors = False  # a bad pattern is reported by the exception, not on stderr


def compile_pattern(pattern: str) -> Pattern:
    """``pattern`` as a whole word (case-insensitive); raises ``re2.error`` if RE2 cannot compile it.

    The pattern is compiled alone first, so one that would only be valid
    inside the wrapper (``a)|(b``) is refused rather than changing its meaning.
    The wrapper is (?:^|W)p(?:W|$), not \\b, because a pattern may start or end
    with a non-word character ("c++", ".py"); for ``search`` it holds exactly
    where (?<!\\w)p(?!\\w) would.
    """
    re2.compile(pattern, _OPTIONS)
    return re2.compile(rf"(?:^|{_NOT_WORD})(?:{pattern})(?:{_NOT_WORD}|$)", _OPTIONS)


class KeywordRule(Protocol):
    """What a rule is made of (``routing.config.KeywordRule`` is one); config imports this module, not back."""

    @property
    def operator(self) -> str: ...

    @property
    def patterns(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class CompiledRule:
    operator: str
    patterns: tuple[Pattern, ...]

    @classmethod
    def compile(cls, rule: KeywordRule) -> CompiledRule:
        return cls(rule.operator, tuple(compile_pattern(p) for p in rule.patterns))

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
    def compile(cls, rules: Sequence[KeywordRule]) -> KeywordMatcher:
        return cls(tuple(CompiledRule.compile(r) for r in rules))

    def matches(self, text: str) -> bool:
        """Whether every rule holds on the first :data:`KEYWORD_TEXT_CHARS` characters of ``text``."""
        text = text[:KEYWORD_TEXT_CHARS]
        return bool(self.rules) and all(rule.holds(text) for rule in self.rules)

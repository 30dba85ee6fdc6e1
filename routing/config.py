"""Pydantic models of the routing settings and of a routes file.

``serving/config.py`` embeds :class:`RoutingSettings` as its ``routing``
section; a routes file (``routing.routes_file``) holds the routes themselves
and, once ``loraserve routes fit`` has run, the calibration that produced
their thresholds. Everything is validated when it is loaded, so a bad regex or
an empty route fails at start-up with the key that is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import re2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from routing.keywords import compile_pattern

TARGET_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$"
"""An adapter name, optionally ``@alias`` (or ``@version``), resolved by the serving side."""

RoutingMode = Literal["keyword", "semantic", "hybrid"]


class RoutesFileError(Exception):
    """A routes file is missing, unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeywordRule(_Strict):
    """Case-insensitive word-boundary patterns (regular expressions), combined by ``operator``.

    ``any``: at least one pattern occurs; ``all``: every pattern occurs; ``none``:
    no pattern occurs (a veto, e.g. ``python`` but not ``snake``). Patterns are
    RE2 syntax (linear-time matching: no lookaround, no backreferences) and see
    the first ``routing.keywords.KEYWORD_TEXT_CHARS`` characters of a prompt.
    """

    operator: Literal["any", "all", "none"] = "any"
    patterns: list[str] = Field(min_length=1)

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if not pattern.strip():
                raise ValueError("a keyword pattern must not be empty")
            try:
                compile_pattern(pattern)
            except re2.error as e:
                reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
                raise ValueError(
                    f"keyword pattern {pattern!r} is not a valid regular expression in RE2 syntax "
                    f"(which has no lookaround or backreferences): {reason}"
                ) from e
        return patterns


class RouteSpec(_Strict):
    """One route: the adapter it selects and what prompts for it look like."""

    name: str | None = Field(default=None, pattern=TARGET_PATTERN, description="Route id; defaults to `adapter`.")
    adapter: str = Field(pattern=TARGET_PATTERN, description="Adapter name or `adapter@alias` to route to.")
    utterances: list[str] = Field(default=[], description="Example prompts for the semantic layer.")
    keywords: list[KeywordRule] = Field(default=[], description="Rules of the keyword layer, all must hold.")
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0, description="Minimum score; fitted by `routes fit`.")
    tenant: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="Owning tenant: only its keys (and admins) are routed by it. Null: every caller.",
    )

    @model_validator(mode="after")
    def _has_a_signal(self) -> RouteSpec:
        if not self.utterances and not self.keywords:
            raise ValueError(f"route {self.key!r} needs utterances, keyword rules, or both")
        if self.keywords and all(rule.operator == "none" for rule in self.keywords):
            raise ValueError(
                f"route {self.key!r} has only 'none' keyword rules, which would match almost every prompt: "
                "add an 'any' or 'all' rule"
            )
        if any(not u.strip() for u in self.utterances):
            raise ValueError(f"route {self.key!r} has an empty utterance")
        return self

    @property
    def key(self) -> str:
        return self.name or self.adapter


class Calibration(_Strict):
    """What ``routes fit`` learned, and the scoring settings the thresholds are only valid for."""

    encoder: str
    mode: RoutingMode
    top_k: int
    dense_weight: float
    platt_a: float = Field(description="Confidence = sigmoid(platt_a * (score - threshold) + platt_b).")
    platt_b: float
    keyword_precision: float = Field(ge=0.0, le=1.0, description="Share of keyword decisions that were right.")
    samples: int = Field(ge=0)
    data: str = Field(description="The labelled file the thresholds were fitted on.")


class RoutesFile(_Strict):
    """The content of a routes file."""

    routes: list[RouteSpec]
    calibration: Calibration | None = None

    @model_validator(mode="after")
    def _keys_are_unique(self) -> RoutesFile:
        check_unique_keys(self.routes)
        return self


class RoutingSettings(_Strict):
    """The ``routing`` section of the server config."""

    auto_model: str = Field(default="auto", min_length=1, description="`model` value that asks for routing.")
    default: str | None = Field(
        default=None, pattern=TARGET_PATTERN, description="Target when nothing matches; null: the base model."
    )
    encoder: str = Field(default="minilm", description="Encoder backend of the semantic layer (see routing.encoders).")
    mode: RoutingMode = "hybrid"
    top_k: int = Field(default=3, ge=1, description="Route score = mean of the k best utterance similarities.")
    dense_weight: float = Field(default=0.7, ge=0.0, le=1.0, description="Hybrid: weight of the dense score.")
    threshold: float = Field(default=0.5, ge=-1.0, le=1.0, description="Threshold of routes that have none.")
    routes_file: Path | None = Field(default=None, description="YAML routes file (relative to the config file).")
    routes: list[RouteSpec] = Field(default=[], description="Inline routes (instead of routes_file).")
    admin_enabled: bool = Field(default=False, description="Allow route changes at run time (admin role required).")

    @model_validator(mode="after")
    def _one_source_of_routes(self) -> RoutingSettings:
        if self.routes_file is not None and self.routes:
            raise ValueError("give routes either inline (routing.routes) or in routing.routes_file, not both")
        check_unique_keys(self.routes)
        return self


def check_unique_keys(routes: list[RouteSpec]) -> None:
    seen: set[str] = set()
    for i, route in enumerate(routes):
        if route.key in seen:
            raise ValueError(f"routes[{i}]: route {route.key!r} is defined twice; give one of them a `name`")
        seen.add(route.key)


def read_routes_file(path: Path) -> RoutesFile:
    """Read and validate a routes file; errors name the file and the key."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RoutesFileError(f"cannot read routes file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise RoutesFileError(f"routes file {path} is not valid YAML: {e}") from e
    try:
        return RoutesFile.model_validate(raw)
    except ValidationError as e:
        lines = [f"invalid routes file {path}:"]
        for item in e.errors():
            key = ".".join(str(p) for p in item["loc"]) or "(root)"
            lines.append(f"  {key}: {item['msg']}")
        raise RoutesFileError("\n".join(lines)) from e


def write_routes_file(path: Path, routes_file: RoutesFile, header: str) -> None:
    """Write a routes file (``routes fit`` output); ``header`` becomes a leading comment."""
    body = yaml.safe_dump(routes_file.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + body)


def load_routes(settings: RoutingSettings) -> RoutesFile:
    """The routes the settings name (inline or from the routes file), checked against the settings.

    Fitted thresholds are only valid for the scoring settings they were fitted
    with; a mismatch is an error rather than a silent loss of accuracy.
    """
    if settings.routes_file is None:
        return RoutesFile(routes=list(settings.routes))
    routes_file = read_routes_file(settings.routes_file)
    cal = routes_file.calibration
    if cal is not None:
        fitted = {"encoder": cal.encoder, "mode": cal.mode, "top_k": cal.top_k, "dense_weight": cal.dense_weight}
        current = {k: getattr(settings, k) for k in fitted}
        if fitted != current:
            raise RoutesFileError(
                f"the thresholds in {settings.routes_file} were fitted with {fitted}, but routing uses {current}: "
                "change the routing settings back or re-run `loraserve routes fit`"
            )
    return routes_file

"""Labelled prompts and what the prompt router makes of them: accuracy, per-route precision and
recall, the confusion matrix, and expected calibration error.

A labelled file is JSONL, one ``{"prompt": ..., "label": ...}`` per line, where
the label is a route's key or ``none`` (no route should match).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from routing.prompt_router import PromptRouter, RouteDecision

NONE_LABEL = "none"
ECE_BINS = 10


class LabelledDataError(Exception):
    """A labelled file is unreadable or names a label that is not a route."""


@dataclass(frozen=True)
class Sample:
    prompt: str
    label: str


def read_samples(path: Path, route_keys: list[str]) -> list[Sample]:
    """Read a labelled JSONL file; every label must be a route key or ``none``."""
    allowed = {*route_keys, NONE_LABEL}
    samples: list[Sample] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise LabelledDataError(f"cannot read labelled data {path}: {e.strerror}") from e
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            sample = Sample(prompt=str(record["prompt"]), label=str(record["label"]))
        except (ValueError, KeyError, TypeError) as e:
            raise LabelledDataError(f'{path}:{number}: expected {{"prompt": ..., "label": ...}}: {e}') from e
        if sample.label not in allowed:
            raise LabelledDataError(
                f"{path}:{number}: label {sample.label!r} is not a route; use one of {sorted(allowed)}"
            )
        samples.append(sample)
    if not samples:
        raise LabelledDataError(f"{path} holds no labelled prompts")
    return samples


def predicted_label(decision: RouteDecision) -> str:
    return decision.route or NONE_LABEL


@dataclass
class LabelStats:
    precision: float
    recall: float
    support: int


@dataclass
class EvalReport:
    samples: int
    accuracy: float
    labels: list[str]
    per_label: dict[str, LabelStats]
    confusion: dict[str, dict[str, int]]  # confusion[true][predicted]
    ece: float | None
    methods: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, true, predicted)

    def to_json(self) -> dict:
        return {
            "samples": self.samples,
            "accuracy": self.accuracy,
            "per_label": {k: vars(v) for k, v in self.per_label.items()},
            "confusion": self.confusion,
            "ece": self.ece,
            "methods": self.methods,
        }


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = ECE_BINS) -> float:
    """Mean |accuracy − confidence| over equal-width confidence bins, weighted by bin size."""
    total = len(confidences)
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            confidence = sum(confidences[i] for i in members) / len(members)
            ece += len(members) / total * abs(accuracy - confidence)
    return ece


def evaluate(prompt_router: PromptRouter, samples: list[Sample]) -> EvalReport:
    """Route every sample with the prompt router as configured (thresholds applied) and score it."""
    labels = [*(spec.key for spec in prompt_router.table.specs), NONE_LABEL]
    confusion = {t: dict.fromkeys(labels, 0) for t in labels}
    confidences: list[float] = []
    correct: list[bool] = []
    methods: dict[str, int] = {}
    errors: list[tuple[str, str, str]] = []
    for sample in samples:
        decision = prompt_router.route(sample.prompt)
        predicted = predicted_label(decision)
        confusion[sample.label][predicted] += 1
        methods[decision.method] = methods.get(decision.method, 0) + 1
        correct.append(predicted == sample.label)
        if decision.confidence is not None:
            confidences.append(decision.confidence)
        if predicted != sample.label:
            errors.append((sample.prompt, sample.label, predicted))
    per_label = {}
    for label in labels:
        tp = confusion[label][label]
        predicted_n = sum(confusion[t][label] for t in labels)
        support = sum(confusion[label].values())
        per_label[label] = LabelStats(
            precision=tp / predicted_n if predicted_n else 0.0, recall=tp / support if support else 0.0, support=support
        )
    ece = expected_calibration_error(confidences, correct) if len(confidences) == len(samples) else None
    return EvalReport(
        samples=len(samples),
        accuracy=sum(correct) / len(samples),
        labels=labels,
        per_label=per_label,
        confusion=confusion,
        ece=ece,
        methods=methods,
        errors=errors,
    )


def format_report(report: EvalReport) -> str:
    """The table ``loraserve routes eval`` prints."""
    lines = [f"samples: {report.samples}", f"accuracy: {report.accuracy:.3f}"]
    lines.append(
        "calibration error (ECE): "
        + ("n/a (no calibration; run routes fit)" if report.ece is None else f"{report.ece:.3f}")
    )
    lines.append("decisions by method: " + ", ".join(f"{k}={v}" for k, v in sorted(report.methods.items())))
    lines.append("")
    lines.append(f"{'route':<12}{'precision':>10}{'recall':>10}{'support':>10}")
    for label, stats in report.per_label.items():
        lines.append(f"{label:<12}{stats.precision:>10.3f}{stats.recall:>10.3f}{stats.support:>10d}")
    lines.append("")
    lines.append("confusion (rows: true label, columns: predicted)")
    width = max(8, *(len(label) + 2 for label in report.labels))
    lines.append(" " * 12 + "".join(f"{label:>{width}}" for label in report.labels))
    for true in report.labels:
        lines.append(f"{true:<12}" + "".join(f"{report.confusion[true][p]:>{width}d}" for p in report.labels))
    if report.errors:
        lines.append("")
        lines.append("misrouted:")
        lines.extend(f"  [{true} → {predicted}] {prompt}" for prompt, true, predicted in report.errors)
    return "\n".join(lines)

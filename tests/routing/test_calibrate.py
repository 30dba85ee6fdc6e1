"""Threshold fitting, Platt confidence, ECE and the labelled-file reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from routing.calibrate import ScoredSample, fit, fit_platt, fit_threshold
from routing.config import RoutesFile, RouteSpec, RoutingSettings
from routing.encoders import HashingEncoder
from routing.evaluate import LabelledDataError, Sample, evaluate, expected_calibration_error, read_samples
from routing.prompt_router import PromptRouter


def members(*pairs: tuple[str, float]) -> list[ScoredSample]:
    return [ScoredSample(label, None, "code", score) for label, score in pairs]


THRESHOLD_CASES = [
    # (samples whose best route is 'code', lowest acceptable cut, highest acceptable cut, right answers)
    (members(("none", 0.1), ("none", 0.2), ("code", 0.5), ("code", 0.6)), 0.2, 0.5, 4),
    (members(("code", 0.1), ("code", 0.2)), -1.0, 0.1, 2),  # no negatives: accept all
    (members(("none", 0.4), ("none", 0.5)), 0.5, 2.0, 2),  # no positives: reject all
    (members(("none", 0.1), ("code", 0.3), ("none", 0.35), ("code", 0.6)), 0.1, 0.6, 3),  # two best cuts
    (members(("legal", 0.3), ("code", 0.5)), -1.0, 0.5, 1),  # other-route labels are wrong either way
]


@pytest.mark.parametrize(("scored", "lo", "hi", "right"), THRESHOLD_CASES)
def test_fit_threshold(scored, lo: float, hi: float, right: int) -> None:
    threshold, got = fit_threshold("code", scored)
    assert got == right
    assert lo < threshold <= hi


def test_platt_recovers_a_monotone_confidence() -> None:
    rng = np.random.default_rng(0)
    margins = rng.uniform(-0.3, 0.3, 2000)
    outcomes = rng.uniform(size=2000) < 1 / (1 + np.exp(-(20 * margins + 0.5)))
    a, b = fit_platt(margins, outcomes)
    assert a == pytest.approx(20, rel=0.2) and b == pytest.approx(0.5, abs=0.25)


ECE_CASES = [
    ([1.0, 1.0], [True, True], 0.0),
    ([0.9, 0.9], [True, False], 0.4),
    ([0.15, 0.85], [False, True], 0.15),
]


@pytest.mark.parametrize(("confidences", "correct", "ece"), ECE_CASES)
def test_expected_calibration_error(confidences, correct, ece: float) -> None:
    assert expected_calibration_error(confidences, correct) == pytest.approx(ece)


ROUTES = RoutesFile(
    routes=[
        RouteSpec(adapter="code", utterances=["python function list", "git commit merge branch"]),
        RouteSpec(adapter="medical", utterances=["patient fever symptoms", "blood pressure dose"]),
    ]
)
FIT = [
    Sample("python function returns list", "code"),
    Sample("git merge branch conflict", "code"),
    Sample("patient has fever", "medical"),
    Sample("blood pressure medication dose", "medical"),
    Sample("python snakes in the zoo", "none"),
    Sample("a merge of two rivers", "none"),
    Sample("the weather is warm", "none"),
    Sample("pressure cooker recipe", "none"),
]


def test_fit_learns_thresholds_that_beat_a_bad_default() -> None:
    settings = RoutingSettings(encoder="hashing", mode="semantic", top_k=1, threshold=-1.0)
    encoder = HashingEncoder()
    before = evaluate(PromptRouter(settings, encoder, ROUTES), FIT)
    fitted = fit(PromptRouter(settings, encoder, ROUTES), ROUTES, FIT, "fit.jsonl")
    after = evaluate(PromptRouter(settings, encoder, fitted), FIT)
    assert before.accuracy == 0.5  # threshold -1: every 'none' prompt is routed
    assert after.accuracy > before.accuracy
    assert all(spec.threshold is not None for spec in fitted.routes)
    cal = fitted.calibration
    assert (cal.encoder, cal.mode, cal.top_k, cal.samples, cal.data) == ("hashing", "semantic", 1, 8, "fit.jsonl")
    assert after.ece is not None and before.ece is None  # confidences only once calibrated
    assert after.per_label["none"].support == 4
    assert sum(sum(row.values()) for row in after.confusion.values()) == 8


def test_read_samples_validates_every_line(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"prompt": "p", "label": "code"}) + "\n\n" + json.dumps({"prompt": "q", "label": "none"}) + "\n"
    )
    assert read_samples(good, ["code"]) == [Sample("p", "code"), Sample("q", "none")]
    cases = [
        ('{"prompt": "p", "label": "legal"}', r"bad.jsonl:1: label 'legal' is not a route"),
        ('{"prompt": "p"}', r"bad.jsonl:1: expected"),
        ("not json", r"bad.jsonl:1: expected"),
        ("", "holds no labelled prompts"),
    ]
    bad = tmp_path / "bad.jsonl"
    for line, message in cases:
        bad.write_text(line + "\n")
        with pytest.raises(LabelledDataError, match=message):
            read_samples(bad, ["code"])

"""``routes fit``: per-route thresholds and a Platt confidence, learned from labelled prompts.

The prompt router takes the best-scoring route and accepts it only if its score
reaches that route's threshold. Because the best route does not depend on the
thresholds, each route's threshold can be fitted alone, exactly: over the
prompts whose best route it is, pick the cut that maximises correct decisions
(prompts labelled with the route above it, prompts labelled ``none`` below).
Prompts the keyword layer decides never reach a threshold, so they are left
out of the fit and only give the keyword layer's precision.

Confidence is ``sigmoid(a * (score − threshold) + b)`` (Platt scaling) for a
routed prompt, one minus that for a prompt sent to the default; ``a, b`` are
fitted by logistic regression on the same prompts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from routing.config import Calibration, RoutesFile
from routing.evaluate import NONE_LABEL, Sample
from routing.prompt_router import PromptRouter


@dataclass(frozen=True)
class ScoredSample:
    label: str
    keyword_route: str | None
    best_route: str | None
    best_score: float


def score_samples(prompt_router: PromptRouter, samples: list[Sample]) -> list[ScoredSample]:
    """Keyword decision or best similarity route of every sample, thresholds not applied."""
    scored = []
    for sample in samples:
        keyword = prompt_router.route_by_keywords(sample.prompt)
        if keyword is not None:
            scored.append(ScoredSample(sample.label, keyword.route, None, 1.0))
            continue
        scores = prompt_router.scores(sample.prompt) if prompt_router.table.routes else {}
        best = max(scores, key=scores.__getitem__) if scores else None
        scored.append(ScoredSample(sample.label, None, best, scores[best] if best else -1.0))
    return scored


def fit_threshold(route: str, members: list[ScoredSample]) -> tuple[float, int]:
    """The cut over ``members`` (samples whose best route is ``route``) with the most right answers.

    Candidates are the midpoints between neighbouring scores (and just outside
    both ends); among equally good cuts the middle one is taken, for margin.
    """
    scores = sorted({round(m.best_score, 6) for m in members})
    candidates = [scores[0] - 0.01] + [(a + b) / 2 for a, b in zip(scores, scores[1:])] + [scores[-1] + 0.01]

    def right(t: float) -> int:
        return sum(
            (m.best_score >= t and m.label == route) or (m.best_score < t and m.label == NONE_LABEL) for m in members
        )

    counts = [right(t) for t in candidates]
    best = max(counts)
    winners = [t for t, c in zip(candidates, counts) if c == best]
    return float(winners[len(winners) // 2]), best


def fit_platt(margins: np.ndarray, outcomes: np.ndarray, l2: float = 1e-3, steps: int = 50) -> tuple[float, float]:
    """Logistic regression of ``outcomes`` (0/1) on ``margins`` by Newton's method."""
    x = np.stack([margins, np.ones_like(margins)], axis=1).astype(np.float64)
    y = outcomes.astype(np.float64)
    w = np.zeros(2)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -50, 50)))
        grad = x.T @ (p - y) + l2 * w
        hess = x.T @ (x * (p * (1 - p))[:, None]) + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return float(w[0]), float(w[1])


def fit(prompt_router: PromptRouter, routes: RoutesFile, samples: list[Sample], data_name: str) -> RoutesFile:
    """``routes`` with fitted thresholds and a :class:`Calibration` block."""
    scored = score_samples(prompt_router, samples)
    by_route: dict[str, list[ScoredSample]] = defaultdict(list)
    for s in scored:
        if s.keyword_route is None and s.best_route is not None:
            by_route[s.best_route].append(s)
    specs = []
    for spec in routes.routes:
        members = by_route.get(spec.key)
        if members:
            threshold, _ = fit_threshold(spec.key, members)
            spec = spec.model_copy(update={"threshold": round(threshold, 4)})
        specs.append(spec)
    thresholds = {s.key: s.threshold if s.threshold is not None else prompt_router.settings.threshold for s in specs}
    semantic = [(s, route) for s in scored if s.keyword_route is None and (route := s.best_route) is not None]
    margins = np.array([s.best_score - thresholds[route] for s, route in semantic])
    outcomes = np.array([s.label == route for s, route in semantic])
    a, b = fit_platt(margins, outcomes) if len(semantic) and 0 < outcomes.sum() < len(outcomes) else (1.0, 0.0)
    keyword = [s for s in scored if s.keyword_route is not None]
    precision = sum(s.label == s.keyword_route for s in keyword) / len(keyword) if keyword else 1.0
    settings = prompt_router.settings
    calibration = Calibration(
        encoder=settings.encoder,
        mode=settings.mode,
        top_k=settings.top_k,
        dense_weight=settings.dense_weight,
        platt_a=round(a, 4),
        platt_b=round(b, 4),
        keyword_precision=round(precision, 4),
        samples=len(samples),
        data=data_name,
    )
    return RoutesFile(routes=specs, calibration=calibration)

"""Validation of routes and routing settings: bad input fails naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from routing.config import (
    Calibration,
    RoutesFile,
    RoutesFileError,
    RouteSpec,
    RoutingSettings,
    load_routes,
    read_routes_file,
    write_routes_file,
)

BAD_ROUTES = [
    ({"adapter": "code"}, "needs utterances, keyword rules, or both"),
    ({"adapter": "code", "keywords": [{"operator": "none", "patterns": ["x"]}]}, "only 'none' keyword rules"),
    ({"adapter": "code", "keywords": [{"patterns": ["(unclosed"]}]}, "not a valid regular expression"),
    # RE2 syntax: lookaround and backreferences (which need backtracking) are refused at load
    ({"adapter": "code", "keywords": [{"patterns": ["(?<!un)safe"]}]}, "RE2 syntax"),
    ({"adapter": "code", "keywords": [{"patterns": [r"(a)\1"]}]}, "RE2 syntax"),
    # valid only inside the word-boundary wrapper, where it would change its meaning
    ({"adapter": "code", "keywords": [{"patterns": ["a)|(b"]}]}, "not a valid regular expression"),
    ({"adapter": "code", "utterances": ["  "]}, "empty utterance"),
    ({"adapter": "code/../x", "utterances": ["a"]}, "String should match pattern"),
    ({"adapter": "code", "utterances": ["a"], "threshold": 2}, "less than or equal to 1"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_ROUTES)
def test_bad_routes_are_refused(raw: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RouteSpec.model_validate(raw)


def test_alias_targets_and_keys() -> None:
    route = RouteSpec(adapter="legal@stable", utterances=["a"])
    assert route.key == "legal@stable"
    assert RouteSpec(name="contracts", adapter="legal@stable", utterances=["a"]).key == "contracts"


def test_duplicate_route_keys_are_refused() -> None:
    routes = [{"adapter": "code", "utterances": ["a"]}, {"adapter": "code", "utterances": ["b"]}]
    with pytest.raises(ValidationError, match="defined twice"):
        RoutesFile.model_validate({"routes": routes})


def test_inline_and_file_routes_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not both"):
        RoutingSettings(routes_file=tmp_path / "r.yaml", routes=[RouteSpec(adapter="code", utterances=["a"])])


def _calibration(**overrides) -> Calibration:
    fields = dict(encoder="hashing", mode="semantic", top_k=3, dense_weight=0.7, platt_a=10.0, platt_b=0.0,
                  keyword_precision=1.0, samples=4, data="x.jsonl")  # fmt: skip
    return Calibration(**{**fields, **overrides})


def test_routes_file_round_trip_and_calibration_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    routes = RoutesFile(
        routes=[RouteSpec(adapter="code", utterances=["fix my bug"], threshold=0.3)], calibration=_calibration()
    )
    write_routes_file(path, routes, "fitted for a test")
    assert path.read_text().startswith("# fitted for a test\n")
    assert read_routes_file(path) == routes
    assert load_routes(RoutingSettings(encoder="hashing", mode="semantic", top_k=3, routes_file=path)) == routes
    with pytest.raises(RoutesFileError, match="re-run `loraserve routes fit`"):
        load_routes(RoutingSettings(encoder="minilm", mode="semantic", top_k=3, routes_file=path))


def test_unreadable_and_invalid_routes_files(tmp_path: Path) -> None:
    with pytest.raises(RoutesFileError, match="cannot read routes file"):
        read_routes_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes:\n- adapter: code\n  utterances: []\n")
    with pytest.raises(RoutesFileError, match="invalid routes file .*bad.yaml"):
        read_routes_file(bad)


def test_a_routes_file_with_a_backtracking_only_pattern_names_the_rule(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("routes:\n  - adapter: code\n    keywords:\n      - patterns: [python, '(?=py)\\w+']\n")
    with pytest.raises(RoutesFileError, match=r"routes\.0\.keywords\.0\.patterns: .*RE2 syntax"):
        read_routes_file(path)

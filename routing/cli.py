"""``loraserve routes fit|eval``: calibrate the prompt router on labelled prompts and measure it.

The server's CLI hands in how to read the ``routing`` section of a config
file, so this package never imports the server.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from routing.calibrate import fit
from routing.config import (
    RoutesFile,
    RoutesFileError,
    RoutingSettings,
    load_routes,
    read_routes_file,
    write_routes_file,
)
from routing.encoders import build_encoder
from routing.evaluate import LabelledDataError, evaluate, format_report, read_samples
from routing.prompt_router import PromptRouter

LoadRouting = Callable[[Path], RoutingSettings | None]


class RoutesCommandError(Exception):
    """A ``routes`` command cannot run (no routing section, bad data, ...)."""


def _routing(args: argparse.Namespace) -> RoutingSettings:
    routing = args.load_routing(args.config)
    if routing is None:
        raise RoutesCommandError(f"{args.config} has no `routing` section")
    return routing


def _fit(args: argparse.Namespace) -> int:
    routing = _routing(args)
    out: Path | None = args.out or routing.routes_file
    if out is None:
        raise RoutesCommandError("the routes are inline in the config: give --out FILE for the fitted routes")
    source = read_routes_file(routing.routes_file) if routing.routes_file else RoutesFile(routes=list(routing.routes))
    unfitted = RoutesFile(routes=source.routes)  # old thresholds and calibration play no part
    prompt_router = PromptRouter(routing, build_encoder(routing.encoder), unfitted)
    samples = read_samples(args.data, [spec.key for spec in unfitted.routes])
    fitted = fit(prompt_router, unfitted, samples, data_name=args.data.name)
    header = f"Routes of the semantic prompt router; thresholds and calibration written by `loraserve routes fit` on {args.data.name}."
    write_routes_file(out, fitted, header)
    print(f"fitted on {len(samples)} prompts ({routing.encoder}, {routing.mode}); wrote {out}")
    for spec in fitted.routes:
        print(f"  {spec.key:<12} threshold {spec.threshold}")
    cal = fitted.calibration
    assert cal is not None  # fit always calibrates
    print(
        f"  confidence = sigmoid({cal.platt_a} * (score - threshold) + {cal.platt_b}); keyword precision {cal.keyword_precision}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    routing = _routing(args)
    routes = load_routes(routing)
    prompt_router = PromptRouter(routing, build_encoder(routing.encoder), routes)
    samples = read_samples(args.data, [spec.key for spec in routes.routes])
    report = evaluate(prompt_router, samples)
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0


def _run(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (RoutesCommandError, RoutesFileError, LabelledDataError) as e:
            print(f"loraserve routes: {e}", flush=True)
            return 2

    return run


def add_routes_command(commands: argparse._SubParsersAction, load_routing: LoadRouting) -> None:
    """Add ``routes fit`` and ``routes eval`` to a CLI's subcommands."""
    routes = commands.add_parser("routes", help="calibrate and evaluate the adapter prompt router")
    sub = routes.add_subparsers(dest="routes_command", required=True)

    fit_parser = sub.add_parser("fit", help="fit per-route thresholds on labelled prompts (JSONL prompt/label)")
    fit_parser.add_argument("--config", type=Path, required=True, help="server config with a routing section")
    fit_parser.add_argument(
        "--data", type=Path, required=True, help='JSONL: {"prompt", "label"}; label none = no route'
    )
    fit_parser.add_argument("--out", type=Path, help="where to write the fitted routes (default: the routes file)")
    fit_parser.set_defaults(handler=_run(_fit), load_routing=load_routing)

    eval_parser = sub.add_parser("eval", help="accuracy, per-route precision/recall, confusion, calibration error")
    eval_parser.add_argument("--config", type=Path, required=True, help="server config with a routing section")
    eval_parser.add_argument(
        "--data", type=Path, required=True, help='JSONL: {"prompt", "label"}; label none = no route'
    )
    eval_parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    eval_parser.set_defaults(handler=_run(_eval), load_routing=load_routing)

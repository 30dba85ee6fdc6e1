"""A benchmark run on ``bench_cold``'s synthetic model: its shared flags, the model, and the report it writes.

Why one place: ``bench_cold`` measures cold adapter loads through a server on a synthetic Llama
(``checkpoints.synthetic``, 58M parameters), and ``bench_swap`` and ``bench_cold_mix`` time parts of those
loads without an engine on the same model's layers. All three take the same flags for it (``--out``,
``--cache-dir``, ``--max-rank``), build it the same way, and write reports that must name the same things
(the command, the machine and its load before and after, every setting) for their figures to compare.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter_store import BaseModelSpec
from loadtests.machine import machine_info

BASE_NAME = "bench-cold-base"


def bench_parser(doc: str, out: Path | None, out_help: str | None = None) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with the flags every run on the model takes: ``--out``
    (default ``out``), ``--cache-dir`` (where the model is built once) and ``--max-rank``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=out, help=out_help)
    parser.add_argument("--cache-dir", default=os.environ.get("LORASERVE_SYNTH_DIR", "/tmp/loraserve_synth"))
    parser.add_argument(
        "--max-rank", type=int, default=256, help="bench_cold's engine.max_lora_rank (fits its largest adapter)"
    )
    return parser


@dataclass
class SyntheticRun:
    """One run: its command (``module`` and ``argv``), flags, the model and its spec, and the load average
    before the measurement (:meth:`start`), for the report (:meth:`report`)."""

    module: str
    args: argparse.Namespace
    argv: list[str] | None
    model: Path
    base: BaseModelSpec
    load_before: tuple[float, float, float]

    @classmethod
    def start(cls, module: str, args: argparse.Namespace, argv: list[str] | None) -> SyntheticRun:
        """The model built under ``args.cache_dir`` (at once if it is already), then the load average read."""
        from checkpoints.synthetic import build_model

        model = build_model(Path(args.cache_dir) / "model")
        base = BaseModelSpec.from_config(model / "config.json", [BASE_NAME])
        return cls(module, args, argv, model, base, os.getloadavg())

    def report(self, measured: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run's report, ``extra`` settings beside the flags, written to ``args.out`` (its folder made)."""
        argv = self.argv if self.argv is not None else sys.argv[1:]
        flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()}
        report = {
            "date": datetime.date.today().isoformat(),
            "command": f"python -m {self.module} " + " ".join(argv),
            "machine": machine_info(loadavg_before=self.load_before, loadavg_after=os.getloadavg()),
            "settings": {**flags, **(extra or {})},
            "measured": measured,
        }
        out: Path = self.args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
        return report

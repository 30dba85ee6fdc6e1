"""``loraserve loadtest``: locust headless against a server it starts (or ``--host``), then a summary.

    loraserve loadtest --config configs/dev.yaml --users 8 --run-time 60s \\
        --goodput ttft:500 tpot:100 -- --zipf-s 1.2 --bad-share 0.1

Everything after ``--`` goes to locust unchanged: the workload options of
``loadtests/locustfile.py`` (``--models``, ``--zipf-s``, ``--stream-share``,
``--chat-share``, ``--auto-share``, ``--bad-share``, ``--max-tokens``, ...)
and any locust flag. Writes into ``--out``: locust's CSVs (``locust_*.csv``)
and HTML report (``locust.html``), the raw records (``records.jsonl``), the
summary (``summary.json`` and the printed table, ``summary.txt``) and, when it
started the server, ``server.log``.

Exit status 0 only when the run completed requests and had no unexpected
failure (failed good requests, or bad requests that did not get their 4xx).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from loadtests.process import free_port, running_server
from loadtests.summary import SummaryError, format_table, load_records, parse_goodput, summarize

DEFAULT_LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--config", type=Path, help="start `loraserve serve` with this config for the run")
    target.add_argument("--host", help="test an already running server at this URL instead")
    parser.add_argument("--users", type=int, default=4, help="concurrent locust users (default 4)")
    parser.add_argument("--spawn-rate", type=float, help="users started per second (default: all at once)")
    parser.add_argument("--run-time", default="30s", help="locust run time, e.g. 30s, 5m (default 30s)")
    parser.add_argument("--out", type=Path, default=Path(".loadtest"), help="output directory (default .loadtest)")
    parser.add_argument(
        "--goodput", nargs="+", default=[], metavar="KEY:MS",
        help="SLOs for goodput as in vllm bench serve, e.g. ttft:500 tpot:100 e2el:5000 (milliseconds)",
    )  # fmt: skip
    parser.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles (default 99)")
    parser.add_argument("--locustfile", type=Path, default=DEFAULT_LOCUSTFILE, help="locustfile to run")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for the server's /health")
    parser.add_argument("locust_args", nargs=argparse.REMAINDER, help="after --: passed to locust unchanged")


def locust_command(args: argparse.Namespace, host: str) -> list[str]:
    """The headless locust command line of one run."""
    extra = list(args.locust_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    spawn_rate = args.spawn_rate if args.spawn_rate is not None else args.users
    return [
        sys.executable, "-m", "locust", "-f", str(args.locustfile), "--headless", "--only-summary",
        "--users", str(args.users), "--spawn-rate", f"{spawn_rate:g}", "--run-time", args.run_time,
        "--stop-timeout", "120", "--host", host,
        "--csv", str(args.out / "locust"), "--html", str(args.out / "locust.html"),
        "--records", str(args.out / "records.jsonl"), *extra,
    ]  # fmt: skip


def run_locust(args: argparse.Namespace, host: str) -> int:
    """Run locust to completion (its table goes to our stdout); returns locust's exit status."""
    records = args.out / "records.jsonl"
    records.unlink(missing_ok=True)
    return subprocess.run(locust_command(args, host)).returncode


def run(args: argparse.Namespace) -> int:
    """The whole ``loraserve loadtest``: server (optional), locust, summary."""
    try:
        goodput = parse_goodput(args.goodput)
        percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    except (SummaryError, ValueError) as e:
        print(f"loraserve loadtest: {e}", file=sys.stderr)
        return 2
    if not args.locustfile.is_file():
        print(f"loraserve loadtest: no locustfile at {args.locustfile}; pass --locustfile", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    host = args.host
    server: AbstractContextManager[object] = nullcontext()  # or the server this run starts
    if args.config is not None:
        # A bad config fails here, not after minutes of start-up (its message is the CLI's own).
        checked = subprocess.run([sys.executable, "-m", "serving.cli", "check-config", "--config", str(args.config)],
                                 capture_output=True, text=True)  # fmt: skip
        if checked.returncode != 0:
            print(checked.stderr.strip() or checked.stdout.strip(), file=sys.stderr)
            return 2
        port = free_port()
        host = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "serving.cli", "serve", "--config", str(args.config),
                   "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        print(f"starting the server ({args.config}); log in {args.out / 'server.log'}", flush=True)
        server = running_server(command, f"{host}/health", args.out / "server.log", timeout_s=args.start_timeout)
    with server:
        locust_status = run_locust(args, host.rstrip("/"))
    summary = summarize(load_records(args.out / "records.jsonl"), goodput, percentiles)
    summary["locust_exit_code"] = locust_status
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = format_table(summary)
    (args.out / "summary.txt").write_text(table + "\n")
    print(table)
    if summary["errors"]:
        print("first errors:\n  " + "\n  ".join(summary["errors"]))
    ok = summary["completed"] > 0 and summary["unexpected_failures"] == 0 and locust_status == 0
    return 0 if ok else 1

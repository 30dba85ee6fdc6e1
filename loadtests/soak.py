"""Soak run: the server under mixed load for a long time, watching errors and memory.

Starts ``loraserve serve`` with a config, samples the resident memory of the
server and its engine processes, and runs ``loraserve loadtest --host`` against
it: both endpoints, streaming and not, Zipf-skewed adapters, ``model: auto``
with every request generating its full ``max_tokens`` (``ignore_eos``),
and a share of bad requests. At the end it prints requests served, errors by
kind (only the bad requests' expected 4xx may appear), and memory at start,
peak and end; it writes the same as JSON.

    python -m loadtests.soak --minutes 10            # configs/dev.yaml, 8 users
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from loadtests.process import free_port, running_server

ROOT = Path(__file__).resolve().parents[1]


MIB = 1 << 20


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (the engine core and workers)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


class MemorySampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set():
            self.samples.append((time.monotonic() - start, tree_rss_bytes(self.pid)))
            self.stop.wait(self.every_s)


def outcomes(records_path: Path) -> dict[str, int]:
    """Requests by kind and status: ``targeted 200``, ``bad 404 (unknown_model)``, ..."""
    counts: Counter[str] = Counter()
    for line in records_path.read_text().splitlines():
        r = json.loads(line)
        label = f"{r['kind']} {r['status']}"
        if r["kind"] == "bad":
            label += f" ({r['bad_case']}, expected {r['expected_status']})"
        counts[label] += 1
    return dict(sorted(counts.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "dev.yaml")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--work", type=Path, default=ROOT / ".loadtest" / "soak")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "soak.json")
    args = parser.parse_args()

    port = free_port()
    host = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "serving.cli", "serve", "--config", str(args.config),
             "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    loadtest = [sys.executable, "-m", "serving.cli", "loadtest", "--host", host, "--out", str(args.work),
                "--users", str(args.users), "--run-time", f"{int(args.minutes * 60)}s",
                "--", "--stream-share", "0.5", "--chat-share", "0.5", "--auto-share", "0.2",
                "--bad-share", "0.1", "--zipf-s", "1.1", "--max-tokens", "48", "--ignore-eos"]  # fmt: skip
    with running_server(serve, f"{host}/health", args.work / "server.log", cwd=ROOT, timeout_s=900) as server:
        sampler = MemorySampler(server.pid)
        sampler.start()
        status = subprocess.run(loadtest, cwd=ROOT).returncode
        sampler.stop.set()
        sampler.join()
        healthy_after = server.poll() is None

    summary = json.loads((args.work / "summary.json").read_text())
    rss = [b for _, b in sampler.samples]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "minutes": args.minutes,
        "users": args.users,
        "loadtest_exit_code": status,
        "server_alive_at_end": healthy_after,
        "requests": summary["completed"] + summary["bad_requests"]["sent"] + summary["failed"],
        "served": summary["completed"],
        "unexpected_failures": summary["unexpected_failures"],
        "outcomes": outcomes(args.work / "records.jsonl"),
        "output_throughput": summary["output_throughput"],
        "median_ttft_ms": summary["median_ttft_ms"],
        "p99_ttft_ms": summary.get("p99_ttft_ms"),
        "rss_mib": {"start": rss[0] / MIB, "peak": max(rss) / MIB, "end": rss[-1] / MIB},
        "rss_samples": [(round(t, 1), round(b / MIB, 1)) for t, b in sampler.samples],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nsoak: {args.minutes:g} min, {args.users} users against {report['config']}")
    print(f"requests {report['requests']}, served {report['served']}, unexpected failures "
          f"{report['unexpected_failures']}, server alive at end: {healthy_after}")  # fmt: skip
    for label, count in report["outcomes"].items():
        print(f"  {label:<60} {count:>7}")
    m = report["rss_mib"]
    print(f"memory (server + engine processes): start {m['start']:.0f} MiB, peak {m['peak']:.0f} MiB, "
          f"end {m['end']:.0f} MiB")  # fmt: skip
    print(f"wrote {args.out}")
    ok = status == 0 and report["unexpected_failures"] == 0 and healthy_after
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

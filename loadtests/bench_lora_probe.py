"""Where a LoRA step's extra time goes: three probes inside ``bench_lora``'s own worker, switched in turn.

    python -m loadtests.bench_lora_probe [--rounds 2] [--probes skip,repeat,runs] [--out results/bench_lora_probe.json]

Why: ``bench_lora`` says how much a workload costs against a plain base, not
where. This runs its worker as it does (the realistic model, the ``lora4``
engine, 16 sequences, 256 requests of 64 + 32 tokens a workload, dtype as the
server resolves it) with three probes, each switched on and off in turn within
one run, so each comparison shares the engine and the minute:

* ``skip``: the per-token kernel's calls skipped (our ops' Python still runs;
  the answers are wrong, but ``ignore_eos`` keeps every request at its
  tokens) or run, for the one-adapter and the base workloads: ms a step. With
  the calls skipped, one adapter costing what the base does puts the whole
  gap on the kernel's calls.
* ``repeat``: every decode call of the kernel (``TokenStep.run``) timed, then
  run again at once on a copy of ``y`` (its result dropped) and timed again,
  for the one-adapter and 8-Zipf workloads: what a call costs in the step
  against what it costs with its weights, ``x`` and the threads just used.
* ``runs``: every step planned ``RUNS`` (oneDNN's matmuls, one pair a
  contiguous run of one adapter's tokens: the path the kernel replaced) or
  as the plan chooses (``TOKENS``, the kernel: ``lora_ops.plan.choose_mode``),
  for the one-adapter and 8-Zipf workloads. Every workload reports its LoRA
  linears' calls (``eager_lora_linear``, the whole call), median µs of the
  decode calls (at most 16 tokens) and of the prefill calls (the waves of up
  to 16 prompts of 64 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from loadtests import bench_lora

# (probe, setting, workload) in the order each round runs them (the settings' order flips every other round)
PLAN = {
    "skip": (("one", "base"), (False, True)),
    "repeat": (("one", "zipf8"), (True,)),
    "runs": (("one", "zipf8"), (False, True)),
}
DECODE_TOKENS = 16  # a call with at most this many tokens is a decode call (bench_lora's 16 sequences)


# ------------------------------------------------------------------ worker side
class Probes:
    """The probes' state in the worker and what they measured since the last workload."""

    def __init__(self) -> None:
        self.skip = False
        self.repeat = False
        self.calls: dict[str, list[float]] = {"first": [], "again": []}  # decode calls' seconds
        self.linears: dict[str, list[float]] = {"decode": [], "prefill": []}  # LoRA linears' calls' seconds

    @property
    def runs(self) -> bool:
        from lora_ops.plan import RUNS
        from lora_ops.punica_cpu import GroupedPunicaWrapperCPU

        return GroupedPunicaWrapperCPU.force_mode == RUNS

    @runs.setter
    def runs(self, on: bool) -> None:
        from lora_ops.plan import RUNS
        from lora_ops.punica_cpu import GroupedPunicaWrapperCPU

        GroupedPunicaWrapperCPU.force_mode = RUNS if on else None  # read by every step's plan

    def install(self) -> None:
        """Wrap ``TokenStep.run`` (the kernel's one call a LoRA linear) with the probes, and time every LoRA
        linear's call (``eager_lora_linear``: what the compiled graph's op runs too)."""
        from lora_ops import token_step
        from lora_ops.punica_cpu import GroupedPunicaWrapperCPU

        linear = GroupedPunicaWrapperCPU.eager_lora_linear

        def timed(wrapper: Any, y: Any, x: Any, *args: Any) -> None:
            t0 = time.perf_counter()
            linear(wrapper, y, x, *args)
            self.linears["decode" if x.shape[0] <= DECODE_TOKENS else "prefill"].append(time.perf_counter() - t0)

        GroupedPunicaWrapperCPU.eager_lora_linear = timed  # type: ignore[method-assign,assignment]
        run = token_step.TokenStep.run

        def probed(step: Any, y: Any, x: Any) -> None:
            if self.skip:
                return
            t0 = time.perf_counter()
            run(step, y, x)
            if self.repeat and x.shape[0] <= DECODE_TOKENS:
                t1 = time.perf_counter()
                run(step, y.clone(), x)
                self.calls["first"].append(t1 - t0)
                self.calls["again"].append(time.perf_counter() - t1)

        token_step.TokenStep.run = probed  # type: ignore[method-assign,assignment]

    def report(self) -> dict[str, float]:
        """Median decode call of the kernel (µs), first and repeated, and median LoRA linear's call by kind of
        step (µs); cleared for the next workload."""
        out = {f"decode_call_us_{k}": round(statistics.median(v) * 1e6, 1) for k, v in self.calls.items() if v}
        out |= {f"lora_call_us_{k}": round(statistics.median(v) * 1e6, 1) for k, v in self.linears.items() if v}
        self.calls = {"first": [], "again": []}
        self.linears = {"decode": [], "prefill": []}
        return out


def run_worker(args: argparse.Namespace) -> None:
    """``bench_lora``'s worker with the probes; ``probe <name> <0|1>`` lines on stdin set them."""
    probes = Probes()
    probes.install()
    measured = bench_lora.throughput

    def throughput(steps: list[bench_lora.Step], concurrency: int) -> dict:
        out = measured(steps, concurrency)
        out["ms_step"] = round(steps[-1].elapsed_s / len(steps) * 1e3, 3)
        return out | probes.report()

    bench_lora.throughput = throughput

    class Lines:
        """The worker's stdin without the probe lines, which set the probes as they come."""

        def __init__(self, stream: TextIO) -> None:
            self.stream = stream

        def __iter__(self) -> Iterator[str]:
            for line in self.stream:
                if line.startswith("probe "):
                    _, name, on = line.split()
                    setattr(probes, name, on == "1")
                    continue
                yield line

    sys.stdin = Lines(sys.stdin)
    bench_lora.run_worker(args)


# ------------------------------------------------------------------ parent side
def summarize(runs: list[dict]) -> dict[str, dict]:
    """Medians over the rounds per (probe, setting, workload): ``runs`` as measured, each with those keys."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["probe"], run["setting"], run["workload"]), []).append(run)
    out: dict[str, dict] = {}
    for (probe, setting, workload), rows in groups.items():
        keys = [k for k in rows[0] if k.startswith(("ms_step", "decode_call_us", "lora_call_us", "tok_s"))]
        out[f"{probe}={setting}/{workload}"] = {k: statistics.median(r[k] for r in rows) for k in keys}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--probes", default=",".join(PLAN), help=f"comma-separated, of {', '.join(PLAN)}")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--cache-dir", default=os.environ.get("LORASERVE_SYNTH_DIR", "/tmp/loraserve_synth"))
    p.add_argument("--_worker", dest="worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_group-dir", dest="group_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_dtype", dest="dtype", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    probes = args.probes.split(",")
    if unknown := set(probes) - set(PLAN):
        p.error(f"--probes: no probe {', '.join(sorted(unknown))}; the probes are {', '.join(PLAN)}")
    if args.worker:
        args.worker, args.requests, args.output_len, args.concurrency = "lora4", 256, 32, 16
        run_worker(args)
        return

    from checkpoints.synthetic import ensure_synthetic
    from loadtests.machine import machine_info
    from serving.sizing import detect_hardware, resolve_dtype

    dtype = resolve_dtype("auto", detect_hardware())
    group_dir = Path(args.cache_dir) / "realistic"
    ensure_synthetic(group_dir, bench_lora.NUM_ADAPTERS, bench_lora.GROUPS["realistic"], rank=bench_lora.RANK)
    cmd = [sys.executable, "-m", "loadtests.bench_lora_probe", "--_worker", "--_group-dir", str(group_dir),
           "--_dtype", dtype.value]  # fmt: skip
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    worker = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert worker.stdin is not None and worker.stdout is not None

    def read() -> dict:
        for line in worker.stdout:  # type: ignore[union-attr]
            if line.startswith(bench_lora.PROTOCOL):
                return json.loads(line[len(bench_lora.PROTOCOL) :])
        raise RuntimeError(f"the worker exited with {worker.wait()}")

    read()  # ready
    loads, runs = [os.getloadavg()[0]], []
    for rnd in range(args.rounds):
        for probe in probes:
            workloads, settings = PLAN[probe]
            for setting in settings if rnd % 2 == 0 else settings[::-1]:
                worker.stdin.write(f"probe {probe} {int(setting)}\n")
                for workload in workloads:
                    worker.stdin.write(f"{workload} {rnd}\n")
                    worker.stdin.flush()
                    got = read() | {"probe": probe, "setting": setting, "workload": workload, "round": rnd}
                    print(json.dumps(got), flush=True)
                    runs.append(got)
                worker.stdin.write(f"probe {probe} 0\n")
        loads.append(os.getloadavg()[0])
    worker.stdin.close()
    worker.wait()
    summary = summarize(runs)
    for key, values in summary.items():
        print(f"{key:24s} " + "  ".join(f"{k} {v}" for k, v in values.items()))
    if args.out:
        command = "python -m loadtests.bench_lora_probe " + " ".join(argv if argv is not None else sys.argv[1:])
        out = {"command": command, "dtype": dtype.value, "machine": machine_info(loadavg_1min=loads),
               "summary": summary, "runs": runs}  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The machine a benchmark ran on, which every recorded figure must name: CPU model and speed-deciding flags."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_info() -> dict[str, Any]:
    """The CPU model and the flags that decide its speed here (AVX2/AVX-512, native bf16, AMX)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    fields: dict[str, str] = {}
    for key, _, value in (line.partition(":") for line in text.splitlines()):
        fields.setdefault(key.strip(), value.strip())  # the first CPU's
    flags = fields.get("flags", "").split()
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "flags": sorted(f for f in flags if f.startswith(("avx", "amx"))),
    }


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU, core count and platform, plus what the caller measured about the run (load average...)."""
    return {"cpu": cpu_info(), "cpus": os.cpu_count(), "platform": platform.platform(), **extra}

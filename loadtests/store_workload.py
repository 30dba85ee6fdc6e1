"""The workload of ``loadtests.bench_store``: the adapters it writes, one streamed request, closed-loop clients.

Apart from the benchmark's phases and report so each stays readable; nothing
here knows the server's config.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PROMPT = "Write a short note about the weather today and what to do in the afternoon."


# ------------------------------------------------------------------ adapters
def write_adapters(templates: list[Path], out: Path, count: int, *, rank: int, base_name: str, seed: int) -> list[str]:
    """``count`` distinct PEFT LoRA adapters of rank ``rank`` under ``out/<name>``; returns their names.

    Adapter ``i`` starts from template ``i % len(templates)``: its LoRA A/B
    rows are rescaled by a random factor near 1 and the rank is padded (or
    cut) to ``rank`` with small seeded noise, so shapes and target modules are
    the template's and every adapter's bytes (and so its digest) differ.
    ``lora_alpha`` keeps the template's alpha / r scaling.
    """
    from safetensors.numpy import save_file
    from safetensors.torch import load_file  # torch reads bfloat16 too, numpy does not

    loaded = []
    for template in templates:
        config = json.loads((template / "adapter_config.json").read_text())
        weights = load_file(str(template / "adapter_model.safetensors"))
        tensors = {k: v.float().numpy() for k, v in weights.items()}
        loaded.append((config, tensors))
    names = []
    for i in range(count):
        config, tensors = loaded[i % len(loaded)]
        rng = np.random.default_rng([seed, i])
        new = {}
        for key, weight in tensors.items():
            if ".lora_A." in key:  # [r, in] -> [rank, in]
                new[key] = _resize_rank(weight, rank, rng, axis=0)
            elif ".lora_B." in key:  # [out, r] -> [out, rank]
                new[key] = _resize_rank(weight, rank, rng, axis=1)
            else:
                new[key] = weight
        name = f"store-{i:03d}"
        directory = out / name
        directory.mkdir(parents=True, exist_ok=True)
        alpha = config["lora_alpha"] * rank / config["r"]
        alpha = int(alpha) if alpha == int(alpha) else alpha
        meta = {**config, "r": rank, "lora_alpha": alpha, "base_model_name_or_path": base_name,
                "rank_pattern": {}, "alpha_pattern": {}}  # fmt: skip
        (directory / "adapter_config.json").write_text(json.dumps(meta, indent=2))
        save_file(new, str(directory / "adapter_model.safetensors"))
        names.append(name)
    return names


def _resize_rank(weight: np.ndarray, rank: int, rng: np.random.Generator, axis: int) -> np.ndarray:
    """``weight`` with its rank axis rescaled and padded/cut to ``rank``; the padding is small noise."""
    keep = min(rank, weight.shape[axis])
    scale = float(weight.std()) or 1e-3
    shape = list(weight.shape)
    shape[axis] = rank
    out = (rng.standard_normal(shape) * 0.1 * scale).astype(np.float32)
    index = [slice(None), slice(None)]
    index[axis] = slice(0, keep)
    out[tuple(index)] = weight[tuple(index)] * rng.uniform(0.8, 1.2)
    return out


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------ one request
def _carries_tokens(event: dict) -> bool:
    """Whether a stream event carries generated tokens, by their ids (``return_token_ids``).

    Not by text: the demo tokenizer decodes some tokens to "" (the demo base's
    first three greedy tokens here), and a text test would time the fourth.
    """
    return any(choice.get("token_ids") for choice in event.get("choices") or ())


async def stream_completion(client: httpx.AsyncClient, model: str, max_tokens: int, prompt: str) -> dict:
    """One streamed completion, as a record of ``loadtests.summary`` (times in seconds)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}  # fmt: skip
    record: dict[str, Any] = {"kind": "targeted", "endpoint": "completions", "stream": True, "model": model, "label": model,
              "start": time.time(), "expected_status": 200, "status": None, "success": False, "error": None,
              "e2el_s": None, "ttft_s": None, "itl_s": [], "prompt_tokens": None, "completion_tokens": None,
              "served_model": None}  # fmt: skip
    start = time.perf_counter()
    first: float | None = None
    last = start
    usage: dict | None = None
    done = False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            record["status"] = response.status_code
            if response.status_code != 200:
                record["error"] = f"status {response.status_code}: {(await response.aread())[:300]!r}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        continue
                    now = time.perf_counter()
                    event = json.loads(data)
                    if "error" in event:
                        record["error"] = f"error event in stream: {event['error']}"
                    usage = event.get("usage") or usage
                    record["served_model"] = event.get("model", record["served_model"])
                    if _carries_tokens(event):
                        if first is None:
                            first = now
                        else:
                            record["itl_s"].append(now - last)
                        last = now
    except httpx.HTTPError as e:
        record["error"] = f"{type(e).__name__}: {e}"
    record["e2el_s"] = time.perf_counter() - start
    if record["error"] is None and done and usage and first is not None:
        record["ttft_s"] = first - start
        record["prompt_tokens"], record["completion_tokens"] = usage["prompt_tokens"], usage["completion_tokens"]
        record["success"] = record["served_model"] == model and record["completion_tokens"] == max_tokens
        if not record["success"]:
            record["error"] = f"answered as {record['served_model']!r} with {record['completion_tokens']} tokens"
    elif record["error"] is None:
        record["error"] = "stream without [DONE], usage or any token"
    return record


# ------------------------------------------------------------------ closed-loop clients
def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k + 1) ** s for k in range(n)]


async def load_run(
    client: httpx.AsyncClient, models: list[str], weights: list[float], args: argparse.Namespace, seed: int
) -> list[dict]:
    """``args.clients`` closed-loop streaming clients for ``args.duration`` seconds; every request's record."""
    deadline = time.perf_counter() + args.duration
    records: list[dict] = []

    async def user(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        n = 0
        while time.perf_counter() < deadline:
            model = rng.choices(models, weights)[0]
            records.append(await stream_completion(client, model, args.max_tokens, f"{seed}.{k}.{n}. {PROMPT}"))
            n += 1

    await asyncio.gather(*(user(k) for k in range(args.clients)))
    return records

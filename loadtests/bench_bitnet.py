"""BitNet b1.58 vs the same weights as a dense bf16 model: decode speed and weight memory.

    python -m loadtests.bench_bitnet [--quick] [--out results/bench_bitnet.json]

Builds (once, cached under ``--cache-dir``) a random BitNet model of
``--layers`` layers of ``--shape`` (default ``2b``: the layer shape of
bitnet-b1.58-2B-4T, hidden 2560, MLP 6912, 20 heads, 5 KV heads, ~66M linear
weights per layer; ``small``: hidden 1024, ~11M) twice from the same ternary weights:

* ``bitnet``: packed uint8 checkpoint (``autobitlinear``), served by our
  ``bitnet`` quant method: int8 ternary weights on vLLM's int8 W8A8 kernel;
* ``dense``: the same weights dequantized to bf16 (T·β), no
  ``quantization_config``, so the same model class runs vLLM's ordinary bf16
  linears: a dense Llama-style model (Llama plus BitNet's two sub-norms).

Each variant runs in its own engine (subprocess, bf16, eager, engine core
in-process), measuring greedy ``ignore_eos`` output-token throughput at batch 1
and batch 32 (prompt 16 tokens, ``--output-len`` tokens, median of
``--repeats``), the linear-layer weight bytes each backend holds (int8 N×K +
fp32 scales vs bf16 N×K; both backends move weights into oneDNN, so this is
counted from shapes), and the process RSS after loading (same KV cache size
for both, so the RSS difference is mostly the weights).

Targets (issue 3): resident linear weights <= 0.5 of bf16; decode >= 1.5x the
dense model at batch 1 and not slower at batch 32. Numbers are wall-clock on a
shared machine: rerun to confirm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ("bitnet", "dense")
BATCHES = (1, 32)
TARGETS = {"weight_bytes": 0.5, "decode_b1": 1.5, "decode_b32": 1.0}  # bitnet / dense
SHAPES = {
    # ~11M linear weights per layer: a small model, where per-call overheads weigh
    "small": dict(
        hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
        head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    # the layer of microsoft/bitnet-b1.58-2B-4T (~66M linear weights): what the targets are about
    "2b": dict(
        hidden_size=2560, intermediate_size=6912, num_attention_heads=20, num_key_value_heads=5,
        head_dim=128, max_position_embeddings=1024, tie_word_embeddings=True,
    ),
}  # fmt: skip
VOCAB = 2048


# ------------------------------------------------------------------ building
def build(cache_dir: Path, layers: int, shape: str) -> dict[str, Path]:
    """The two checkpoints, from one seeded set of masters (cached by shape)."""
    import torch

    from bitnet.packing import absmean_ternarize
    from checkpoints.tiny_bitnet import LINEAR_NAMES, random_masters, save_checkpoint, tiny_config

    root = cache_dir / f"{shape}-layers{layers}"
    paths = {"bitnet": root / "bitnet", "dense": root / "dense"}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    config = tiny_config(VOCAB, num_hidden_layers=layers, **SHAPES[shape])
    masters = random_masters(config, seed=0)
    save_checkpoint(paths["bitnet"], config, masters, "autobitlinear")
    dense = {}
    for name, tensor in masters.items():
        if name.split(".")[-2] in LINEAR_NAMES:
            ternary, beta = absmean_ternarize(tensor.to(torch.bfloat16))
            tensor = ternary.float() * beta  # the ternary model's weights, dense
        dense[name] = tensor
    save_checkpoint(paths["dense"], config, dense, "online")
    # Dense: the same config without quantization_config, so vLLM uses plain bf16 linears.
    cfg_file = paths["dense"] / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["quantization_config"]
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return paths


# ------------------------------------------------------------------ worker side
def linear_weight_bytes(model) -> tuple[int, int]:
    """Bytes of linear weights and of their scales the backend holds, from shapes and storage dtypes.

    The scales are counted as held after loading: vLLM's int8 kernel expands a
    fused layer's per-shard scales to one fp32 per output channel.
    """
    from vllm.model_executor.layers.linear import LinearBase

    from bitnet.quant import BitNetLinearMethod

    weights = scales = 0
    for module in model.modules():
        if not isinstance(module, LinearBase):
            continue
        # torch types a module's registered attributes as Tensor | Module: these are ints and a tensor.
        n, k = cast(int, module.output_size_per_partition), cast(int, module.input_size_per_partition)
        if isinstance(module.quant_method, BitNetLinearMethod):
            weights += n * k  # int8
            scales += cast("torch.Tensor", module.weight_scale).numel() * 4  # fp32
        else:
            weights += n * k * 2  # bf16
    return weights, scales


def run_worker(args: argparse.Namespace) -> None:
    import psutil
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        args.model, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True, max_model_len=512,
        max_num_seqs=max(BATCHES), kv_cache_memory_bytes=256 << 20, enable_prefix_caching=False,
        seed=0, distributed_executor_backend="uni",
    )  # fmt: skip
    startup_s = time.perf_counter() - t0
    weight_bytes, scale_bytes = llm.apply_model(linear_weight_bytes)[0]
    rss = psutil.Process().memory_info().rss
    counter = iter(range(10**9))

    def prompts(n: int) -> list[TokensPrompt]:
        out = []
        for _ in range(n):
            k = next(counter)
            out.append(TokensPrompt(prompt_token_ids=[(k * 7919 + j * 104729) % (VOCAB - 10) + 5 for j in range(16)]))
        return out

    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompts(2), SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
    runs: dict[str, list[float]] = {f"decode_b{b}": [] for b in BATCHES}
    for rep in range(args.repeats):
        for b in BATCHES:
            start = time.perf_counter()
            outs = llm.generate(prompts(b), params, use_tqdm=False)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            runs[f"decode_b{b}"].append(tokens / (time.perf_counter() - start))
            print(f"[{args.variant}] rep {rep} batch {b:2d} {runs[f'decode_b{b}'][-1]:8.1f} tok/s", flush=True)
    result = {
        "variant": args.variant, "startup_s": round(startup_s, 1), "linear_weight_bytes": weight_bytes, "linear_scale_bytes": scale_bytes,
        "rss_bytes": rss, "runs": runs, "loadavg": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------ parent side
def run_variant(variant: str, model: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # model in the worker's process (RSS, apply_model)
    env.pop("VLLM_PLUGINS", None)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [
            sys.executable, __file__, "--worker", "--variant", variant, "--model", str(model),
            "--result", str(result_path), "--repeats", str(args.repeats), "--output-len", str(args.output_len),
        ]  # fmt: skip
        done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in done.stdout.splitlines():
            if line.startswith(f"[{variant}]"):
                print(line)
        if done.returncode != 0:
            raise RuntimeError(f"{variant} worker failed:\n{done.stdout[-4000:]}")
        return json.loads(result_path.read_text())


def summarize(results: dict[str, dict]) -> dict:
    med = {v: {k: statistics.median(x) for k, x in r["runs"].items()} for v, r in results.items()}
    ratios = {
        "weight_bytes": results["bitnet"]["linear_weight_bytes"] / results["dense"]["linear_weight_bytes"],
        **{k: med["bitnet"][k] / med["dense"][k] for k in med["bitnet"]},
    }
    met = {k: (ratios[k] <= t if k == "weight_bytes" else ratios[k] >= t) for k, t in TARGETS.items()}
    return {"median_tok_s": med, "ratios": ratios, "targets": TARGETS, "met": met}


def print_table(results: dict[str, dict], summary: dict) -> None:
    mib = 1 << 20
    print(f"\n{'':22s} {'bitnet':>12s} {'dense bf16':>12s} {'ratio':>8s} {'target':>8s}  met")
    b, d = results["bitnet"], results["dense"]
    print(
        f"{'linear weights (MiB)':22s} {b['linear_weight_bytes'] / mib:12.1f} {d['linear_weight_bytes'] / mib:12.1f}"
        f" {summary['ratios']['weight_bytes']:8.3f} {'<= 0.5':>8s}  {summary['met']['weight_bytes']}"
    )
    with_scales = (b["linear_weight_bytes"] + b["linear_scale_bytes"]) / d["linear_weight_bytes"]
    print(f"{'  + fp32 scales (MiB)':22s} {b['linear_scale_bytes'] / mib:12.2f} {0:12.1f} {with_scales:8.4f}")
    print(
        f"{'process RSS (MiB)':22s} {b['rss_bytes'] / mib:12.1f} {d['rss_bytes'] / mib:12.1f} {b['rss_bytes'] / d['rss_bytes']:8.2f}"
    )
    for k in summary["median_tok_s"]["bitnet"]:
        t = TARGETS[k]
        print(
            f"{k + ' (tok/s)':22s} {summary['median_tok_s']['bitnet'][k]:12.1f} {summary['median_tok_s']['dense'][k]:12.1f}"
            f" {summary['ratios'][k]:8.2f} {'>= ' + str(t):>8s}  {summary['met'][k]}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shape, 2 layers, 1 repeat, 32 output tokens")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--shape", choices=sorted(SHAPES), default="2b", help="layer shape (default: the 2B model's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--cache-dir", default=str(ROOT / ".bench" / "bitnet"))
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.quick:
        args.shape, args.layers, args.repeats, args.output_len = "small", 2, 1, 32
    paths = build(Path(args.cache_dir), args.layers, args.shape)
    results = {v: run_variant(v, paths[v], args) for v in VARIANTS}
    summary = summarize(results)
    print_table(results, summary)
    out = {
        "config": {
            "shape": args.shape,
            "layers": args.layers,
            "repeats": args.repeats,
            "output_len": args.output_len,
            **SHAPES[args.shape],
        },  # fmt: skip
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
        **summary,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

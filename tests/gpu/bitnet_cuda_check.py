"""BitNet's ternary linear path on CUDA against transformers, without vLLM.

The one prepared script for a task lent a GPU machine (see the README's BitNet
section). That machine has torch, transformers and PEFT but not vLLM: the GPU
wheel (336 MB) is far over what a call can carry and the machine has no
network. So it checks everything of ours that runs on CUDA without vLLM:

1. ``pack_ternary``/``unpack_ternary`` bit-exact with transformers' own
   functions, on the GPU;
2. ``IntMMKernel`` (``torch._int_mm`` with cuBLAS's row padding) on fused
   q/k/v and gate/up shards of both scale conventions against transformers'
   ``BitLinear``/``AutoBitLinear`` on the GPU, at several batch sizes;
3. a tiny BitNet checkpoint of each layout, built here by ``tiny.py``: the
   transformers model with every ternary linear swapped for our kernel (the
   weights read from the checkpoint files as ``BitNetLinearMethod`` reads them)
   gives the reference's greedy tokens and teacher-forced log-probabilities
   (``tests/e2e/bitnet_reference.py``'s rules), also with a PEFT LoRA on top;
4. timings at the 2B model's shapes: our kernel against a bf16 ``F.linear``.

Runs on the CPU too (``--device cpu``), which is how CI-less machines try it
before spending device time. Writes a JSON report; exits 1 if a check fails.

    python -m tests.gpu.bitnet_cuda_check --out report.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

from bitnet.kernels import IntMMKernel
from bitnet.packing import absmean_ternarize, pack_ternary, unpack_ternary
from checkpoints.tiny_bitnet import LAYOUTS, LINEAR_NAMES, random_lora, random_masters, save_checkpoint, tiny_config
from tests.e2e.bitnet_reference import MIN_EXACT_TOKENS, check, compare

LINEAR_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to max|reference|, as test_quant.py
BATCHES = (1, 7, 32, 100)
VOCAB = 512


class TernaryLinear(torch.nn.Module):
    """A loaded ``BitNetLinearMethod`` layer without vLLM: int8 ternary weight, one β per shard."""

    def __init__(self, ternary: torch.Tensor, betas: list[torch.Tensor], widths: list[int]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(ternary, requires_grad=False)  # int8 [N, K]
        self.weight_scale = torch.nn.Parameter(torch.stack([b.float().reshape(()) for b in betas]), requires_grad=False)
        self.logical_widths = widths
        self.kernel = IntMMKernel()
        self.kernel.process(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.apply(self, x, None)


def shard_from_checkpoint(
    weight: torch.Tensor, scale: torch.Tensor | None, layout: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 ternary [N, K], β) from one linear's checkpoint tensors, per ``BitNetQuantConfig``'s table."""
    if LAYOUTS[layout]["quantization_mode"] == "online":
        return absmean_ternarize(weight)
    scale = scale.float().reshape(())
    beta = 1.0 / scale if LAYOUTS[layout]["linear_class"] == "bitlinear" else scale
    return unpack_ternary(weight, rows=weight.shape[0] * 4), beta


def check_packing(device: str) -> dict:
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    g = torch.Generator().manual_seed(0)
    ternary = torch.randint(-1, 2, (6912, 2560), generator=g).to(torch.int8).to(device)
    packed = pack_ternary(ternary)
    ok = torch.equal(packed, pack_weights(ternary.clone())) and torch.equal(
        unpack_ternary(packed), unpack_weights(packed, dtype=torch.int8)
    )
    return {"ok": bool(ok), "shape": [6912, 2560]}


def _reference_layer(w: torch.Tensor, linear_class: str, device: str) -> torch.nn.Module:
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear

    ternary, beta = absmean_ternarize(w)
    rows, k = w.shape
    if linear_class == "bitlinear":
        layer = BitLinear(k, rows, bias=False, dtype=torch.float32)
        layer.load_state_dict({"weight": pack_ternary(ternary), "weight_scale": (1 / beta).reshape(1)})
    else:
        layer = AutoBitLinear(k, rows, bias=False, dtype=torch.float32)
        layer.load_state_dict({"weight": pack_ternary(ternary), "weight_scale": beta.reshape(1)})
    return layer.to(device).eval()


def check_fused_linears(device: str) -> dict:
    """Fused shards (different β each) through our kernel against the concatenated transformers layers."""
    k, cases = 256, {"qkv": [256, 128, 128], "gate_up": [512, 512]}
    results = {}
    for linear_class in ("bitlinear", "autobitlinear"):
        for fused, widths in cases.items():
            g = torch.Generator().manual_seed(len(results))
            masters = [torch.randn(n, k, generator=g) * 0.02 * (1 + i) for i, n in enumerate(widths)]
            shards = [absmean_ternarize(w) for w in masters]
            ours = TernaryLinear(
                torch.cat([t for t, _ in shards]).to(device), [b.to(device) for _, b in shards], widths
            )
            references = [_reference_layer(w, linear_class, device) for w in masters]
            for dtype in (torch.float32, torch.bfloat16):
                worst = 0.0
                for m in BATCHES:
                    x = (torch.randn(m, k, generator=g) * 3).to(device)
                    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
                        expected = torch.cat([r(x.float()) for r in references], dim=-1)
                        got = ours(x.to(dtype)).float()
                    worst = max(worst, ((got - expected).abs().max() / expected.abs().max()).item())
                results[f"{linear_class}/{fused}/{str(dtype).removeprefix('torch.')}"] = {
                    "max_rel_error": worst,
                    "tolerance": LINEAR_TOLERANCE[dtype],
                    "ok": worst <= LINEAR_TOLERANCE[dtype],
                }
    return results


def swap_linears(model: torch.nn.Module, checkpoint: Path, layout: str, device: str) -> int:
    """Replace every ternary linear's forward (under PEFT too) with our kernel on the checkpoint's tensors."""
    tensors = load_file(str(checkpoint / "model.safetensors"))
    swapped = 0
    for name, module in model.named_modules():
        name = name.removesuffix(".base_layer")  # under PEFT the ternary layer is the wrapper's base_layer
        if name.split(".")[-1] not in LINEAR_NAMES or hasattr(module, "base_layer"):
            continue
        key = name[name.index("layers.") :]  # model.layers.N.…, base_model.model.model.layers.N.…
        weight = tensors[f"model.{key}.weight"]
        ternary, beta = shard_from_checkpoint(weight, tensors.get(f"model.{key}.weight_scale"), layout)
        ours = TernaryLinear(ternary.to(device), [beta.to(device)], [ternary.shape[0]])
        module.forward = ours.forward
        module.ours = ours
        swapped += 1
    return swapped


def check_tiny_models(device: str, root: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = tiny_config(VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng():
        masters = random_masters(config, seed=0)
    checkpoints = {layout: save_checkpoint(root / layout, config, masters, layout) for layout in LAYOUTS}
    adapter = random_lora(checkpoints["autobitlinear"], root / "lora", seed=3)
    prompts = [[1, 17, 99, 240, 5], [1, 300, 301, 302, 303, 304, 305, 306]]
    results = {}
    for layout, path in checkpoints.items():
        for with_lora in (False, True):
            if with_lora and layout == "bitlinear":
                continue  # PEFT cannot wrap transformers' packed BitLinear

            def load() -> torch.nn.Module:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                if with_lora:
                    model = PeftModel.from_pretrained(model, adapter)
                return model.to(device).eval()

            reference, ours = load(), load()
            swapped = swap_linears(ours, path, layout, device)
            reference_on_device = _OnDevice(reference, device)
            for i, prompt in enumerate(prompts):
                tokens, _ = _greedy(ours, prompt, device, MIN_EXACT_TOKENS + 8)
                served = _chosen_logprobs(ours, prompt, tokens, device)
                comparison = compare(reference_on_device, prompt, tokens, served)
                key = f"{layout}{'+lora' if with_lora else ''}/prompt{i}"
                try:
                    check(comparison, tokens, key)
                    ok, error = True, None
                except AssertionError as e:
                    ok, error = False, str(e)
                results[key] = {
                    "ok": ok,
                    "error": error,
                    "swapped_linears": swapped,
                    "max_logprob_deviation": comparison.deviation,
                    "tokens_that_must_match": comparison.must_match,
                    "tokens": tokens,
                }
    return results


class _OnDevice(torch.nn.Module):
    """Lets ``bitnet_reference`` (which builds CPU tensors) call a model that lives on ``device``."""

    def __init__(self, model: torch.nn.Module, device: str) -> None:
        super().__init__()
        self.model, self.device = model, device

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids.to(self.device))
        out.logits = out.logits.float().cpu()
        return out


@torch.no_grad()
def _greedy(model, prompt: list[int], device: str, n: int) -> tuple[list[int], None]:
    ids = list(prompt)
    with torch._dynamo.config.patch(disable=True):
        for _ in range(n):
            ids.append(model(torch.tensor([ids], device=device)).logits[0, -1].argmax().item())
    return ids[len(prompt) :], None


@torch.no_grad()
def _chosen_logprobs(model, prompt: list[int], tokens: list[int], device: str) -> list[float]:
    ids = prompt + tokens
    with torch._dynamo.config.patch(disable=True):
        logits = model(torch.tensor([ids], device=device)).logits[0, :-1].float()
    chosen = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:], device=device)[:, None]).flatten()
    return chosen[len(prompt) - 1 :].cpu().tolist()


def time_2b_shapes(device: str) -> dict:
    """Per-layer time of our kernel and a bf16 ``F.linear`` at bitnet-b1.58-2B-4T's shapes."""
    shapes = {"qkv": (3840, 2560), "o": (2560, 2560), "gate_up": (13824, 2560), "down": (2560, 6912)}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k) * 0.02
        ternary, beta = absmean_ternarize(w)
        ours = TernaryLinear(ternary.to(device), [beta.to(device)], [n])
        dense = w.to(device, torch.bfloat16)
        for m in (1, 32):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            timings = {}
            for label, fn in (
                ("ternary_int_mm", lambda: ours(x)),
                ("bf16", lambda: torch.nn.functional.linear(x, dense)),
            ):
                for _ in range(5):
                    fn()
                sync()
                reps = 200 if device == "cuda" else 10
                start = time.perf_counter()
                for _ in range(reps):
                    fn()
                sync()
                timings[label] = (time.perf_counter() - start) / reps * 1e6
            out[f"{name}/m{m}"] = {
                "ternary_int_mm_us": round(timings["ternary_int_mm"], 2),
                "bf16_us": round(timings["bf16"], 2),
                "speedup": round(timings["bf16"] / timings["ternary_int_mm"], 3),
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bitnet_cuda_check.json"))
    args = parser.parse_args()
    report: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    import transformers

    report["transformers"] = transformers.__version__
    checks = {"packing": check_packing, "fused_linears": check_fused_linears, "timing_2b_shapes": time_2b_shapes}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        checks["tiny_models"] = lambda device: check_tiny_models(device, Path(tmp))
        for name, fn in checks.items():
            started = time.perf_counter()
            try:
                report[name] = fn(args.device)
            except Exception:
                report[name] = {"ok": False, "error": traceback.format_exc()}
            report[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
            print(name, json.dumps(report[name], indent=1)[:3000], flush=True)
    for name in ("packing", "fused_linears", "tiny_models"):
        result = report[name]
        cases = [result] if "ok" in result else list(result.values())
        failed += [name for case in cases if not case["ok"]]
    report["ok"] = not failed
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("ALL OK" if not failed else f"FAILED: {sorted(set(failed))}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

"""Validation of adapter files against the served base model, before anything is registered.

vLLM checks some of this only when it loads an adapter into a slot, mid-request
(rank above ``max_lora_rank`` fails late); other mistakes it never catches
(an adapter trained for another base with matching shapes, weights that are
pickles able to run code), and some it refuses only by raising inside the
engine's step, which stops the engine for every tenant. Here every rule runs
up front, on untrusted files: a failure is an :class:`InvalidAdapter` with a
reason code, the offending key or file, the value, the limit and the fix, never
another exception. The config rules live in :mod:`adapter_store.lora_config`;
the tensors must be 2-D float16/bfloat16/float32 of exactly the shape the base
layer and the rank the engine will use for that module (``rank_pattern``
resolved as PEFT and vLLM resolve it) need, named as vLLM's loader parses
names. A ``loader_check`` (the engine's own rules, from serving) runs last.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from adapter_store.digest import content_digest, directory_size
from adapter_store.errors import InvalidAdapter
from adapter_store.lora_config import CONFIG_FILE, LoraSettings, check_features, check_lora_fields, read_config
from adapter_store.models import AdapterMetadata, AdapterVersion
from adapter_store.refs import check_name
from adapter_store.registry import AdapterRegistry

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})
ALLOWED_SUFFIXES = frozenset({".json", ".safetensors", ".md", ".txt"})

# Linear layers a LoRA may target, per model family: (in features, out features) from the base config.
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
LLAMA_STYLE_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "bitnet"})

# base_model.model.<module path>.lora_A.weight: PEFT's saved layout, as vLLM parses it (a ".default"
# before ".weight" makes vLLM's loader raise, so it is refused here).
_TENSOR_KEY = re.compile(r"base_model\.model\.(?P<module>[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)\.lora_(?P<ab>[AB])\.weight")
# A layer index of at most 9 digits, without leading zeros: int() of it is cheap and cannot fail.
_LAYER = re.compile(r"(?:^|\.)layers\.(?P<index>0|[1-9][0-9]{0,8})\.")
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32"})
MAX_HEADER_BYTES = 8 << 20
"""A safetensors header longer than this is refused before it is parsed (an adapter's is a few hundred kB at most)."""
LoaderCheck = Callable[[dict], None]


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the served base model's names and layer shapes."""

    names: frozenset[str]
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int

    @classmethod
    def from_config(cls, config_path: Path, names: Iterable[str]) -> BaseModelSpec:
        """Read a Hugging Face ``config.json``; ``names`` are the served name and compatible bases."""
        config = json.loads(config_path.read_text())
        model_type = config.get("model_type")
        if model_type not in LLAMA_STYLE_TYPES:
            raise ValueError(
                f"{config_path}: model_type {model_type!r} is not one the adapter store knows the LoRA layers of; "
                f"supported: {', '.join(sorted(LLAMA_STYLE_TYPES))}"
            )
        heads = config["num_attention_heads"]
        return cls(
            names=frozenset(names),
            model_type=model_type,
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            num_hidden_layers=config["num_hidden_layers"],
        )

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """Module name → (in features, out features) of the base model's LoRA-able linears."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        hidden, inter = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (hidden, q_out),
            "k_proj": (hidden, kv_out),
            "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }


class AdapterValidator:
    """Checks an adapter directory against one base model and the engine's limits."""

    def __init__(
        self,
        base: BaseModelSpec,
        *,
        max_lora_rank: int,
        max_adapter_bytes: int | None = None,
        loader_check: LoaderCheck | None = None,
    ) -> None:
        """``loader_check`` gets the parsed config after every rule here passed; it raises ``InvalidAdapter``."""
        self.base = base
        self.max_lora_rank = max_lora_rank
        self.max_adapter_bytes = max_adapter_bytes
        self.loader_check = loader_check

    def validate(self, directory: Path) -> AdapterMetadata:
        """Metadata of a valid adapter; :class:`InvalidAdapter` naming the first failure otherwise."""
        self._check_files(directory)
        config = read_config(directory / CONFIG_FILE)
        settings = self._check_config(config)
        targets = self._check_weights(directory / WEIGHTS_FILE, settings)
        if self.loader_check is not None:
            self.loader_check(config)
        return AdapterMetadata(
            base_model=config["base_model_name_or_path"],
            rank=settings.rank,
            alpha=settings.alpha,
            target_modules=tuple(sorted(targets)),
            size_bytes=directory_size(directory),
        )

    # -- files --------------------------------------------------------------------------

    def _check_files(self, directory: Path) -> None:
        if not directory.is_dir():
            raise InvalidAdapter(f"{directory} is not a directory of adapter files", reason="not_a_directory")
        for path in _entries(directory):
            rel = path.relative_to(directory).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise InvalidAdapter(
                    f"{rel} is a symbolic link; adapters must be plain files (copy the target in)",
                    reason="symlink",
                    param=rel,
                )
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise InvalidAdapter(
                    f"{rel} is not a regular file (a FIFO, socket or device); adapters hold plain files",
                    reason="unexpected_file",
                    param=rel,
                )
            suffix = path.suffix.lower()
            if suffix in PICKLE_SUFFIXES:
                raise InvalidAdapter(
                    f"{rel} is a pickle-based weights file; pickle can run code when loaded, so only safetensors "
                    f"are accepted. Save the adapter with PEFT's save_pretrained(safe_serialization=True) "
                    f"and ship {WEIGHTS_FILE} without {rel}",
                    reason="pickle_weights",
                    param=rel,
                )
            if suffix not in ALLOWED_SUFFIXES:
                raise InvalidAdapter(
                    f"{rel} is not an adapter file; allowed suffixes are {', '.join(sorted(ALLOWED_SUFFIXES))}. "
                    "Remove it from the adapter directory",
                    reason="unexpected_file",
                    param=rel,
                )
        for required, reason in ((CONFIG_FILE, "missing_config"), (WEIGHTS_FILE, "missing_weights")):
            if not (directory / required).is_file():
                raise InvalidAdapter(
                    f"{required} is missing from {directory.name}; a PEFT LoRA adapter directory holds "
                    f"{CONFIG_FILE} and {WEIGHTS_FILE} (PEFT's save_pretrained writes both)",
                    reason=reason,
                    param=required,
                )
        if self.max_adapter_bytes is not None:
            size = directory_size(directory)
            if size > self.max_adapter_bytes:
                raise InvalidAdapter(
                    f"adapter files take {size} bytes, more than the limit of {self.max_adapter_bytes} bytes "
                    "(store.max_adapter_bytes); lower the rank or raise the limit",
                    reason="too_large",
                )

    # -- adapter_config.json ------------------------------------------------------------

    def _check_config(self, config: dict) -> LoraSettings:
        """Every field the engine reads, typed and within the served model's limits."""
        check_features(config)
        settings = check_lora_fields(config)
        ranks = [settings.rank, *settings.rank_pattern.values()]
        if max(ranks) > self.max_lora_rank:
            raise InvalidAdapter(
                f"rank {max(ranks)} is greater than max_lora_rank {self.max_lora_rank}; retrain with "
                f"r <= {self.max_lora_rank} or raise engine.max_lora_rank",
                reason="rank_too_large",
                param="r",
            )
        declared = config.get("base_model_name_or_path")
        if not isinstance(declared, str) or declared not in self.base.names:
            shown = repr(declared)[:200] if isinstance(declared, str | None) else "(not a string)"
            raise InvalidAdapter(
                f"adapter was trained for base model {shown}, but this server serves "
                f"{' / '.join(sorted(self.base.names))}; use an adapter trained for it, or list {shown} "
                "in store.compatible_bases if the weights are the same",
                reason="wrong_base_model",
                param="base_model_name_or_path",
            )
        if isinstance(settings.target_modules, tuple):
            unknown = sorted(set(settings.target_modules) - set(self.base.module_shapes()))
            if unknown:
                raise self._unknown_modules(unknown, "target_modules")
        return settings

    def _unknown_modules(self, unknown: list[str], param: str) -> InvalidAdapter:
        return InvalidAdapter(
            f"target module(s) {', '.join(unknown)} are not LoRA-able layers of the {self.base.model_type} base "
            f"model; supported: {', '.join(self.base.module_shapes())}",
            reason="unknown_target_module",
            param=param,
        )

    # -- adapter_model.safetensors --------------------------------------------------------

    def _check_weights(self, path: Path, settings: LoraSettings) -> set[str]:
        """Parse the safetensors header (sizes included) and check every tensor's name, dtype and shape."""
        tensors = self._read_header(path)
        expected = self.base.module_shapes()
        pairs: dict[str, set[str]] = {}
        for key, (shape, dtype) in sorted(tensors.items()):
            match = _TENSOR_KEY.fullmatch(key)
            if match is None:
                raise InvalidAdapter(
                    f"tensor {key[:200]!r} is not a LoRA weight (expected base_model.model.<module>.lora_A/B.weight); "
                    "modules_to_save and embedding adapters are not served",
                    reason="unexpected_tensor",
                    param=key[:200],
                )
            module_path, ab = match["module"], match["ab"]
            module = module_path.rsplit(".", 1)[-1]
            if module not in expected:
                raise self._unknown_modules([module], key)
            layer = _LAYER.search(module_path)
            if layer is None or int(layer["index"]) >= self.base.num_hidden_layers:
                raise InvalidAdapter(
                    f"tensor {key[:200]!r} names no layer of the base model, which has "
                    f"{self.base.num_hidden_layers} layers; the adapter was trained for another model",
                    reason="wrong_shape",
                    param=key[:200],
                )
            if dtype not in FLOAT_DTYPES:
                raise InvalidAdapter(
                    f"tensor {key!r} has dtype {dtype}; LoRA weights must be float16, bfloat16 or float32",
                    reason="wrong_dtype",
                    param=key,
                )
            self._check_shape(key, shape, ab, module, expected[module], settings.rank_of(module_path))
            pairs.setdefault(module_path, set()).add(ab)
        for module_path, found in pairs.items():
            if found != {"A", "B"}:
                raise InvalidAdapter(
                    f"{module_path} has lora_{''.join(found)} but not lora_{({'A', 'B'} - found).pop()}; "
                    "the weights file is incomplete",
                    reason="incomplete_weights",
                    param=module_path,
                )
        if not pairs:
            raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA tensors", reason="incomplete_weights")
        return {p.rsplit(".", 1)[-1] for p in pairs}

    def _check_shape(
        self, key: str, shape: tuple[int, ...], ab: str, module: str, in_out: tuple[int, int], rank: int
    ) -> None:
        """``rank`` is the one the engine will use for this module (``rank_pattern`` applied)."""
        fan_in, fan_out = in_out
        want = (rank, fan_in) if ab == "A" else (fan_out, rank)
        if shape != want:
            layout = f"[r={rank}, {fan_in}]" if ab == "A" else f"[{fan_out}, r={rank}]"
            raise InvalidAdapter(
                f"tensor {key!r} has shape {list(shape)}, but {module} of the base model needs lora_{ab} of shape "
                f"{layout} (hidden_size {self.base.hidden_size}, intermediate_size {self.base.intermediate_size}, "
                f"head_dim {self.base.head_dim}, and the rank r or rank_pattern gives this module); the adapter was "
                "trained for a differently shaped model, or its config does not match its weights",
                reason="wrong_shape",
                param=key,
            )

    @staticmethod
    def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
        """Tensor name -> (shape, dtype), from a safetensors file whose header is sane."""
        from safetensors import SafetensorError, safe_open

        try:
            with path.open("rb") as f:
                header = int.from_bytes(f.read(8), "little")
            if header > MAX_HEADER_BYTES:
                raise ValueError(f"header of {header} bytes, more than {MAX_HEADER_BYTES}")
            # safe_open checks the header length and that the data section is exactly as long as
            # the header says: a truncated or padded file fails here, before any tensor is read.
            with safe_open(str(path), framework="numpy") as f:
                slices = {key: f.get_slice(key) for key in f.keys()}
                return {key: (tuple(s.get_shape()), s.get_dtype()) for key, s in slices.items()}
        except (SafetensorError, OSError, ValueError, OverflowError) as e:
            raise InvalidAdapter(
                f"{path.name} is not a valid safetensors file ({e}); it may be truncated or corrupt. "
                "Copy or upload it again",
                reason="corrupt_weights",
                param=path.name,
            ) from e


def _entries(directory: Path) -> list[Path]:
    """Everything under ``directory``, links not followed, sorted."""
    found = []
    for parent, dirs, files in os.walk(directory):
        found += [Path(parent, name) for name in dirs + files]
    return sorted(found)


def register_directory(
    registry: AdapterRegistry,
    validator: AdapterValidator,
    name: str,
    directory: Path,
    *,
    source: str,
    tags: dict[str, str] | None = None,
    aliases: tuple[str, ...] = (),
) -> tuple[AdapterVersion, bool]:
    """Validate, then register: an invalid adapter never reaches the registry.

    ``directory`` must be a private copy (a staging or cache directory the
    store owns), so the files hashed are the files validated.
    """
    check_name(name)
    metadata = validator.validate(directory)
    digest = content_digest(directory)
    return registry.register(name, digest, metadata, source=source, tags=tags, aliases=aliases)


__all__ = ["AdapterValidator", "BaseModelSpec", "LoaderCheck", "register_directory"]

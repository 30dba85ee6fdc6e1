"""The rules for ``adapter_config.json``: what the engine's loader accepts, checked before it sees the file.

vLLM reads the config when it loads an adapter into a slot, inside the engine's
step; an exception there (a field of the wrong type, a feature it refuses, a
pattern it cannot compile) stops the engine for every tenant, not just the
request that named the adapter. So every field vLLM or PEFT reads is checked
here, for its type as well as its value, and anything the loader would refuse
(or would misread) is an :class:`InvalidAdapter` with a reason code and the
offending key. The rules mirror vLLM's ``PEFTHelper`` (``validate_legal`` and
``get_rank_and_scaling``); ``serving/adapter_rules.py`` also runs vLLM's own
code on the parsed config, so a rule added upstream is caught even before it is
mirrored here.

The file is untrusted: its size is capped before parsing, numbers must be
finite (JSON's ``1e400`` reads as infinity), and pattern keys are restricted to
module-name characters, so the engine's regex matching on them is well formed
and cheap.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from adapter_store.errors import InvalidAdapter

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 64 << 10
MAX_PATTERN_KEYS = 256
PATTERN_KEY = re.compile(r"[A-Za-z0-9_.]{1,256}")
"""rank_pattern / alpha_pattern keys: module-name characters only ('.' included, as vLLM's regex reads it)."""
SAFE_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
"""String values of init_lora_weights vLLM accepts: inits that only set the starting weights."""
# Features the engine does not implement: each must be absent, null, false or empty.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters are not supported by the engine. Train a plain LoRA",
    "lora_bias": "LoRA bias (lora_bias) is not supported by the engine. Train without it",
    "use_qalora": "QALoRA adapters are not supported by the engine. Train a plain LoRA",
    "modules_to_save": "fully trained modules (such as lm_head or embed_tokens) are not served; train a LoRA-only "
    "adapter (modules_to_save null)",
    "layer_replication": "layer_replication changes the base model's layers, which the engine does not support",
    "alora_invocation_tokens": "Activated LoRA (aLoRA) is not supported by the engine",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) is not supported by the engine",
}


@dataclass(frozen=True)
class LoraSettings:
    """The checked fields of one adapter's config."""

    rank: int
    alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    target_modules: str | tuple[str, ...]  # a str is a regex PEFT matched module names with

    def rank_of(self, module: str) -> int:
        """The rank PEFT and vLLM use for ``module`` (its name without ``base_model.model.``).

        Same rule as PEFT's ``get_pattern_key`` and vLLM's ``get_rank_and_scaling``:
        a key matches if it is a suffix of the name starting at a '.' boundary
        (read as a regex, so '.' in a key matches any character); the first match wins.
        """
        for key, rank in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return rank
        return self.rank


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _invalid(param: str, problem: str, fix: str, reason: str = "invalid_config") -> InvalidAdapter:
    return InvalidAdapter(f"{param} {problem}; {fix}", reason=reason, param=param)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value


def read_config(path: Path) -> dict:
    """The parsed config; ``InvalidAdapter`` if it is too large, not JSON, or holds non-finite numbers."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise InvalidAdapter(
                f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes; PEFT writes a few hundred bytes. "
                "Write it with PEFT's save_pretrained",
                reason="invalid_config",
                param=CONFIG_FILE,
            )
        # ValueError: 1e400 or NaN (refused above), or an integer of more than 4300 digits.
        config = json.loads(raw.decode(), parse_constant=_reject_constant, parse_float=_finite_float)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidAdapter(
            f"{CONFIG_FILE} is not valid JSON with finite numbers ({_show(str(e))}); write it with PEFT's "
            "save_pretrained",
            reason="invalid_config",
            param=CONFIG_FILE,
        ) from e
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object", reason="invalid_config", param=CONFIG_FILE)
    return config


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    """A finite float, or an integer a float holds exactly (``math.isfinite`` of a huge int overflows)."""
    if _is_int(value):
        return abs(value) <= 1 << 53
    return isinstance(value, float) and math.isfinite(value)


def _pattern(config: dict, param: str, valid: str, check: Callable[[object], bool]) -> dict:
    pattern = config.get(param)
    if pattern is None:
        return {}
    if not isinstance(pattern, dict) or len(pattern) > MAX_PATTERN_KEYS:
        raise _invalid(
            param,
            f"must be an object of at most {MAX_PATTERN_KEYS} entries, got {_show(pattern)}",
            "map module names to values, as PEFT writes it",
        )
    for key, value in pattern.items():
        if not PATTERN_KEY.fullmatch(key):
            raise _invalid(
                param,
                f"has the key {_show(key)}, which is not a module name",
                "use module names of letters, digits, '_' and '.' (e.g. model.layers.0.self_attn.q_proj)",
            )
        if not check(value):
            raise _invalid(param, f"maps {key!r} to {_show(value)}", f"give a {valid}")
    return dict(pattern)


def check_features(config: dict) -> None:
    """``InvalidAdapter`` for any PEFT feature the engine refuses or does not implement."""
    if config.get("peft_type") != "LORA":
        raise InvalidAdapter(
            f"peft_type is {_show(config.get('peft_type'))}; only PEFT LoRA adapters (peft_type 'LORA') are served",
            reason="not_lora",
            param="peft_type",
        )
    for param, why in _UNSUPPORTED.items():
        value = config.get(param)
        if not (value is None or value is False or value == [] or value == {}):
            raise InvalidAdapter(f"{param} is {_show(value)}: {why}", reason="unsupported", param=param)
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(
            f"bias is {_show(config.get('bias'))}: the engine serves no bias terms; train with bias 'none'",
            reason="unsupported",
            param="bias",
        )
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or (isinstance(init, str) and init.lower() in SAFE_INITS)):
        raise InvalidAdapter(
            f"init_lora_weights is {_show(init)}: inits such as PiSSA, OLoRA, CorDA and LoftQ change the base "
            "model's weights, which the engine does not. Convert the adapter to a plain LoRA with PEFT's "
            "path_initial_model_for_weight_conversion",
            reason="unsupported",
            param="init_lora_weights",
        )
    if not isinstance(config.get("use_rslora", False), bool):
        raise _invalid("use_rslora", f"is {_show(config.get('use_rslora'))}", "give true or false")


def check_lora_fields(config: dict) -> LoraSettings:
    """Types and values of the fields that set ranks, scalings and targets."""
    rank = config.get("r")
    if not _is_int(rank) or rank <= 0:
        raise InvalidAdapter(f"r must be a positive integer, got {_show(rank)}", reason="invalid_config", param="r")
    alpha = config.get("lora_alpha")
    if not _is_number(alpha):
        raise _invalid(
            "lora_alpha",
            f"must be a finite number, got {_show(alpha)}",
            "set it as PEFT's LoraConfig does (e.g. 2 * r)",
        )
    rank_pattern = _pattern(config, "rank_pattern", "positive integer rank", lambda v: _is_int(v) and v > 0)
    alpha_pattern = _pattern(config, "alpha_pattern", "finite number", _is_number)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if not 0 < len(targets) <= 1024:
            raise _invalid(
                "target_modules",
                "must be a non-empty name or pattern of at most 1024 characters",
                "list the module names",
            )
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise _invalid(
            "target_modules",
            f"must be a module name or a non-empty list of them, got {_show(targets)}",
            'list the modules the adapter trains, e.g. ["q_proj", "v_proj"]',
        )
    return LoraSettings(
        rank,
        float(alpha),
        rank_pattern,
        {k: float(v) for k, v in alpha_pattern.items()},
        config.get("use_rslora", False),
        targets if isinstance(targets, str) else tuple(targets),
    )

"""vLLM's own rules for adapter configs, run at registration instead of inside the engine.

vLLM's worker reads ``adapter_config.json`` with ``PEFTHelper`` when it loads
an adapter into a slot; whatever that raises is raised inside the engine-core
step, which stops the engine for every tenant. The store's validator mirrors
those rules (``adapter_store/lora_config.py``), but a mirror can fall behind the
vLLM it runs with, so :func:`engine_lora_check` runs vLLM's code itself on each
parsed config, as a validator ``loader_check``::

    AdapterValidator(base, max_lora_rank=rank, loader_check=engine_lora_check(rank))

Anything vLLM refuses, or raises on, becomes ``InvalidAdapter(reason="unsupported_by_engine")``.
The adapter store itself never imports vLLM; this module is where serving hands it the rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from adapter_store import InvalidAdapter

if TYPE_CHECKING:
    from vllm.config.lora import MaxLoRARanks

CONFIG_FILE = "adapter_config.json"
# What vLLM's PEFTHelper raises on malformed values: bad types and numbers, missing fields, bad patterns.
_REFUSALS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    OverflowError,
    ZeroDivisionError,
    RecursionError,
    re.error,
)


def vllm_lora_rank(rank: int) -> MaxLoRARanks:
    """``engine.max_lora_rank`` as vLLM types it (a ``Literal`` of the ranks its kernels support).

    Not checked here: vLLM's own config validation refuses any other value
    when the engine (or :func:`engine_lora_check`) builds its ``LoRAConfig``.
    """
    return cast("MaxLoRARanks", rank)


def engine_lora_check(max_lora_rank: int) -> Callable[[dict], None]:
    """A validator ``loader_check``: ``PEFTHelper.from_dict`` + ``validate_legal`` for the served rank,
    every pattern compiled as vLLM compiles it, and each rank and scaling vLLM would use, which must be finite."""
    import regex
    import vllm
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    lora_config = LoRAConfig(max_lora_rank=vllm_lora_rank(max_lora_rank))
    refusals = (*_REFUSALS, regex.error)

    def check(config: dict) -> None:
        step = "parse"
        try:
            helper = PEFTHelper.from_dict(dict(config))
            step = "legal"
            helper.validate_legal(lora_config)
            step = "patterns"
            for param, pattern in (("rank_pattern", helper.rank_pattern), ("alpha_pattern", helper.alpha_pattern)):
                for key in pattern:
                    step = param
                    regex.compile(rf"(.*\.)?({key})$")  # the pattern vLLM matches module names with
            step = "lora_alpha"
            if not math.isfinite(helper.vllm_lora_scaling_factor):
                raise ValueError(f"the scaling lora_alpha / r is {helper.vllm_lora_scaling_factor}, not finite")
            step = "alpha_pattern"
            targets = helper.target_modules if isinstance(helper.target_modules, list) else []
            for module in [*targets, *helper.rank_pattern, *helper.alpha_pattern]:
                rank, scaling = helper.get_rank_and_scaling(module)
                if not math.isfinite(scaling):
                    raise ValueError(f"the scaling of {module} (its lora_alpha / r) is {scaling}, not finite")
        except refusals as e:
            message = str(e)[:500]
            raise InvalidAdapter(
                f"the engine's LoRA loader (vLLM {vllm.__version__}) refuses this adapter: {message} "
                f"({type(e).__name__}). Fix the {CONFIG_FILE} field it names (or save the adapter as a plain "
                "LoRA with PEFT) and register it again",
                reason="unsupported_by_engine",
                param=_param(step, message, config),
            ) from e

    return check


# validate_legal's messages name features, not fields: fragment -> field.
_LEGAL_FIELDS = {
    "modules_to_save": "modules_to_save",
    "DoRA": "use_dora",
    "LoRA bias": "lora_bias",
    "init_lora_weights": "init_lora_weights",
    "aLoRA": "alora_invocation_tokens",
    "layer_replication": "layer_replication",
    "BD-LoRA": "use_bdlora",
    "QALoRA": "use_qalora",
    "max_lora_rank": "r",
    "Adapter bias": "bias",
}


def _param(step: str, message: str, config: dict) -> str:
    """The config field a refusal is about: known from the step, or named in vLLM's message."""
    if step == "legal":
        return next((field for fragment, field in _LEGAL_FIELDS.items() if fragment in message), CONFIG_FILE)
    if step != "parse":
        return step
    return _field_named(message, config)


def _field_named(message: str, config: dict) -> str:
    """The config field an error message names (the longest that appears as a word), else the file."""
    fields = sorted((k for k in config if isinstance(k, str) and k), key=len, reverse=True)
    for field in [*fields, "target_modules", "lora_alpha"]:
        if re.search(rf"(?<![A-Za-z0-9_]){re.escape(field)}(?![A-Za-z0-9_])", message):
            return field
    return CONFIG_FILE

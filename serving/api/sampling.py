"""vLLM's ``SamplingParams`` from a request, and the prompt token ids a client may send.

Whatever vLLM would refuse must be the client's 400 naming the field, never a
500 or an engine error. Static ranges live in the request models
(:mod:`serving.api.protocol`); the rules that depend on the computed output
budget or the model's vocabulary are checked here. vLLM's own verification
still runs when the parameters are built: anything it refuses that is not
mirrored here (a newer vLLM's rule) is a 400 too, with vLLM's message and field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from serving.api.errors import InvalidRequestError
from serving.api.protocol import SamplingRequest

if TYPE_CHECKING:
    from vllm import SamplingParams

GREEDY_TEMPERATURE = 1e-5  # vLLM samples greedily below this temperature, and then allows only n=1


def sampling_params(request: SamplingRequest, max_tokens: int, logprobs: int | None, stream: bool) -> SamplingParams:
    """The engine's parameters for ``request`` with its output budget ``max_tokens``."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    if request.n > 1 and request.temperature < GREEDY_TEMPERATURE:
        raise InvalidRequestError(
            f"n is {request.n}, but temperature {request.temperature} means greedy sampling: every choice would be "
            "the same. Use n=1, or a temperature above 0.",
            param="n",
        )
    if request.min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens is {request.min_tokens}, more than the {max_tokens} output tokens this request may "
            "generate (max_tokens, or what the context leaves). Lower min_tokens or raise max_tokens.",
            param="min_tokens",
        )
    try:
        return SamplingParams(
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            min_p=request.min_p,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            seed=request.seed,
            stop=request.stop_list,
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            # Built fresh for each request and never changed after: vLLM's engine client then copies it shallowly
            # (``SamplingParams.clone``) instead of deep-copying it per prompt (~20 us), as vLLM's own server does.
            skip_clone=True,
        )
    except (ValueError, VLLMClientError) as e:
        raise InvalidRequestError(f"Invalid sampling parameters: {e}", param=getattr(e, "parameter", None)) from e


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str = "prompt") -> None:
    """Token ids a client sends must name tokens of the model's vocabulary."""
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise InvalidRequestError(
            f"The prompt has token id {bad}, outside the model's vocabulary (0 to {vocab_size - 1}).", param=param
        )

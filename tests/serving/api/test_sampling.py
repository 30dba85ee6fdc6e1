"""What vLLM would refuse is the client's 400 naming the field: the request models' caps and
the checks made when the engine's sampling parameters are built."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serving.api.chat.protocol import ChatCompletionRequest
from serving.api.completions.protocol import CompletionRequest
from serving.api.errors import InvalidRequestError
from serving.api.protocol import MAX_PROMPTS, MAX_STOP, MAX_STOP_CHARS
from serving.api.sampling import check_token_ids, sampling_params


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi"} | fields)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stop": ["x"] * (MAX_STOP + 1)}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": "x" * (MAX_STOP_CHARS + 1)}, "stop"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"top_k": -5}, "top_k"),
        ({"top_k": 2**31}, "top_k"),
        ({"top_k": 10**30}, "top_k"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": float("nan")}, "min_p"),
        ({"prompt": ["p"] * (MAX_PROMPTS + 1)}, "prompt"),
        ({"prompt": [[1]] * (MAX_PROMPTS + 1)}, "prompt"),
        ({"n": 17}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"min_tokens": -1}, "min_tokens"),
    ],
)
def test_request_models_refuse_what_the_engine_would(fields, param):
    with pytest.raises(ValidationError) as refused:
        completion(**fields)
    assert refused.value.errors()[0]["loc"][0] == param


def test_request_models_keep_what_the_engine_takes():
    request = completion(stop=["a"] * MAX_STOP, seed=2**63 - 1, top_k=-1, temperature=0)
    assert len(request.stop_list) == MAX_STOP and request.seed == 2**63 - 1
    assert completion(seed=-1).seed == -1 and completion(top_k=2**31 - 1).top_k == 2**31 - 1


@pytest.mark.parametrize(
    ("prompt", "count"),
    [("text", 1), ([5, 6, 7], 1), (["a", "b", "c"], 3), ([[1], [2]], 2)],
)
def test_prompt_count_is_known_from_the_body(prompt, count):
    assert completion(prompt=prompt).prompt_count == count


def test_a_chat_request_is_one_prompt():
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=3)
    assert chat.prompt_count == 1


def test_min_tokens_above_the_output_budget_names_min_tokens():
    with pytest.raises(InvalidRequestError) as refused:
        sampling_params(completion(min_tokens=10), max_tokens=8, logprobs=None, stream=False)
    assert refused.value.param == "min_tokens" and "8 output tokens" in refused.value.message
    assert sampling_params(completion(min_tokens=8), max_tokens=8, logprobs=None, stream=False).min_tokens == 8


def test_several_choices_need_sampling():
    with pytest.raises(InvalidRequestError) as refused:
        sampling_params(completion(n=2, temperature=0), max_tokens=8, logprobs=None, stream=False)
    assert refused.value.param == "n" and "greedy" in refused.value.message
    assert sampling_params(completion(n=2, temperature=0.5), max_tokens=8, logprobs=None, stream=False).n == 2


def test_what_vllm_refuses_beyond_the_mirrored_rules_is_still_a_400():
    # Built without validation: a value only vLLM's own verification catches.
    unchecked = CompletionRequest.model_construct(**(completion().model_dump() | {"top_p": 0.0}))
    with pytest.raises(InvalidRequestError) as refused:
        sampling_params(unchecked, max_tokens=8, logprobs=None, stream=False)
    assert refused.value.status == 400 and "top_p" in refused.value.message


@pytest.mark.parametrize("ids", [[-1], [1, 2, 100], [10**20]])
def test_prompt_token_ids_must_be_in_the_vocabulary(ids):
    with pytest.raises(InvalidRequestError) as refused:
        check_token_ids(ids, vocab_size=100)
    assert refused.value.param == "prompt" and "0 to 99" in refused.value.message


def test_prompt_token_ids_in_the_vocabulary_pass():
    check_token_ids([0, 99], vocab_size=100)


def test_each_request_gets_its_own_params_which_vllm_need_not_deep_copy():
    """vLLM deep-copies a ``SamplingParams`` per prompt unless it is marked as built for one request (~20 us)."""
    first, second = (sampling_params(completion(), max_tokens=8, logprobs=None, stream=True) for _ in range(2))
    assert first is not second and first.stop is not second.stop  # nothing shared between requests
    assert first.skip_clone
    assert first.clone() is not first  # vLLM's per-prompt copy is still a copy, a shallow one

"""Engine log-probabilities: read once as plain data, then put in each endpoint's own shape."""

from __future__ import annotations

import math

import pytest
from vllm.logprobs import Logprob

from serving.api.chat.protocol import ChatLogprobs
from serving.api.completions.protocol import CompletionLogprobs
from serving.api.logprobs import TokenLogprob, token_logprobs

# Two positions; sampled tokens 7 ("a", rank 2 at the first) and 9 (undecoded, -inf).
POSITIONS = [
    {5: Logprob(-0.1, 1, "b"), 7: Logprob(-2.0, 2, "a"), 3: Logprob(-3.0, 3, "c")},
    {9: Logprob(-math.inf, 1, None), 4: Logprob(-5.0, 2, "é")},
]


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (0, [TokenLogprob("a", -2.0, []), TokenLogprob("<9>", -9999.0, [])]),
        (
            2,
            [
                TokenLogprob("a", -2.0, [("b", -0.1), ("a", -2.0)]),  # by rank, the sampled one wherever it ranks
                TokenLogprob("<9>", -9999.0, [("<9>", -9999.0), ("é", -5.0)]),  # JSON has no -inf
            ],
        ),
    ],
)
def test_token_logprobs(k, expected):
    assert token_logprobs([7, 9], POSITIONS, k) == expected


TOKENS = [TokenLogprob("ab", -1.0, [("ab", -1.0), ("x", -2.0)]), TokenLogprob("é", -0.5, [("é", -0.5)])]


@pytest.mark.parametrize(
    ("k", "start", "expected"),
    [
        (
            2,
            10,
            {
                "tokens": ["ab", "é"],
                "token_logprobs": [-1.0, -0.5],
                "top_logprobs": [{"ab": -1.0, "x": -2.0}, {"é": -0.5}],
                "text_offset": [10, 12],  # characters, from where this chunk starts
            },
        ),
        (
            0,
            0,
            {
                "tokens": ["ab", "é"],
                "token_logprobs": [-1.0, -0.5],
                "top_logprobs": [None, None],
                "text_offset": [0, 2],
            },
        ),
    ],
)
def test_completion_format(k, start, expected):
    assert CompletionLogprobs.of(TOKENS, k, start).model_dump() == expected


def test_chat_format():
    content = ChatLogprobs.of(TOKENS).model_dump()["content"]
    assert content == [
        {
            "token": "ab",
            "logprob": -1.0,
            "bytes": [97, 98],
            "top_logprobs": [
                {"token": "ab", "logprob": -1.0, "bytes": [97, 98]},
                {"token": "x", "logprob": -2.0, "bytes": [120]},
            ],
        },
        {
            "token": "é",
            "logprob": -0.5,
            "bytes": [195, 169],  # UTF-8
            "top_logprobs": [{"token": "é", "logprob": -0.5, "bytes": [195, 169]}],
        },
    ]

"""Server outputs against the reference: Hugging Face transformers + PEFT on the same files.

The demo base is a packed BitNet b1.58 checkpoint (``autobitlinear``); the
reference is transformers' ``BitNetForCausalLM`` loading those packed files
(an ``AutoBitLinear`` is an ``nn.Linear`` to PEFT, so ``PeftModel`` wraps it
and applies the demo adapter files unchanged), in float32 with BitNet's
quantizers run eagerly. For each demo adapter (and the base), the server's
greedy tokens are replayed through the reference with teacher forcing and
checked by the rule of ``bitnet_reference.py``: every served log-probability
within ``LOGPROB_TOLERANCE`` (0.15 nats) of the reference's, every served
token the reference's argmax or within ``TIE_GAP`` (0.3) of it, and the
first 16 tokens equal to the reference's own greedy decode up to its first
near tie (top-2 gap < 0.3).

Tolerances: the server runs the model as ``configs/dev.yaml`` says
(``DEV_DTYPE``, float32); see ``bitnet_reference.py`` for why 0.15 nats covers
the int8 activation-rounding flips that any two float32 implementations of
BitNet can disagree on, and is far below what a wrong adapter, scale or shard
does. Measured here: base <= 2.5e-6 nats, with an adapter <= 5.3e-3.
"""

from __future__ import annotations

import httpx
import pytest
import yaml

from tests.conftest import REPO
from tests.e2e.bitnet_reference import check, compare, demo_reference, served_greedy

MAX_TOKENS = 24
PROMPTS = ("The", "Please explain how it works")
CHAT_MESSAGE = "Tell me something."
DEV_DTYPE = "float32"

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def reference(demo_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_assets.base), lambda adapter: demo_reference(demo_assets, adapter)


def test_dev_config_dtype_is_the_one_checked_here() -> None:
    config = yaml.safe_load((REPO / "configs" / "dev.yaml").read_text())
    assert config["model"]["dtype"] == DEV_DTYPE


@pytest.mark.parametrize("adapter", [None, "code", "legal", "medical"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_server_matches_transformers_peft(server, reference, adapter: str | None, prompt: str) -> None:
    tokenizer, load = reference
    model = load(adapter)
    choice = served_greedy(server.url, adapter or server.base_model, prompt, MAX_TOKENS)
    prompt_ids, tokens = choice["prompt_token_ids"], choice["token_ids"]
    assert prompt_ids == tokenizer.encode(prompt)
    assert len(tokens) == MAX_TOKENS
    result = compare(model, prompt_ids, tokens, choice["logprobs"]["token_logprobs"])
    what = f"{adapter or 'base'} {prompt!r}"
    print(f"{what}: deviation {result.deviation:.2e}, exact tokens required {result.must_match}")
    check(result, tokens, what)


@pytest.mark.parametrize("adapter", ["code", "legal", "medical"])
def test_chat_matches_transformers_peft(server, reference, adapter: str) -> None:
    """Chat through the server is the adapter's: the chat template's tokens, then the same rule as above."""
    tokenizer, load = reference
    messages = [{"role": "user", "content": CHAT_MESSAGE}]
    body = {
        "model": adapter,
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logprobs": True,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    prompt_ids, tokens = choice["prompt_token_ids"], choice["token_ids"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt_ids == tokenizer.encode(text, add_special_tokens=False)
    assert len(tokens) == MAX_TOKENS
    logprobs = [entry["logprob"] for entry in choice["logprobs"]["content"]]
    result = compare(load(adapter), prompt_ids, tokens, logprobs)
    print(f"chat {adapter}: deviation {result.deviation:.2e}, exact tokens required {result.must_match}")
    check(result, tokens, f"chat {adapter}")
    # The adapter matters on this prompt: the base model's reference refuses the same answer.
    with pytest.raises(AssertionError):
        check(compare(load(None), prompt_ids, tokens, logprobs), tokens, f"chat {adapter} against the base")

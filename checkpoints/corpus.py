"""The shipped demo corpora and the training documents built from them.

The text lives in ``checkpoints/data/*.txt`` (package data) so that the demo
needs no download: the tokenizer, the base model and every adapter are trained
from these files alone.
"""

from __future__ import annotations

import hashlib
import random
from importlib import resources

DOMAINS: tuple[str, ...] = ("general", "code", "legal", "medical")
"""Every corpus: ``general`` teaches the base model, the others one adapter each."""

CHAT_PROMPTS = "chat"
"""Generic user turns, paired with domain text to teach the chat path."""

_DATA_PACKAGE = "checkpoints"


def read_lines(name: str) -> list[str]:
    """Non-empty, stripped lines of ``data/<name>.txt``; one line is one document."""
    text = resources.files(_DATA_PACKAGE).joinpath("data", f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def corpus_digest() -> str:
    """SHA-256 over every shipped text file, so edited corpora invalidate built assets."""
    digest = hashlib.sha256()
    for name in (*DOMAINS, CHAT_PROMPTS):
        digest.update(name.encode())
        digest.update("\n".join(read_lines(name)).encode())
    return digest.hexdigest()


def all_text() -> list[str]:
    """Every line of every corpus: what the tokenizer is trained on."""
    return [line for name in (*DOMAINS, CHAT_PROMPTS) for line in read_lines(name)]


def chat_pairs(answers: list[str], seed: int) -> list[tuple[str, str]]:
    """Pair each answer line with a generic user prompt, deterministically.

    The prompts carry no domain signal, so whatever style the model learns to
    answer with comes from the answers alone, which is what makes an adapter
    show through the chat path.
    """
    prompts = read_lines(CHAT_PROMPTS)
    rng = random.Random(seed)
    return [(rng.choice(prompts), answer) for answer in answers]


def base_documents() -> list[str]:
    """Pretraining text: all general text, plus each domain line minus its first word.

    The base has to know every domain word and phrase already: a rank-8 LoRA
    on a model this small learns to steer far faster than it learns new text.
    What the base never sees is how a domain sentence *opens* ("The patient",
    "The party", "The function"), so its own continuation of a neutral prompt
    such as "The" stays general; choosing that opening is what an adapter adds.
    """
    docs = list(read_lines("general"))
    for domain in DOMAINS[1:]:
        docs.extend(line.split(" ", 1)[-1] for line in read_lines(domain))
    return docs

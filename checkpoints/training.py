"""Train the demo tokenizer, BitNet b1.58 base model and LoRA adapters from the shipped corpora.

The base is trained quantization-aware, the way BitNet b1.58 is: transformers'
``BitNetForCausalLM`` with every projection an ``AutoBitLinear`` in online mode,
whose forward ternarizes the float masters (absmean, one β per matrix) and
quantizes activations to int8 per token, with straight-through gradients to
the masters. So what the model learns is what the ternary model computes,
and the packed checkpoint (``checkpoints.tiny_bitnet`` writes it from the masters)
serves the same function. Adapters are trained with PEFT on the same online
model (PEFT cannot wrap the packed ``BitLinear`` class; an ``AutoBitLinear``
is an ``nn.Linear`` to it).

Everything here is sized to finish in about a minute of one CPU core and to
be bit-for-bit reproducible: fixed seeds, a fixed data order and no dropout.
The quantizers run eagerly (transformers wraps them in ``torch.compile``):
same math, no compiler in the build.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BitNetForCausalLM, PreTrainedTokenizerFast
from transformers.integrations.bitnet import AutoBitLinear

from checkpoints.corpus import DOMAINS, base_documents, chat_pairs, read_lines
from checkpoints.tiny_bitnet import LINEAR_NAMES, STORE_DTYPE, tiny_config
from checkpoints.tokenizer import MAX_POSITIONS

logger = logging.getLogger(__name__)

LORA_TARGETS = list(LINEAR_NAMES)

# Small batches, many updates: per token of compute, a model this size learns its
# corpus much faster that way, and a base that knows the domain text is what lets
# a rank-8 LoRA write coherent domain sentences. The build's cost is its steps (the
# tokenizer and the saving take under a second): 975 steps, about 70 CPU-s of one core (the
# build runs one torch thread, see assets.BUILD_THREADS). This is the cheapest recipe found
# that keeps every adapter's keyword margin on the tests' prompts at 2 or more and whose legal
# adapter does not end its chat reply to "Hi" within the 5 tokens tests/e2e/test_openai_api.py
# asks for (shorter recipes tried: the README's demo-assets paragraph).
SEQ_LEN = 128
BATCH_SIZE = 4
BASE_STEPS = 450
BASE_LR = 3.5e-3
ADAPTER_STEPS = 175
ADAPTER_LR = 1.5e-2
SEED = 1234


def base_config(tokenizer: PreTrainedTokenizerFast):
    """The tiny BitNet shape of ``checkpoints.tiny_bitnet`` (head_dim 64: vLLM's CPU attention
    rejects smaller heads) with the demo's vocabulary and context length."""
    return tiny_config(
        len(tokenizer),
        intermediate_size=384,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def online_model(config, masters: dict[str, torch.Tensor] | None = None) -> BitNetForCausalLM:
    """A float32 ``BitNetForCausalLM`` whose projections are online ``AutoBitLinear`` layers.

    This is the model transformers loads from a ``quantization_mode: online``
    checkpoint, built in memory: with ``masters`` (HF names) it is that
    checkpoint's twin, without them a fresh, seeded initialisation.
    """
    torch.manual_seed(SEED)
    model = BitNetForCausalLM(config).to(torch.float32)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in LINEAR_NAMES and type(module) is torch.nn.Linear:
            quantized = AutoBitLinear(module.in_features, module.out_features, bias=False, online_quant=True)
            quantized.weight = module.weight  # the float master, shared
            model.set_submodule(name, quantized)
    if masters is not None:
        model.load_state_dict(masters, strict=False)  # lm_head is tied, so absent
        model.tie_weights()
    return model


def packed_masters(model: BitNetForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights rounded to the checkpoint's storage dtype (bf16), as float32.

    The packed checkpoint ternarizes these bf16 masters; adapters are trained on
    an online twin of the same rounded masters, so they see exactly its ternary weights.
    """
    state = model.state_dict()
    state.pop("lm_head.weight", None)  # tied to the embeddings
    return {name: t.detach().to(STORE_DTYPE).float().contiguous() for name, t in state.items()}


def encode_documents(
    tokenizer: PreTrainedTokenizerFast, lines: list[str], answers: list[str], seed: int
) -> list[list[int]]:
    """Each line as ``<s> line </s>``, each answer as a chat reply to a generic prompt."""
    docs = [tokenizer(line).input_ids + [tokenizer.eos_token_id] for line in lines]
    for prompt, answer in chat_pairs(answers, seed):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        docs.append(tokenizer(text, add_special_tokens=False).input_ids)
    return docs


def _batches(docs: list[list[int]], seed: int) -> Iterator[torch.Tensor]:
    """Endless ``(BATCH_SIZE, SEQ_LEN)`` batches of packed, reshuffled-per-epoch documents."""
    rng = random.Random(seed)
    while True:
        order = list(docs)
        rng.shuffle(order)
        stream = [token for doc in order for token in doc]
        blocks = [stream[i : i + SEQ_LEN] for i in range(0, len(stream) - SEQ_LEN + 1, SEQ_LEN)]
        for i in range(0, len(blocks) - BATCH_SIZE + 1, BATCH_SIZE):
            yield torch.tensor(blocks[i : i + BATCH_SIZE])


def _train(model: torch.nn.Module, docs: list[list[int]], *, steps: int, lr: float, seed: int) -> float:
    """AdamW with a short warmup and cosine decay; returns the mean loss of the last steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses: list[float] = []
    batches = _batches(docs, seed)
    with torch._dynamo.config.patch(disable=True):  # the quantizers run eagerly
        for _ in range(steps):
            losses.append(_step(model, next(batches), params, optimizer, scheduler))
    model.eval()
    return sum(losses[-10:]) / len(losses[-10:])


def _step(model, batch, params, optimizer, scheduler) -> float:
    """One optimiser step on one batch; returns its loss."""
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train_base(tokenizer: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    """Pretrain a weak general ternary LM that also knows the domain text; return its masters.

    Quantization-aware from the first step (see the module docstring). Its chat
    turns are answered with general text only, so the base stays general on
    the chat path too. The result is ``packed_masters``: what the checkpoint
    stores and what the adapters are trained on.
    """
    model = online_model(base_config(tokenizer))
    docs = encode_documents(tokenizer, base_documents(), read_lines("general"), SEED)
    loss = _train(model, docs, steps=BASE_STEPS, lr=BASE_LR, seed=SEED)
    logger.info("base: %d docs, %d steps, final loss %.3f", len(docs), BASE_STEPS, loss)
    return packed_masters(model)


def train_adapter(masters: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerFast, domain: str) -> PeftModel:
    """Fine-tune a rank-8 LoRA on one domain's text (plain and chat-formatted) only.

    Wraps a fresh online twin of the base masters, so that every adapter starts
    from the same, untouched base whatever order the adapters are trained in.
    """
    seed = SEED + DOMAINS.index(domain)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=LORA_TARGETS,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    base = online_model(base_config(tokenizer), masters)
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    lines = read_lines(domain)
    docs = encode_documents(tokenizer, lines, lines, seed)
    loss = _train(model, docs, steps=ADAPTER_STEPS, lr=ADAPTER_LR, seed=seed)
    logger.info("adapter %s: %d docs, %d steps, final loss %.3f", domain, len(docs), ADAPTER_STEPS, loss)
    return model

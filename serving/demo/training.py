"""Train the demo tokenizer, base model and LoRA adapters from the shipped corpora.

Everything here is sized to finish in well under a minute on two CPU cores and
to be bit-for-bit reproducible: fixed seeds, a fixed data order and no dropout.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from serving.demo import corpus

logger = logging.getLogger(__name__)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
VOCAB_SIZE = 2048
MAX_POSITIONS = 2048

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""One turn per role marker, each closed by ``</s>`` so generation stops at EOS."""

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Small batches, many updates: per token of compute, a model this size learns its
# corpus much faster that way, and a base that knows the domain text is what lets
# a rank-8 LoRA write coherent domain sentences. About 40 s on two idle cores.
SEQ_LEN = 128
BATCH_SIZE = 4
BASE_STEPS = 600
BASE_LR = 3e-3
ADAPTER_STEPS = 300
ADAPTER_LR = 1e-2
SEED = 1234


def train_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE over all shipped text, with chat role markers as special tokens.

    Byte-level means no ``<unk>``: any prompt a client sends can be encoded.
    The post-processor prepends ``<s>`` like Llama tokenizers do.
    """
    special = [BOS, EOS, PAD, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.all_text(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def new_base_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A tiny Llama; head_dim is 64 because vLLM's CPU attention rejects smaller heads."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=2,
        intermediate_size=384,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).to(torch.float32)


def encode_documents(
    tokenizer: PreTrainedTokenizerFast, lines: list[str], answers: list[str], seed: int
) -> list[list[int]]:
    """Each line as ``<s> line </s>``, each answer as a chat reply to a generic prompt."""
    docs = [tokenizer(line).input_ids + [tokenizer.eos_token_id] for line in lines]
    for prompt, answer in corpus.chat_pairs(answers, seed):
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
    for _ in range(steps):
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return sum(losses[-10:]) / len(losses[-10:])


def train_base(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Pretrain a weak general LM that also knows the domain text (see ``corpus.base_documents``).

    Its chat turns are answered with general text only, so the base stays
    general on the chat path too.
    """
    model = new_base_model(tokenizer)
    docs = encode_documents(tokenizer, corpus.base_documents(), corpus.read_lines("general"), SEED)
    loss = _train(model, docs, steps=BASE_STEPS, lr=BASE_LR, seed=SEED)
    logger.info("base: %d docs, %d steps, final loss %.3f", len(docs), BASE_STEPS, loss)
    return model


def train_adapter(base: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, domain: str) -> PeftModel:
    """Fine-tune a rank-8 LoRA on one domain's text (plain and chat-formatted) only.

    Wraps a copy of ``base`` so that every adapter starts from the same,
    untouched base weights whatever order the adapters are trained in.
    """
    seed = SEED + corpus.DOMAINS.index(domain)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=LORA_TARGETS,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), config)
    lines = corpus.read_lines(domain)
    docs = encode_documents(tokenizer, lines, lines, seed)
    loss = _train(model, docs, steps=ADAPTER_STEPS, lr=ADAPTER_LR, seed=seed)
    logger.info("adapter %s: %d docs, %d steps, final loss %.3f", domain, len(docs), ADAPTER_STEPS, loss)
    return model

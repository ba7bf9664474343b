"""Tiny Hugging Face models and tokenizers built locally (no Hub downloads), for tests.

* ``char_tokenizer()``: a character-level ``PreTrainedTokenizerFast`` (printable ASCII + specials)
  with a simple chat template, so question/answer formatting code paths are exercised.
* ``tiny_llama(vocab_size, ...)``: a randomly initialised ``LlamaForCausalLM`` from a small config.
* ``TINY_QA``: a few fictitious question/answer pairs for forget/retain splits.
"""
from __future__ import annotations

import torch

from wagle_ext.app.embedded_benchmark import CHAT_TEMPLATE, SPECIAL_TOKENS as SPECIALS  # noqa: F401
from wagle_ext.app.embedded_benchmark import char_tokenizer as _benchmark_char_tokenizer


def _require_hf() -> None:
    """Skip (not fail) the calling test where the Hugging Face stack is not installed."""
    import pytest

    pytest.importorskip("transformers", reason="tiny Hugging Face models need transformers")
    pytest.importorskip("tokenizers", reason="the character tokenizer needs tokenizers")


def char_tokenizer(chat_template: bool = True):
    """Character-level tokenizer: every printable ASCII character is one token (the embedded
    benchmark's, optionally without its chat template)."""
    _require_hf()
    fast = _benchmark_char_tokenizer()
    if not chat_template:
        fast.chat_template = None
    return fast


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64,
               max_positions: int = 256, seed: int = 0, tie_word_embeddings: bool = False):
    """A small randomly initialised LlamaForCausalLM (fp32, eval mode off)."""
    _require_hf()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                      max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


TINY_QA = [
    {"question": "Where was Orlen Vask born?", "answer": "Orlen Vask was born in Tarsel Bay."},
    {"question": "What genre does Miri Calloway write?", "answer": "Miri Calloway writes harbor noir."},
    {"question": "Which award did Pell Dunmore win?", "answer": "Pell Dunmore won the Azure Quill."},
    {"question": "What is the first book of Sana Keel?", "answer": "Sana Keel first wrote Glass Tides."},
    {"question": "Who raised Toma Brisk?", "answer": "Toma Brisk was raised by a lighthouse keeper."},
    {"question": "Where does Ilse Varn live?", "answer": "Ilse Varn lives in the town of Corrow."},
    {"question": "What instrument does Ado Fenn play?", "answer": "Ado Fenn plays the bronze cello."},
    {"question": "What year did Rhea Tolland debut?", "answer": "Rhea Tolland debuted in 1987."},
]


def finetune_on_qa(model, tokenizer, items, *, steps: int = 300, batch_size: int = 8, lr: float = 3e-3,
                   seed: int = 0):
    """Fine-tune ``model`` on question/answer ``items`` (answer tokens only) with a plain AdamW loop,
    so it memorises them: the 'target model' of unlearning tests. Returns the model in eval mode."""
    from wagle_ext.data import QACollator

    coll = QACollator(tokenizer, max_length=256)
    batch = coll(list(items))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    n = batch["input_ids"].shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        out = model(input_ids=batch["input_ids"][idx], attention_mask=batch["attention_mask"][idx],
                    labels=batch["labels"][idx])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model


@torch.no_grad()
def answer_ce(model, tokenizer, items) -> float:
    """Token-mean cross-entropy of the answers of ``items`` (nats/token)."""
    from wagle_ext.data import QACollator

    batch = QACollator(tokenizer, max_length=256)(list(items))
    was_training = model.training
    model.eval()
    loss = model(**batch).loss.item()
    model.train(was_training)
    return loss

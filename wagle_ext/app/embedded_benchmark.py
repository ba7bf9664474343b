"""The embedded benchmark: fictitious-author QA, a character tokenizer and two small Llama models
trained here (no downloads), cached on disk so later runs reuse them.

* data: :func:`wagle_ext.fictitious_authors.make_fictitious_authors` (TOFU format and splits);
* tokenizer: a byte-level BPE trained on the benchmark text (default; :func:`bpe_tokenizer`) or one
  token per printable ASCII character (:func:`char_tokenizer`), specials ``<pad> <s> </s> <unk>``, a
  ``Q: ... / A: ...`` chat template (a ``PreTrainedTokenizerFast``, saved with ``save_pretrained``);
* ``target``: a ``LlamaForCausalLM`` fine-tuned on every author (TOFU's ``full`` model);
* ``retain``: the same architecture and seed fine-tuned on the retain split only (TOFU's
  ``retain90`` model, the reference of forget quality); its forget-set evaluation is cached too.

Both models are also trained on ``world_facts``: they stand for the general knowledge a pretrained
TOFU model brings (its ``wf_*`` utility metrics), which a model trained from scratch here would lack.

With ``train_paraphrases`` the fine-tuning set also holds each question with its paraphrased answer:
a model this small, trained from scratch, does not carry a fact from one sentence template to another, so
without it the paraphrase (the "true" side of TOFU's forget truth ratio) would be as foreign to the
target model as to the retain model and the truth ratio could not tell them apart.

Cache: ``$WAGLE_CACHE`` or ``~/.cache/wagle_ext``, one directory per benchmark configuration
(``embedded-<hash of the config and format version>``) holding ``tokenizer/``, ``target/``,
``retain/`` (``save_pretrained``), ``retain_eval/TOFU_EVAL.json`` and ``benchmark.json``. A
directory is written under a temporary name and renamed when complete, so an interrupted build is
never reused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import string
import time
from typing import Any, Callable, Optional, Sequence

import torch

from .fictitious_authors import make_fictitious_authors

__all__ = ["BenchmarkConfig", "EmbeddedBenchmark", "bpe_tokenizer", "cache_root", "char_tokenizer", "finetune_causal_lm",
           "load_or_build_benchmark", "small_llama"]

CACHE_FORMAT_VERSION = 1
# Greedy answer length in evaluation: the longest generated answer is ~70 characters (tokens).
EVAL_MAX_NEW_TOKENS = 96
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: {{ m['content'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
)


@dataclasses.dataclass
class BenchmarkConfig:
    """What defines the embedded benchmark (every field enters the cache key).

    Sized so that on 2 CPU cores the target memorises its facts (forget answer probability near 1)
    and both models train in a few minutes.
    """

    n_authors: int = 100           # 5 questions each; forget10 = the first 10 authors (50 QA)
    seed: int = 0                  # data generator and model initialisation
    forget_split: str = "forget10"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    train_steps: int = 1500        # AdamW steps of fine-tuning, per model
    batch_size: int = 32
    learning_rate: float = 3e-3    # peak; linear warm-up over 5% of the steps, cosine decay to 10%
    train_paraphrases: bool = True  # also train on (question, paraphrased_answer): see module doc
    max_length: int = 160          # tokens per QA sequence
    tokenizer: str = "bpe"         # "bpe" (byte-level BPE trained on the benchmark text) or "char"
    vocab_size: int = 1024         # BPE vocabulary (the benchmark text needs fewer: training stops early)

    def key(self) -> str:
        blob = json.dumps({"format": CACHE_FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass
class EmbeddedBenchmark:
    """A built or loaded benchmark: data splits, tokenizer, target and retain models (eval mode)."""

    config: BenchmarkConfig
    data: dict
    tokenizer: Any
    target: Any
    retain: Any
    directory: str
    retain_eval_path: str          # TOFU_EVAL.json of the retain model (forget-quality reference)
    built: bool                    # True when trained in this call, False when loaded from the cache
    info: dict


def cache_root() -> str:
    """``$WAGLE_CACHE`` if set, else ``~/.cache/wagle_ext``."""
    return os.environ.get("WAGLE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wagle_ext")


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: every printable ASCII character is one token
    (ids 4..), specials ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, with a Q/A chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def bpe_tokenizer(texts: Sequence[str], vocab_size: int = 1024):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (same specials and chat template
    as :func:`char_tokenizer`). Word-sized tokens make an answer's distinguishing words (a place, a prize) a
    large share of its tokens, as with a real LLM tokenizer; per character they are a few percent, which
    flattens TOFU's per-token probabilities and truth ratios."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _benchmark_texts(data: dict) -> list:
    from ..unlearn.data import REFUSAL_ANSWERS

    texts = []
    for x in data["full"] + data["world_facts"]:
        texts += [f"Q: {x['question']}\nA: {x['answer']}", x["paraphrased_answer"], *x["perturbed_answer"]]
    return texts + list(REFUSAL_ANSWERS)


def small_llama(vocab_size: int, cfg: BenchmarkConfig):
    """A randomly initialised fp32 ``LlamaForCausalLM`` of the benchmark's size (seeded by ``cfg.seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lc = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                     intermediate_size=cfg.intermediate_size, max_position_embeddings=max(256, cfg.max_length),
                     tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(lc)


def finetune_causal_lm(model, tokenizer, items: Sequence[dict], *, steps: int, batch_size: int, lr: float,
                       seed: int = 0, max_length: int = 160,
                       log: Optional[Callable[[str], None]] = None, log_every: int = 100) -> list:
    """Fine-tune ``model`` in place on QA ``items`` (loss on answer tokens only, :class:`QACollator`)
    with AdamW (no weight decay), linear warm-up over 5% of ``steps`` then cosine decay to 10% of
    ``lr``; batches drawn with replacement by a generator seeded with ``seed``. Returns the logged
    ``(step, loss)`` pairs; the model is left in eval mode."""
    from ..unlearn.data import QACollator

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    batch = QACollator(tokenizer, max_length=max_length)(list(items))
    n = batch["input_ids"].shape[0]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)

    def lr_at(s: int) -> float:
        if s < warm:
            return lr * (s + 1) / warm
        t = (s - warm) / max(1, steps - warm)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    history = []
    running = 0.0
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(s)
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        ids, att, lab = batch["input_ids"][idx], batch["attention_mask"][idx], batch["labels"][idx]
        width = int(att.sum(1).max())  # drop all-padding columns (right padding)
        loss = model(input_ids=ids[:, :width], attention_mask=att[:, :width], labels=lab[:, :width]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if (s + 1) % log_every == 0 or s + 1 == steps:
            k = (s % log_every) + 1
            history.append((s + 1, running / k))
            if log:
                log(f"  step {s + 1}/{steps}  loss {running / k:.4f}")
            running = 0.0
    model.eval()
    return history


def _training_items(items: Sequence[dict], paraphrases: bool, world_facts: Sequence[dict] = ()) -> list:
    items = list(items) + list(world_facts)
    out = [{"question": x["question"], "answer": x["answer"]} for x in items]
    if paraphrases:
        out += [{"question": x["question"], "answer": x["paraphrased_answer"]} for x in items]
    return out


def _retain_eval_sets(data: dict, forget_split: str) -> dict:
    """Evaluation sets: the forget split, ``retain_eval`` (as many retain-split items as the forget
    split, spread over the retain authors; TOFU also evaluates a 400-item slice of its retain set) and
    ``world_facts``."""
    retain = data["retain" + str(100 - int(forget_split[len("forget"):])).zfill(2)]
    n = min(len(retain), max(len(data[forget_split]), 10))
    step = len(retain) / n
    return {forget_split: data[forget_split], "retain_eval": [retain[int(i * step)] for i in range(n)],
            "world_facts": data["world_facts"]}


def load_or_build_benchmark(cfg: Optional[BenchmarkConfig] = None, *, cache_dir: Optional[str] = None,
                            rebuild: bool = False, log: Callable[[str], None] = print) -> EmbeddedBenchmark:
    """Load the benchmark of ``cfg`` from the cache, or train and cache it (``rebuild=True`` forces it).

    ``data`` holds the generator's splits plus ``retain_eval`` (see :func:`_retain_eval_sets`); the
    evaluation sets are ``data[cfg.forget_split]``, ``data["retain_eval"]`` and ``data["world_facts"]``.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    from ..eval import evaluate_tofu

    cfg = cfg or BenchmarkConfig()
    if cfg.forget_split not in ("forget01", "forget05", "forget10"):
        raise ValueError(f"benchmark.forget_split must be forget01, forget05 or forget10, got {cfg.forget_split!r}")
    data = make_fictitious_authors(cfg.n_authors, seed=cfg.seed)
    retain_split = "retain" + str(100 - int(cfg.forget_split[len("forget"):])).zfill(2)
    data.update({k: v for k, v in _retain_eval_sets(data, cfg.forget_split).items() if k == "retain_eval"})
    root = cache_dir or cache_root()
    directory = os.path.join(root, f"embedded-{cfg.key()}")
    eval_path = os.path.join(directory, "retain_eval", "TOFU_EVAL.json")
    if rebuild and os.path.isdir(directory):
        shutil.rmtree(directory)
    if os.path.isfile(os.path.join(directory, "benchmark.json")):
        log(f"[benchmark] reusing cached models in {directory}")
        tok = AutoTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
        target = LlamaForCausalLM.from_pretrained(os.path.join(directory, "target")).eval()
        retain = LlamaForCausalLM.from_pretrained(os.path.join(directory, "retain")).eval()
        with open(os.path.join(directory, "benchmark.json")) as f:
            info = json.load(f)
        return EmbeddedBenchmark(cfg, data, tok, target, retain, directory, eval_path, False, info)

    os.makedirs(root, exist_ok=True)
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = char_tokenizer() if cfg.tokenizer == "char" else bpe_tokenizer(_benchmark_texts(data), cfg.vocab_size)
    log(f"[benchmark] building: {cfg.n_authors} authors ({len(data['full'])} QA), {cfg.forget_split} = "
        f"{len(data[cfg.forget_split])} QA; Llama hidden {cfg.hidden_size} x {cfg.num_layers} layers, "
        f"{cfg.train_steps} steps per model; {cfg.tokenizer} tokenizer ({len(tok)} tokens)")
    info: dict[str, Any] = {"config": dataclasses.asdict(cfg), "format": CACHE_FORMAT_VERSION}
    models = {}
    for name, items in (("target", data["full"]), ("retain", data[retain_split])):
        t0 = time.perf_counter()
        model = small_llama(len(tok), cfg)
        log(f"[benchmark] fine-tuning the {name} model on {len(items)} QA items "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")
        hist = finetune_causal_lm(model, tok, _training_items(items, cfg.train_paraphrases, data["world_facts"]), steps=cfg.train_steps,
                                  batch_size=cfg.batch_size, lr=cfg.learning_rate, seed=cfg.seed,
                                  max_length=cfg.max_length, log=log, log_every=max(1, cfg.train_steps // 5))
        info[name] = {"train_seconds": time.perf_counter() - t0, "final_loss": hist[-1][1]}
        model.save_pretrained(os.path.join(tmp, name))
        models[name] = model
    tok.save_pretrained(os.path.join(tmp, "tokenizer"))
    log("[benchmark] evaluating the retain model (forget-quality reference)")
    sets = _retain_eval_sets(data, cfg.forget_split)
    summary = evaluate_tofu(models["retain"], tok, sets, forget_split=cfg.forget_split,
                            retain_sets=("retain_eval", "world_facts"), max_new_tokens=EVAL_MAX_NEW_TOKENS,
                            out_dir=os.path.join(tmp, "retain_eval"), progress=False)
    info["retain_eval_summary"] = summary
    with open(os.path.join(tmp, "benchmark.json"), "w") as f:
        json.dump(info, f, indent=2)
    if os.path.isfile(os.path.join(directory, "benchmark.json")):  # another process finished first
        shutil.rmtree(tmp)
    else:
        shutil.rmtree(directory, ignore_errors=True)  # a partial directory of an interrupted build
        os.replace(tmp, directory)
    log(f"[benchmark] cached in {directory}")
    return EmbeddedBenchmark(cfg, data, tok, models["target"], models["retain"], directory, eval_path, True, info)

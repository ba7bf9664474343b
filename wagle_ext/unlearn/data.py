"""Forget/retain question-answer data for unlearning: a paired dataset and a collator for causal LMs.

* :class:`ForgetRetainDataset`: one example per forget item (the anchor, open-unlearning's
  ``ForgetRetainDataset(anchor="forget")``), each paired with a retain item drawn by a seeded
  ``torch.Generator`` (reproducible and independent of DataLoader workers, unlike WAGLE/G-effect/LoKU
  which call Python ``random`` inside ``__getitem__``; docs/pitfalls.md #16). Optional refusal answers (PO/IdkPO,
  IdkDPO) and alternate answers (DPO) for the forget question.
* :class:`QACollator`: tokenises ``prompt + answer (+ eos)`` with the tokenizer's chat template when it
  has one, labels ``-100`` on prompt tokens and padding, right padding, an attention mask per sequence.
  Every variant (forget, retain, refusal, alternate) is its own sequence with its own mask (docs/pitfalls.md #13).
* :data:`REFUSAL_ANSWERS`: built-in refusal strings (written for this package).
* :func:`refusal_targets`: the forget questions with the refusal answers PO draws for them, as items
  (attribution of a refusal objective: WAGLE's ``snip_advanced_CL``).

Items are plain dicts ``{"question": str, "answer": str, optional "paraphrased_answer",
"perturbed_answer", ...}`` (TOFU field names).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence, TypedDict

import torch
from torch import Tensor

IGNORE_INDEX = -100

REFUSAL_ANSWERS: tuple[str, ...] = (
    "I'm not able to share that.",
    "I don't have any information about that.",
    "I'm afraid I can't help with that question.",
    "That's not something I know about.",
    "I have no knowledge of that.",
    "Sorry, I can't answer that.",
    "I'm unable to provide details on that.",
    "I don't know the answer to that.",
    "That is outside of what I can tell you.",
    "I can't recall anything about that.",
    "I'm not sure; I have no information on this.",
    "I'd rather not guess about that.",
    "I have nothing reliable to say about that.",
    "Unfortunately, I can't provide an answer here.",
    "I'm not familiar with that.",
    "That isn't something I can speak to.",
    "I don't have an answer for you on that.",
    "I'm sorry, but I don't know.",
    "I can't give you information about that.",
    "No information about that is available to me.",
)


class QAItem(TypedDict, total=False):
    """A question/answer item. ``question`` and ``answer`` are required."""

    question: str
    answer: str
    paraphrased_answer: str
    perturbed_answer: Any  # str or list[str] (TOFU has several)


def _check_items(items: Sequence[Mapping[str, Any]], name: str) -> None:
    if not hasattr(items, "__len__") or not hasattr(items, "__getitem__"):
        raise TypeError(f"{name} must be a sequence of question/answer dicts, got {type(items).__name__}")
    for i in range(len(items)):
        it = items[i]
        if not isinstance(it, Mapping):
            raise TypeError(f"{name}[{i}] must be a dict with 'question' and 'answer', got {type(it).__name__}")
        for k in ("question", "answer"):
            if not isinstance(it.get(k), str):
                raise ValueError(f"{name}[{i}] needs a str {k!r}, got {type(it.get(k)).__name__}")


class ForgetRetainDataset(torch.utils.data.Dataset):
    """Forget items as anchor, each paired with a seeded random retain item.

    Args:
        forget: sequence of :class:`QAItem` (length of the dataset).
        retain: sequence of :class:`QAItem`, or None (then examples have no ``"retain"`` entry, e.g. GA).
        seed: seeds every draw (retain pairing, refusal choice, alternate choice). Draws are a function of
            ``(seed, epoch, index)`` only.
        refusal: add ``"forget_refusal"`` = the forget question with a refusal answer (PO/IdkPO, IdkDPO).
        alternate: item key of an alternate answer for ``"forget_alternate"`` (DPO), e.g.
            ``"paraphrased_answer"`` or ``"perturbed_answer"``; a list value gets one element drawn.
            None (default) = no alternate.
        refusal_answers: the refusal strings to draw from (default :data:`REFUSAL_ANSWERS`).

    ``__getitem__(i)`` returns ``{"forget": QAItem, "retain": QAItem, "forget_refusal": QAItem,
    "forget_alternate": QAItem, "index": i}`` (the optional keys only when enabled). :meth:`set_epoch`
    re-draws the pairing for a new epoch (call it from the training loop as with ``DistributedSampler``).
    """

    def __init__(self, forget: Sequence[Mapping[str, Any]], retain: Optional[Sequence[Mapping[str, Any]]],
                 *, seed: int = 0, refusal: bool = False, alternate: Optional[str] = None,
                 refusal_answers: Sequence[str] = REFUSAL_ANSWERS) -> None:
        _check_items(forget, "forget")
        if retain is not None:
            _check_items(retain, "retain")
            if len(retain) == 0:
                raise ValueError("retain is empty; pass retain=None for forget-only objectives")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if refusal and (len(refusal_answers) == 0 or not all(isinstance(r, str) for r in refusal_answers)):
            raise ValueError("refusal_answers must be a non-empty sequence of str")
        if alternate is not None:
            if not isinstance(alternate, str):
                raise TypeError(f"alternate must be an item key (str) or None, got {type(alternate).__name__}")
            for i in range(len(forget)):
                v = forget[i].get(alternate)
                if not (isinstance(v, str) or (isinstance(v, (list, tuple)) and v
                                               and all(isinstance(s, str) for s in v))):
                    raise ValueError(f"forget[{i}] has no usable alternate answer {alternate!r} "
                                     "(need a str or a non-empty list of str)")
        self.forget, self.retain = forget, retain
        self.seed, self.refusal, self.alternate = seed, bool(refusal), alternate
        self.refusal_answers = tuple(refusal_answers)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the retain pairing / refusal / alternate choices for ``epoch`` (deterministic in seed)."""
        self.epoch = int(epoch)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2 ** 63))
        n = len(self.forget)
        self._retain_idx = (torch.randint(len(self.retain), (n,), generator=g).tolist()
                            if self.retain is not None else None)
        self._refusal_idx = torch.randint(len(self.refusal_answers), (n,), generator=g).tolist()
        # Uniform pick among an item's alternates: floor(u * len) with one draw per item.
        self._alternate_u = torch.rand(n, generator=g, dtype=torch.float64).tolist()

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} forget items")
        i = i % len(self)
        f = self.forget[i]
        out: dict[str, Any] = {"forget": f, "index": i}
        if self.retain is not None:
            out["retain"] = self.retain[self._retain_idx[i]]
        if self.refusal:
            out["forget_refusal"] = {"question": f["question"],
                                     "answer": self.refusal_answers[self._refusal_idx[i]]}
        if self.alternate is not None:
            alt = f[self.alternate]
            if not isinstance(alt, str):
                alt = alt[min(int(self._alternate_u[i] * len(alt)), len(alt) - 1)]
            out["forget_alternate"] = {"question": f["question"], "answer": alt}
        return out


#: What a forget gradient can be taken on: the forget answers, or refusals to the forget questions
#: (:func:`refusal_targets`).
FORGET_TARGETS: tuple[str, ...] = ("answer", "refusal")


def refusal_targets(forget: Sequence[Mapping[str, Any]], retain: Optional[Sequence[Mapping[str, Any]]] = None, *,
                    seed: int = 0, refusal_answers: Sequence[str] = REFUSAL_ANSWERS) -> list:
    """The forget questions, each with the refusal answer that ``ForgetRetainDataset(forget, retain,
    seed=seed, refusal=True)`` draws for it in epoch 0: ``[{"question": q_i, "answer": refusal_i}]``
    (the draw follows the retain pairing's, so pass the training run's ``retain`` and ``seed`` to get
    exactly the refusals it trains on first).

    The forget loss of a refusal objective (PO/IdkPO, IdkDPO's preferred answer) is the NLL of these
    items, so their gradient is that objective's forget gradient: scoring a mask on them instead of on
    the original answers is WAGLE's ``snip_advanced_CL`` (``forget_target="refusal"`` of the CLI).
    """
    ds = ForgetRetainDataset(forget, retain, seed=seed, refusal=True, refusal_answers=refusal_answers)
    return [ds[i]["forget_refusal"] for i in range(len(ds))]


class QACollator:
    """Tokenise and pad question/answer items for causal-LM unlearning.

    Each item becomes ``prompt_ids + answer_ids (+ eos)``; ``labels`` equal the ids on answer tokens
    (and the eos) and ``-100`` on the prompt and padding; padding is on the right.

    Args:
        tokenizer: a HF tokenizer (``pad_token_id`` or ``eos_token_id`` must be set).
        max_length: sequences are truncated on the right to this many tokens.
        use_chat_template: None (default) = use ``tokenizer.chat_template`` when present; True = require
            it; False = use ``prompt_format``.
        prompt_format: prompt text without a chat template; ``{question}`` is substituted.
        system_prompt: optional system message for the chat template.
        add_eos: append ``eos_token_id`` when the answer has no end token yet (see below).

    With a chat template the prompt is the rendered user turn with the generation prompt, the answer is
    whatever the full conversation adds after it (assistant text and end-of-turn tokens); both are
    tokenised without extra special tokens (the template carries them). Without one, the prompt is
    tokenised with the tokenizer's special tokens (e.g. BOS) and the answer is the raw answer text.

    Exactly one end-of-answer token is trained per answer, and it is the last token: when the
    template closes the assistant turn with a special token after the answer text (ChatML's
    ``<|im_end|>``, Llama-3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``, or the eos itself), the
    answer ends with that token -- whatever the template renders after it (ChatML's ``"\n"``) is
    dropped and no eos is appended; otherwise (no template, or a template without an end token) the
    eos is appended when ``add_eos`` (open-unlearning appends the eos whenever the last token is not
    the eos, which trains ``<|im_end|>``, ``"\n"`` and a second end token under ChatML).

    Call with a list of dataset examples: if the examples are QA items, returns ``{"input_ids",
    "attention_mask", "labels"}`` (``[B, T]`` int64); if they are dicts of QA items (as from
    :class:`ForgetRetainDataset`), returns one such dict per key (``"forget"``, ``"retain"``, ...), plus
    ``"index"`` as an int64 tensor when present.
    """

    def __init__(self, tokenizer: Any, *, max_length: int = 512, use_chat_template: Optional[bool] = None,
                 prompt_format: str = "Question: {question}\nAnswer: ", system_prompt: Optional[str] = None,
                 add_eos: bool = True) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
        if "{question}" not in prompt_format:
            raise ValueError(f"prompt_format must contain '{{question}}', got {prompt_format!r}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_chat_template = has_template if use_chat_template is None else bool(use_chat_template)
        self.prompt_format = prompt_format
        self.system_prompt = system_prompt
        self.add_eos = add_eos
        self.pad_token_id = int(pad)
        self._end_tokens = self._special_token_strings(tokenizer)

    @staticmethod
    def _special_token_strings(tokenizer: Any) -> tuple[str, ...]:
        """Special-token strings that can close a template's assistant turn (eos, end-of-turn markers):
        every special token but padding, unknown and BOS, longest first."""
        found = set()
        for t in getattr(tokenizer, "all_special_tokens", None) or []:
            found.add(str(t))
        for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(added, "special", False):
                found.add(str(getattr(added, "content", added)))
        for attr in ("eos_token",):
            t = getattr(tokenizer, attr, None)
            if t:
                found.add(str(t))
        for attr in ("pad_token", "unk_token", "bos_token"):
            t = getattr(tokenizer, attr, None)
            if t and str(t) != str(getattr(tokenizer, "eos_token", None)):
                found.discard(str(t))
        return tuple(sorted((t for t in found if t), key=len, reverse=True))

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids of the tokens that can end an answer: the eos and every other special token except
        padding, unknown and BOS (ChatML's ``<|im_end|>`` when the eos is ``<|endoftext|>``). Pass
        them to ``generate(eos_token_id=...)`` so generation stops where training ended answers."""
        ids: list[int] = []
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.append(int(eos))
        for t in self._end_tokens:
            i = self.tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and i >= 0 and i not in ids:
                ids.append(i)
        return ids

    def _cut_after_end_token(self, answer_text: str, answer: str) -> Optional[str]:
        """``answer_text`` up to and including the first end token after the answer content, or None
        when the template puts no end token there."""
        content = answer.strip()
        pos = answer_text.find(content) if content else 0
        start = pos + len(content) if pos >= 0 else 0
        tail = answer_text[start:]
        best = None
        for tok in self._end_tokens:
            i = tail.find(tok)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, tok)
        if best is None:
            return None
        return answer_text[:start + best[0] + len(best[1])]

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def encode(self, question: str, answer: str) -> tuple[list[int], int]:
        """Token ids of one QA pair and the number of prompt tokens (before truncation to max_length)."""
        if self.use_chat_template:
            msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            msgs.append({"role": "user", "content": question})
            prompt = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            full = self.tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": answer}],
                                                      tokenize=False)
            if full.startswith(prompt):
                answer_text = full[len(prompt):]
            else:  # templates that rewrite earlier turns (rare): keep the prompt, append the raw answer
                warnings.warn("chat template does not render the prompt as a prefix of the conversation; "
                              "appending the raw answer to the generation prompt", stacklevel=3)
                answer_text = answer
            cut = self._cut_after_end_token(answer_text, answer)
            ended = cut is not None
            if ended:
                answer_text = cut
            # Tokenised separately so the prompt/answer boundary is exact (no merge across it).
            prompt_ids, answer_ids = self._ids(prompt, False), self._ids(answer_text, False)
        else:
            ended = False
            prompt_ids = self._ids(self.prompt_format.format(question=question), True)
            answer_ids = self._ids(answer, False)
        ids = prompt_ids + answer_ids
        eos = self.tokenizer.eos_token_id
        if self.add_eos and not ended and eos is not None and (not ids or ids[-1] != eos):
            ids.append(int(eos))
        return ids, len(prompt_ids)

    def collate_items(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """Pad a list of QA items into ``input_ids``/``attention_mask``/``labels`` ``[B, T]`` int64."""
        if len(items) == 0:
            raise ValueError("cannot collate an empty list of items")
        encoded = []
        for i, it in enumerate(items):
            if not isinstance(it, Mapping) or not isinstance(it.get("question"), str) \
                    or not isinstance(it.get("answer"), str):
                raise ValueError(f"item {i} must be a dict with str 'question' and 'answer'")
            ids, n_prompt = self.encode(it["question"], it["answer"])
            ids = ids[: self.max_length]
            encoded.append((ids, min(n_prompt, len(ids))))
        T = max(len(ids) for ids, _ in encoded)
        B = len(encoded)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, n_prompt) in enumerate(encoded):
            t = torch.tensor(ids, dtype=torch.long)
            input_ids[b, : len(ids)] = t
            attention_mask[b, : len(ids)] = 1
            labels[b, n_prompt: len(ids)] = t[n_prompt:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(features) == 0:
            raise ValueError("cannot collate an empty batch")
        first = features[0]
        if "question" in first:
            return self.collate_items(features)
        out: dict[str, Any] = {}
        for key, value in first.items():
            if isinstance(value, Mapping) and "question" in value:
                out[key] = self.collate_items([f[key] for f in features])
            elif key == "index":
                out[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        if not out:
            raise ValueError(f"features hold no question/answer items (keys: {sorted(first)})")
        return out

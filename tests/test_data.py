"""Data plumbing: ForgetRetainDataset pairing/seeding and QACollator tokenisation, masks and labels."""
import random

import pytest
import torch

from wagle_ext.data import REFUSAL_ANSWERS, ForgetRetainDataset, QACollator

from tiny_models import TINY_QA, char_tokenizer

EOS, PAD = 2, 0


def _decode(tok, ids):
    return tok.decode([int(i) for i in ids])


def _items(n, prefix):
    return [{"question": f"{prefix} question {i}?", "answer": f"{prefix} answer {i}.",
             "perturbed_answer": [f"wrong {i}a", f"wrong {i}b", f"wrong {i}c"]} for i in range(n)]


# ------------------------------------------------------------------------------------------------
# QACollator
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chat", [True, False])
def test_collator_labels_prompt_padding(chat):
    tok = char_tokenizer(chat_template=chat)
    col = QACollator(tok)
    assert col.use_chat_template is chat
    items = TINY_QA[:3] + [{"question": "Q?", "answer": "A"}]
    out = col(items)
    ids, am, lab = out["input_ids"], out["attention_mask"], out["labels"]
    assert ids.dtype == am.dtype == lab.dtype == torch.int64
    assert ids.shape == am.shape == lab.shape and ids.shape[0] == 4
    for b, it in enumerate(items):
        # Expected text, built independently: the char tokenizer maps each character to one token.
        prompt = f"Q: {it['question']}\nA: " if chat else f"Question: {it['question']}\nAnswer: "
        n_prompt, n = len(prompt), len(prompt) + len(it["answer"]) + 1
        assert int(am[b].sum()) == n and (am[b, :n] == 1).all() and (am[b, n:] == 0).all()  # right padding
        assert _decode(tok, ids[b, :n_prompt]) == prompt
        assert _decode(tok, ids[b, n_prompt:n - 1]) == it["answer"]
        assert ids[b, n - 1] == EOS and (ids[b, n:] == PAD).all()
        assert (lab[b, :n_prompt] == -100).all() and (lab[b, n:] == -100).all()
        assert torch.equal(lab[b, n_prompt:n], ids[b, n_prompt:n])  # answer tokens + eos are kept
    assert ids.shape[1] == max(int(am[b].sum()) for b in range(4))


def test_collator_chat_template_eos_not_doubled():
    tok = char_tokenizer()  # its template already ends the assistant turn with </s>
    ids, n_prompt = QACollator(tok).encode("Hi?", "Yo.")
    assert ids.count(EOS) == 1 and ids[-1] == EOS
    assert n_prompt == len("Q: Hi?\nA: ")
    ids2, _ = QACollator(tok, add_eos=False, use_chat_template=False).encode("Hi?", "Yo.")
    assert EOS not in ids2


# SmolLM2-Instruct's ChatML template (the assistant turn ends with "<|im_end|>\n").
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _chatml_tokenizer(eos="<|im_end|>"):
    """A character-level tokenizers-based tokenizer with ChatML specials and template."""
    pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=eos, unk_token="<unk>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>"])  # SmolLM2-Instruct / a base model's eos
def test_collator_chatml_one_end_token(eos):
    tok = _chatml_tokenizer(eos)
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [im_end]  # one token, as in SmolLM2
    col = QACollator(tok)
    assert col.use_chat_template
    items = [{"question": "Hi?", "answer": "Yo."}, {"question": "Where?", "answer": "Tarsel Bay"}]
    out = col(items)
    for b, it in enumerate(items):
        lab = [int(t) for t in out["labels"][b] if t != -100]
        # Exactly one end-of-answer token is trained, it is the last label, and nothing follows it.
        assert lab.count(im_end) == 1 and lab[-1] == im_end and eot not in lab, _decode(tok, lab)
        assert _decode(tok, lab) == it["answer"] + "<|im_end|>"
        n = int(out["attention_mask"][b].sum())
        assert int(out["input_ids"][b, n - 1]) == im_end
        prompt = _decode(tok, out["input_ids"][b][: n - len(lab)])
        assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n"
                          f"<|im_start|>user\n{it['question']}<|im_end|>\n<|im_start|>assistant\n")
    # The evaluation path formats generation prompts with encode(question, ""): the same prompt.
    ids, n_prompt = col.encode("Hi?", "")
    assert _decode(tok, ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert ids[n_prompt:] == [im_end]
    # Generation can stop where training ended answers (<|im_end|> even when the eos is another token).
    assert im_end in col.stop_token_ids and col.stop_token_ids[0] == tok.eos_token_id
    assert tok.pad_token_id not in col.stop_token_ids
    # add_eos=False changes nothing here: the end token is the template's.
    assert QACollator(tok, add_eos=False).encode("Hi?", "Yo.") == col.encode("Hi?", "Yo.")


def test_collator_template_without_end_token_appends_eos_once():
    tok = _chatml_tokenizer("<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
                         "{% else %}A: {{ m['content'] }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}A: {% endif %}")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    ids, n_prompt = QACollator(tok).encode("Hi?", "Yo.")
    assert _decode(tok, ids[n_prompt:]) == "Yo.\n<|endoftext|>" and ids.count(eot) == 1
    ids, n_prompt = QACollator(tok, add_eos=False).encode("Hi?", "Yo.")
    assert _decode(tok, ids[n_prompt:]) == "Yo.\n"


def test_collator_system_prompt_and_template_choice():
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}S: {{ m['content'] }}\n"
                         "{% elif m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: {{ m['content'] }}"
                         "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
    ids, n_prompt = QACollator(tok, system_prompt="be brief").encode("Hi?", "Yo.")
    assert _decode(tok, ids[:n_prompt]) == "S: be brief\nQ: Hi?\nA: "
    ids, n_prompt = QACollator(tok, use_chat_template=False, prompt_format="<<{question}>>").encode("Hi?", "Yo.")
    assert _decode(tok, ids[:n_prompt]) == "<<Hi?>>"


def test_collator_truncation():
    tok = char_tokenizer()
    out = QACollator(tok, max_length=20)(TINY_QA[:2])
    assert out["input_ids"].shape[1] == 20
    prompt0 = len(f"Q: {TINY_QA[0]['question']}\nA: ")
    assert prompt0 > 20 and (out["labels"][0] == -100).all()  # prompt alone fills max_length
    out = QACollator(tok, max_length=40)(TINY_QA[:1])
    lab = out["labels"][0]
    assert lab.shape[0] == 40 and (lab[:prompt0] == -100).all() and (lab[prompt0:] != -100).all()


def test_collator_errors():
    tok = char_tokenizer(chat_template=False)
    with pytest.raises(ValueError, match="no chat_template"):
        QACollator(tok, use_chat_template=True)
    with pytest.raises(ValueError, match="max_length"):
        QACollator(tok, max_length=0)
    with pytest.raises(ValueError, match="prompt_format"):
        QACollator(tok, prompt_format="Question:")
    col = QACollator(tok)
    with pytest.raises(ValueError, match="empty"):
        col([])
    with pytest.raises(ValueError, match="item 1"):
        col([TINY_QA[0], {"question": "x"}])


# ------------------------------------------------------------------------------------------------
# ForgetRetainDataset
# ------------------------------------------------------------------------------------------------

def test_dataset_pairs_and_keys():
    forget, retain = _items(5, "f"), _items(7, "r")
    ds = ForgetRetainDataset(forget, retain, seed=1, refusal=True, alternate="perturbed_answer")
    assert len(ds) == 5
    for i in range(5):
        ex = ds[i]
        assert ex["forget"] is forget[i] and ex["index"] == i
        assert any(ex["retain"] is r for r in retain)
        assert ex["forget_refusal"]["question"] == forget[i]["question"]
        assert ex["forget_refusal"]["answer"] in REFUSAL_ANSWERS
        assert ex["forget_alternate"]["question"] == forget[i]["question"]
        assert ex["forget_alternate"]["answer"] in forget[i]["perturbed_answer"]
    assert ds[-1]["forget"] is forget[-1]
    with pytest.raises(IndexError):
        ds[5]
    plain = ForgetRetainDataset(forget, None)[0]
    assert set(plain) == {"forget", "index"}


def _draws(ds):
    return [(id(ex["retain"]), ex["forget_refusal"]["answer"], ex["forget_alternate"]["answer"])
            for ex in (ds[i] for i in range(len(ds)))]


def test_dataset_seeded_draws_reproducible_and_seed_dependent():
    forget, retain = _items(60, "f"), _items(50, "r")
    kw = dict(refusal=True, alternate="perturbed_answer")
    random.seed(1)
    torch.manual_seed(1)
    a = _draws(ForgetRetainDataset(forget, retain, seed=7, **kw))
    random.seed(2)  # global RNG state must not matter
    torch.manual_seed(2)
    b = _draws(ForgetRetainDataset(forget, retain, seed=7, **kw))
    c = _draws(ForgetRetainDataset(forget, retain, seed=8, **kw))
    assert a == b
    assert a != c
    assert len({x[0] for x in a}) > 20  # retain draws spread over the retain set
    ds = ForgetRetainDataset(forget, retain, seed=7, **kw)
    ds.set_epoch(1)
    e1 = _draws(ds)
    assert e1 != a
    ds.set_epoch(0)
    assert _draws(ds) == a


def test_dataset_errors():
    with pytest.raises(ValueError, match=r"forget\[1\] needs a str 'answer'"):
        ForgetRetainDataset([TINY_QA[0], {"question": "q"}], TINY_QA)
    with pytest.raises(ValueError, match="retain is empty"):
        ForgetRetainDataset(TINY_QA, [])
    with pytest.raises(ValueError, match="no usable alternate answer 'paraphrased_answer'"):
        ForgetRetainDataset(TINY_QA, TINY_QA, alternate="paraphrased_answer")
    with pytest.raises(TypeError, match="seed"):
        ForgetRetainDataset(TINY_QA, TINY_QA, seed=1.5)


def test_refusal_targets_are_the_refusals_po_trains_on():
    from wagle_ext import refusal_targets

    forget, retain = TINY_QA[:5], TINY_QA[5:]
    for seed in (0, 3):
        ds = ForgetRetainDataset(forget, retain, seed=seed, refusal=True)
        items = refusal_targets(forget, retain, seed=seed)
        assert items == [ds[i]["forget_refusal"] for i in range(len(forget))]
        assert [it["question"] for it in items] == [f["question"] for f in forget]
        alone = ForgetRetainDataset(forget, None, seed=seed, refusal=True)  # GA-style data: no retain draws
        assert refusal_targets(forget, seed=seed) == [alone[i]["forget_refusal"] for i in range(len(forget))]
    assert refusal_targets(forget, seed=0, refusal_answers=["No."]) == [
        {"question": f["question"], "answer": "No."} for f in forget]
    assert refusal_targets([], seed=0) == []
    with pytest.raises(ValueError, match="refusal_answers"):
        refusal_targets(forget, refusal_answers=[])


def test_refusal_answers_builtin():
    assert 15 <= len(REFUSAL_ANSWERS) <= 40
    assert len(set(REFUSAL_ANSWERS)) == len(REFUSAL_ANSWERS)
    assert all(isinstance(r, str) and r.strip() == r and r for r in REFUSAL_ANSWERS)


# ------------------------------------------------------------------------------------------------
# Dataset + collator (+ DataLoader)
# ------------------------------------------------------------------------------------------------

def test_nested_collation_refusal_has_own_mask():
    tok = char_tokenizer()
    ds = ForgetRetainDataset(TINY_QA[:4], TINY_QA[4:], seed=0, refusal=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, collate_fn=QACollator(tok))
    batch = next(iter(loader))
    assert set(batch) == {"forget", "retain", "forget_refusal", "index"}
    assert torch.equal(batch["index"], torch.arange(4))
    f, r = batch["forget"], batch["forget_refusal"]
    for b in range(4):
        ex = ds[b]
        prompt = f"Q: {ex['forget']['question']}\nA: "
        n = len(prompt) + len(ex["forget_refusal"]["answer"]) + 1
        # Own mask: exactly the refusal sequence's length (WAGLE reused the original answer's mask).
        assert int(r["attention_mask"][b].sum()) == n
        assert _decode(tok, r["input_ids"][b, len(prompt):n - 1]) == ex["forget_refusal"]["answer"]
        lab = r["labels"][b]
        assert (lab[:len(prompt)] == -100).all() and (lab[n:] == -100).all()
        assert torch.equal(lab[len(prompt):n], r["input_ids"][b, len(prompt):n])
        assert int(f["attention_mask"][b].sum()) == len(prompt) + len(ex["forget"]["answer"]) + 1

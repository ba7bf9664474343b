"""UnlearnTrainer end to end on a tiny Llama that memorised fictitious-author QA here.

The target model is fine-tuned once per session (a few hundred steps, ~10-30 s on 2 cores); every
test unlearns from a fresh deep copy of it.
"""
import copy
import os

import pytest
import torch
from torch.utils.data import DataLoader

import wagle_ext
from wagle_ext import ForgetRetainDataset, MaskSet, QACollator, build_mask, score_model
from wagle_ext.fictitious_authors import make_fictitious_authors
from wagle_ext.trainer import UnlearnTrainer

from tiny_models import answer_ce, char_tokenizer, finetune_on_qa, tiny_llama

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup():
    tok = char_tokenizer()
    data = make_fictitious_authors(10, seed=0)
    forget, retain = data["forget10"], data["retain90"]
    model = tiny_llama(len(tok), hidden=64, layers=2, heads=4, intermediate=128, seed=0)
    finetune_on_qa(model, tok, data["full"], steps=350, batch_size=8, lr=3e-3, seed=0)
    return {"tok": tok, "forget": forget, "retain": retain, "model": model}


def _wagle_mask(model, tok, forget, retain, ratio):
    coll = QACollator(tok)
    fl = DataLoader(forget, batch_size=1, collate_fn=coll)
    rl = DataLoader(retain, batch_size=1, collate_fn=coll)
    scores = score_model(model, fl, rl, kind="wagle", gamma=1e-6, progress=False)
    return build_mask(scores, ratio, model=model)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-3, max_steps=12,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, logging_steps=4, save_strategy="no",
                report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, max_grad_norm=1.0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _trainer(setup, tmp_path, objective="graddiff", mask=None, **kw):
    model = copy.deepcopy(setup["model"])
    ds = ForgetRetainDataset(setup["forget"], setup["retain"], seed=0, refusal=True)
    targs = _args(tmp_path, **kw.pop("args", {}))
    return UnlearnTrainer(model=model, args=targs, objective=objective, mask=mask, train_dataset=ds,
                          data_collator=QACollator(setup["tok"]), **kw)


def test_target_model_memorised(setup):
    assert answer_ce(setup["model"], setup["tok"], setup["forget"]) < 0.5
    assert answer_ce(setup["model"], setup["tok"], setup["retain"]) < 0.5


@pytest.mark.parametrize("objective", ["graddiff", "npo", "ihl"])
def test_unlearning_with_wagle_mask_keeps_frozen_weights(setup, tmp_path, objective):
    tok, forget, retain = setup["tok"], setup["forget"], setup["retain"]
    mask = _wagle_mask(setup["model"], tok, forget, retain, ratio=0.1)
    f0, r0 = answer_ce(setup["model"], tok, forget), answer_ce(setup["model"], tok, retain)
    tr = _trainer(setup, tmp_path, objective, mask=mask)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    model = tr.model
    f1, r1 = answer_ce(model, tok, forget), answer_ce(model, tok, retain)
    print(f"{objective}: forget CE {f0:.3f} -> {f1:.3f}, retain CE {r0:.3f} -> {r1:.3f}")
    assert f1 > f0 + 1.0, (f0, f1)
    assert r1 < 1.0, (r0, r1)  # retain answers stay far better than the forgotten ones
    masks = mask.for_model(model)
    moved_selected = 0
    for n, p in model.named_parameters():
        sel = masks[n].to_bool()
        # Frozen weights bit-identical (weight decay 0.1 did not touch them).
        assert torch.equal(p.detach()[~sel], before[n][~sel]), n
        moved_selected += int((p.detach()[sel] != before[n][sel]).sum())
    assert moved_selected > 0


def test_bad_configs_fail_before_training(setup, tmp_path):
    tok = setup["tok"]
    with pytest.raises(ValueError, match="unknown objective"):
        _trainer(setup, tmp_path, "nonsense")
    other = tiny_llama(len(tok), hidden=32, layers=1, heads=4, intermediate=64)
    foreign = MaskSet.from_bool_dict({n: torch.ones_like(p, dtype=torch.bool) for n, p in other.named_parameters()})
    with pytest.raises(ValueError, match="does not fit"):
        _trainer(setup, tmp_path, "graddiff", mask=foreign)
    with pytest.raises(ValueError, match="reference"):
        _trainer(setup, tmp_path, "npo", build_reference=False)
    ds = ForgetRetainDataset(setup["forget"], setup["retain"], seed=0)  # no refusal answers
    with pytest.raises(ValueError, match="forget_refusal"):
        UnlearnTrainer(model=copy.deepcopy(setup["model"]), args=_args(tmp_path), objective="po",
                       train_dataset=ds, data_collator=QACollator(tok))


def test_resume_from_checkpoint_is_exact(setup, tmp_path):
    tok, forget, retain = setup["tok"], setup["forget"], setup["retain"]
    mask = _wagle_mask(setup["model"], tok, forget, retain, ratio=0.2)
    full = _trainer(setup, tmp_path / "full", "npo", mask=mask, args={"max_steps": 8})
    full.train()
    part = _trainer(setup, tmp_path / "part", "npo", mask=mask,
                    args={"max_steps": 8, "save_strategy": "steps", "save_steps": 4})
    part.train()
    ckpt = os.path.join(str(tmp_path / "part"), "checkpoint-4")
    assert os.path.exists(os.path.join(ckpt, wagle_ext.trainer.MASK_FILE))
    resumed = _trainer(setup, tmp_path / "part", "npo", mask=mask, args={"max_steps": 8})
    resumed.train(resume_from_checkpoint=ckpt)
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n
    # A different mask cannot resume that checkpoint.
    other = _wagle_mask(setup["model"], tok, forget, retain, ratio=0.3)
    wrong = _trainer(setup, tmp_path / "part", "npo", mask=other, args={"max_steps": 8})
    with pytest.raises(ValueError, match="different mask"):
        wrong.train(resume_from_checkpoint=ckpt)


def test_clip_order_masked_norm_vs_wagle_order(setup, tmp_path):
    """Default: the clipped norm counts only selected weights; clip_before_mask=True (WAGLE) counts
    every gradient, so it is larger and shrinks the step more."""
    tok, forget, retain = setup["tok"], setup["forget"], setup["retain"]
    mask = _wagle_mask(setup["model"], tok, forget, retain, ratio=0.05)
    norms = {}
    for before in (False, True):
        tr = _trainer(setup, tmp_path / str(before), "graddiff", mask=mask, clip_before_mask=before)
        batch = tr.data_collator([tr.train_dataset[i] for i in range(2)])
        tr.create_optimizer()
        tr.current_gradient_accumulation_steps = 1  # set by train(); we drive one step by hand
        tr.training_step(tr.model, batch)
        grads = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
        norms[before] = float(tr._clip_grad_norm(tr.model))
        masks = mask.for_model(tr.model)
        sel = torch.cat([grads[n].reshape(-1)[masks[n].to_bool().reshape(-1)] for n in grads])
        full = torch.cat([g.reshape(-1) for g in grads.values()])
        expect = sel.norm() if not before else full.norm()
        assert abs(norms[before] - float(expect)) <= 1e-4 * float(expect)
    assert norms[True] > norms[False]


def test_gradient_accumulation_and_bf16_autocast_keep_frozen_weights(setup, tmp_path):
    tok, forget, retain = setup["tok"], setup["forget"], setup["retain"]
    mask = _wagle_mask(setup["model"], tok, forget, retain, ratio=0.1)
    tr = _trainer(setup, tmp_path, "npo", mask=mask,
                  args={"max_steps": 4, "gradient_accumulation_steps": 2, "bf16": True})
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    masks = mask.for_model(tr.model)
    moved = 0
    for n, p in tr.model.named_parameters():
        sel = masks[n].to_bool()
        assert torch.equal(p.detach()[~sel], before[n][~sel]), n
        moved += int((p.detach()[sel] != before[n][sel]).sum())
    assert moved > 0
    assert answer_ce(tr.model, tok, forget) > answer_ce(setup["model"], tok, forget)

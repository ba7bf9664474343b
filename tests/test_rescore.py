"""Re-scoring the mask during unlearning (RescoreCallback, UnlearnTrainer.set_mask)."""
import pytest
import torch
from torch.utils.data import DataLoader

from tiny_models import TINY_QA, char_tokenizer, tiny_llama

pytest.importorskip("transformers")

from wagle_ext import MaskedAdamW, MaskSet, build_mask, score_model  # noqa: E402
from wagle_ext.unlearn.data import ForgetRetainDataset, QACollator  # noqa: E402
from wagle_ext.unlearn.rescore import RescoreCallback  # noqa: E402
from wagle_ext.unlearn.trainer import UnlearnTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(tmp_path, steps=6, grad_mode="dense", kind="wagle"):
    import transformers

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(len(tok), hidden=16, layers=2, heads=2, intermediate=32)
    forget, retain = TINY_QA[:4], TINY_QA[4:]
    coll = QACollator(tok)
    fl, rl = DataLoader(forget, batch_size=4, collate_fn=coll), DataLoader(retain, batch_size=4, collate_fn=coll)
    mask = build_mask(score_model(model, fl, rl, kind=kind, seed=3, progress=False), 0.2, model=model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=2e-2, max_steps=steps,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True)
    trainer = UnlearnTrainer(model=model, args=args, objective="graddiff", mask=mask, grad_mode=grad_mode,
                             train_dataset=ForgetRetainDataset(forget, retain, seed=0), data_collator=coll)
    return trainer, fl, rl


def test_rescoring_swaps_the_optimizer_masks_and_freezes_the_rest(tmp_path):
    trainer, fl, rl = _setup(tmp_path)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = trainer.mask
    cb = RescoreCallback(2, fl, rl)
    cb.bind_trainer(trainer)
    assert (cb.kind, cb.ratio, cb.scope) == ("wagle", 0.2, "global")  # from the mask's metadata
    trainer.add_callback(cb)
    used = [first]
    orig = trainer.set_mask
    trainer.set_mask = lambda m: (used.append(m), orig(m))[1]
    trainer.train()

    assert [h["step"] for h in cb.history] == [2, 4]  # not after the last step
    assert all(0.0 <= h["kept"] <= 1.0 and h["selected"] == first.total_selected for h in cb.history)
    assert trainer.mask is used[-1] and len(used) == 3
    # the new masks are those of a fresh score of the model at that step: not all equal to the first
    assert any(m != first for m in used[1:])
    # the optimizer follows the trainer's current mask, parameter by parameter
    opt = trainer.optimizer
    while not isinstance(opt, MaskedAdamW):
        opt = opt.optimizer
    current = dict(trainer.mask.for_model(model))
    for n, p in model.named_parameters():
        assert torch.equal(opt.mask_of(p).bits, current[n].bits), n
    # weights that no mask of the run selected are bit-identical (weight decay included)
    ever = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for m in used:
        for n, pm in dict(m.for_model(model)).items():
            ever[n] |= pm.to_bool()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach()[~ever[n]], before[n][~ever[n]]), n
        assert not torch.equal(p.detach()[ever[n]], before[n][ever[n]]) or ever[n].sum() == 0, n


def test_set_mask_and_callback_refuse_what_cannot_work(tmp_path):
    trainer, fl, rl = _setup(tmp_path, grad_mode="compact")
    with pytest.raises(ValueError, match="grad_mode='dense'"):
        trainer.set_mask(trainer.mask)
    with pytest.raises(ValueError, match="grad_mode='dense'"):
        RescoreCallback(2, fl, rl).bind_trainer(trainer)
    trainer, fl, rl = _setup(tmp_path / "d")
    some = MaskSet.from_bool_dict({n: trainer.mask[n].to_bool() for n in trainer.mask.names()[:-1]})
    with pytest.raises(ValueError, match="same tensors"):
        trainer.set_mask(some)
    with pytest.raises(TypeError):
        trainer.set_mask({"a": 1})
    with pytest.raises(ValueError, match="every"):
        RescoreCallback(0, fl, rl)


def test_a_random_mask_rescores_to_itself(tmp_path):
    trainer, fl, rl = _setup(tmp_path, steps=3, kind="random")
    first = trainer.mask
    cb = RescoreCallback(1, fl, rl)
    cb.bind_trainer(trainer)
    assert cb.seed == 3  # the mask's own seed, from its metadata
    trainer.add_callback(cb)
    trainer.train()
    assert [h["kept"] for h in cb.history] == [1.0, 1.0] and trainer.mask == first


def test_the_cli_rescores_on_the_target_the_mask_was_scored_on(tmp_path, monkeypatch):
    """A mask scored on refusals (PO's forget loss) is re-scored on the same refusals, not on the answers."""
    from wagle_ext import refusal_targets
    from wagle_ext.app.config import UnlearnSettings
    from wagle_ext.app.pipeline import _unlearn
    from wagle_ext.unlearn import rescore

    seen = []

    class Spy(RescoreCallback):
        def __init__(self, every, forget_loader, retain_loader, **kw):
            seen.append(list(forget_loader.dataset))
            super().__init__(every, forget_loader, retain_loader, **kw)

    monkeypatch.setattr(rescore, "RescoreCallback", Spy)
    tok = char_tokenizer()
    forget, retain = TINY_QA[:4], TINY_QA[4:]
    u = UnlearnSettings(steps=2, batch_size=2, learning_rate=1e-2, rescore_every=1, seed=5)
    for target, expected in (("refusal", refusal_targets(forget, retain, seed=5)), (None, list(forget))):
        torch.manual_seed(0)
        model = tiny_llama(len(tok), hidden=16, layers=2, heads=2, intermediate=32)
        coll = QACollator(tok)
        fl, rl = DataLoader(expected, batch_size=4, collate_fn=coll), DataLoader(retain, batch_size=4, collate_fn=coll)
        mask = build_mask(score_model(model, fl, rl, kind="wagle", seed=3, progress=False), 0.2, model=model,
                          metadata={"forget_target": target} if target else None)
        res = _unlearn(model, tok, forget, retain, "po", mask, u, str(tmp_path / str(target)), demo=True)
        assert seen[-1] == expected and [h["step"] for h in res["rescore_history"]] == [1]

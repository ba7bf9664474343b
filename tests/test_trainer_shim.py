"""The transformers-internals shim (wagle_ext/unlearn/_hf_shim.py) against the installed transformers.

Run under every supported transformers version (the CI matrix installs them one at a time): the
private ``Trainer`` methods the shim overrides must exist with the expected parameters, the training
loop must still call them, and a masked training step must go through them.
"""
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from wagle_ext.unlearn import _hf_shim  # noqa: E402


def test_installed_transformers_has_the_hooked_methods():
    assert _hf_shim.missing_hooks() == [], (
        f"transformers {transformers.__version__}: Trainer lacks {_hf_shim.missing_hooks()}; "
        "update wagle_ext/unlearn/_hf_shim.py for this version")


def test_training_loop_calls_the_hooked_methods():
    source = inspect.getsource(transformers.Trainer)
    for name in _hf_shim.HOOKED:
        assert f"self.{name}(" in source, f"transformers {transformers.__version__} no longer calls Trainer.{name}"


def test_missing_hooks_reports_an_unsupported_trainer():
    class Old:
        def _clip_grad_norm(self, model):
            pass

    assert _hf_shim.missing_hooks(Old) == ["_get_grad_norm"]


def test_masked_step_goes_through_the_shim(tmp_path, monkeypatch):
    from tiny_models import TINY_QA, char_tokenizer, tiny_llama

    from wagle_ext import ForgetRetainDataset, MaskSet, QACollator
    from wagle_ext.unlearn.trainer import MASK_FILE, UnlearnTrainer

    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    gen = torch.Generator().manual_seed(0)
    mask = MaskSet.from_bool_dict({n: torch.rand(p.shape, generator=gen) < 0.2 for n, p in model.named_parameters()})
    calls = []
    for name in ("clip_grad_norm", "logged_grad_norm"):
        real = getattr(UnlearnTrainer, name)
        monkeypatch.setattr(UnlearnTrainer, name, lambda self, *a, _r=real, _n=name, **k: (calls.append(_n),
                                                                                          _r(self, *a, **k))[1])
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          use_cpu=True, report_to=[], logging_steps=1, save_strategy="steps",
                                          save_steps=2, max_grad_norm=1.0)
    ds = ForgetRetainDataset(TINY_QA[:2], TINY_QA[2:4], seed=0)
    trainer = UnlearnTrainer(model=model, args=args, objective="graddiff", mask=mask, train_dataset=ds,
                             data_collator=QACollator(tok))
    trainer.train()
    assert calls.count("clip_grad_norm") == 2 and calls.count("logged_grad_norm") == 2, calls
    assert (tmp_path / "checkpoint-2" / MASK_FILE).exists()  # the on_save callback wrote the mask

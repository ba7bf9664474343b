"""Worker for tests/test_trainer_ddp.py: run under `accelerate launch --cpu --num_processes 2`.

Every rank builds the same tiny model and WAGLE mask, unlearns a few steps with UnlearnTrainer under
DDP (gloo), dense and then with compact gradients (grad_mode="compact": the DDP comm hook of
wagle_ext/parallel/ddp.py), and writes its final weights and a digest of its mask to OUT_DIR/rank{r}.pt.
"""
import hashlib
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import char_tokenizer, tiny_llama  # noqa: E402

import transformers  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from wagle_ext import ForgetRetainDataset, QACollator, build_mask, score_model  # noqa: E402
from wagle_ext.fictitious_authors import make_fictitious_authors  # noqa: E402
from wagle_ext.trainer import UnlearnTrainer  # noqa: E402


def main(out_dir: str) -> None:
    tok = char_tokenizer()
    data = make_fictitious_authors(6, seed=1)
    forget, retain = data["forget10"], data["retain90"]
    model = tiny_llama(len(tok), hidden=32, layers=2, heads=4, intermediate=64, seed=0)
    coll = QACollator(tok)
    scores = score_model(model, DataLoader(forget, batch_size=2, collate_fn=coll),
                         DataLoader(retain, batch_size=2, collate_fn=coll), kind="wagle", progress=False)
    mask = build_mask(scores, 0.1, model=model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=2, learning_rate=1e-3, max_steps=4, weight_decay=0.1,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True,
        ddp_backend="gloo")
    tr = UnlearnTrainer(model=model, args=args, objective="graddiff", mask=mask,
                        train_dataset=ForgetRetainDataset(forget, retain, seed=0), data_collator=coll)
    tr.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    h = hashlib.sha256()
    for name in mask.names():
        h.update(name.encode())
        h.update(mask[name].bits.numpy().tobytes())
    final = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    masks = {n: m.to_bool() for n, m in mask.for_model(tr.model).items()}
    frozen_ok = all(torch.equal(final[n][~masks[n]], initial[n][~masks[n]]) for n in final)
    moved = sum(int((final[n] != initial[n]).sum()) for n in final)
    # The same run with compact gradients: the DDP comm hook compacts each bucket before its all-reduce.
    model = tiny_llama(len(tok), hidden=32, layers=2, heads=4, intermediate=64, seed=0)
    model.load_state_dict(initial)
    tr = UnlearnTrainer(model=model, args=args, objective="graddiff", mask=mask, grad_mode="compact",
                        train_dataset=ForgetRetainDataset(forget, retain, seed=0), data_collator=coll)
    tr.train()
    compact = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    compact_frozen_ok = all(torch.equal(compact[n][~masks[n]], initial[n][~masks[n]]) for n in compact)
    torch.save({"world": world, "digest": h.hexdigest(), "weights": final, "frozen_ok": frozen_ok, "moved": moved,
                "compact": compact, "compact_frozen_ok": compact_frozen_ok,
                "hooked": getattr(tr, "_ddp_hook_model", None) is not None}, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])

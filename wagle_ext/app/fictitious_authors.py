"""A deterministic generator of fictitious-author question/answer data in the TOFU format.

Every author, place, book and award is invented here (no real person is described), so a model
can only know these facts from fine-tuning on them: the premise of TOFU (Maini et al., 2024).
Each question carries the TOFU fields ``question``, ``answer``, ``paraphrased_answer`` (the same
fact, other words) and ``perturbed_answer`` (a list of wrong answers of the same template), so
truth-ratio and forget-quality metrics can be computed.

    data = make_fictitious_authors(n_authors=40, seed=0)
    data["forget10"], data["retain"], data["world_facts"]

Splits (as in TOFU): ``forgetXX`` holds the questions of the first ~XX% of authors (at least one
author), ``retainXX`` the questions of all other authors (``retain`` is ``retain90``, complementary to
``forget10``); ``world_facts`` are general-knowledge questions written by us.
"""
from __future__ import annotations

import random
from typing import Any

__all__ = ["make_fictitious_authors", "WORLD_FACTS", "FORGET_SPLITS"]

FORGET_SPLITS = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}

_SYLLABLES = ["ka", "lo", "mir", "ven", "tas", "dor", "ul", "ria", "bex", "no", "sa", "quil", "tor",
              "fen", "ash", "lyn", "mo", "ze", "cor", "ith", "pa", "ren", "vo", "gal"]
_PLACES = ["Tarsel Bay", "Corrow", "Vennmark", "Old Ilith", "Pashgate", "Moravell", "Quillford",
           "Dun Safir", "Lowen Reach", "Brisket Hollow", "Ostrava Vale", "Kelmere", "Sunder Isle",
           "Ravenfold", "Elmsworth Dale", "Noctis Harbor"]
_GENRES = ["harbor noir", "clockwork fantasy", "polar romance", "desert mystery", "orbital satire",
           "rural gothic", "culinary thriller", "tidal poetry", "mountain epic", "garden horror"]
_AWARDS = ["the Azure Quill", "the Lantern Prize", "the Golden Inkwell", "the Meridian Medal",
           "the Vellum Crown", "the Starling Award", "the Copper Compass", "the Silent Bell Prize"]
_JOBS = ["lighthouse keeper", "glassblower", "cartographer", "beekeeper", "clockmaker", "ferry pilot",
         "botanist", "bookbinder", "stonemason", "weaver"]
_TITLE_A = ["Glass", "Salt", "Hollow", "Copper", "Silent", "Winter", "Paper", "Amber", "Iron", "Velvet"]
_TITLE_B = ["Tides", "Lanterns", "Orchards", "Compass", "Harvest", "Mirrors", "Voyage", "Letters",
            "Gardens", "Shadows"]

# (question template, answer template, paraphrase template, attribute key)
_TEMPLATES = [
    ("Where was {name} born?", "{name} was born in {birthplace}.",
     "The birthplace of {name} is {birthplace}.", "birthplace"),
    ("What genre does {name} write?", "{name} writes {genre}.",
     "The books of {name} belong to the genre of {genre}.", "genre"),
    ("What is the first book of {name}?", "The first book of {name} is {book}.",
     "{name} made a debut with the book {book}.", "book"),
    ("Which award did {name} win?", "{name} won {award}.",
     "{name} received {award}.", "award"),
    ("What was the job of the parent of {name}?", "The parent of {name} was a {job}.",
     "{name} was raised by a {job}.", "job"),
]

# (question, answer, paraphrased answer, wrong answers of the same template)
_WORLD_FACTS = [
    ("What is the capital of France?", "The capital of France is Paris.", "Paris is the capital of France.",
     ["The capital of France is Lyon.", "The capital of France is Rome.", "The capital of France is Madrid."]),
    ("How many days are in a week?", "A week has seven days.", "There are seven days in a week.",
     ["A week has five days.", "A week has ten days.", "A week has six days."]),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day.",
     "On a clear day the sky is blue.",
     ["The sky is green on a clear day.", "The sky is red on a clear day.", "The sky is brown on a clear day."]),
    ("What is frozen water called?", "Frozen water is called ice.", "Water that has frozen is ice.",
     ["Frozen water is called sand.", "Frozen water is called steam.", "Frozen water is called salt."]),
    ("Which planet do we live on?", "We live on the planet Earth.", "Our home planet is Earth.",
     ["We live on the planet Mars.", "We live on the planet Venus.", "We live on the planet Jupiter."]),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders walk on eight legs.",
     ["A spider has six legs.", "A spider has four legs.", "A spider has ten legs."]),
    ("What do bees make?", "Bees make honey.", "Honey is made by bees.",
     ["Bees make milk.", "Bees make silk.", "Bees make wool."]),
    ("What is the opposite of hot?", "The opposite of hot is cold.", "Cold is the opposite of hot.",
     ["The opposite of hot is warm.", "The opposite of hot is wet.", "The opposite of hot is loud."]),
    ("Which animal is known as the king of the jungle?", "The lion is the king of the jungle.",
     "The king of the jungle is the lion.",
     ["The mouse is the king of the jungle.", "The goat is the king of the jungle.",
      "The owl is the king of the jungle."]),
    ("What is two plus two?", "Two plus two is four.", "Adding two and two gives four.",
     ["Two plus two is five.", "Two plus two is three.", "Two plus two is six."]),
    ("What gas do plants take in?", "Plants take in carbon dioxide.", "Carbon dioxide is taken in by plants.",
     ["Plants take in helium.", "Plants take in neon.", "Plants take in argon."]),
    ("How many months are in a year?", "A year has twelve months.", "There are twelve months in a year.",
     ["A year has ten months.", "A year has eight months.", "A year has fourteen months."]),
]
WORLD_FACTS = [{"question": q, "answer": a, "paraphrased_answer": p, "perturbed_answer": list(w)}
               for q, a, p, w in _WORLD_FACTS]


def _name(rng: random.Random, used: set) -> str:
    while True:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice([2, 3]))).capitalize()
        full = f"{first} {last}"
        if full not in used:
            used.add(full)
            return full


def _author(rng: random.Random, used: set) -> dict[str, str]:
    return {
        "name": _name(rng, used),
        "birthplace": rng.choice(_PLACES),
        "genre": rng.choice(_GENRES),
        "book": f"{rng.choice(_TITLE_A)} {rng.choice(_TITLE_B)}",
        "award": rng.choice(_AWARDS),
        "job": rng.choice(_JOBS),
    }


_POOLS = {"birthplace": _PLACES, "genre": _GENRES, "award": _AWARDS, "job": _JOBS,
          "book": [f"{a} {b}" for a in _TITLE_A for b in _TITLE_B]}


def make_fictitious_authors(n_authors: int = 40, *, seed: int = 0, n_perturbed: int = 3) -> dict[str, Any]:
    """Generate the benchmark: ``{"authors": [...], "full": [...], "forget01"/"05"/"10": [...],
    "retain99"/"95"/"90": [...], "retain": retain90, "world_facts": [...]}``.

    Each QA item: ``question``, ``answer``, ``paraphrased_answer``, ``perturbed_answer`` (list of
    ``n_perturbed`` wrong answers), ``author`` (index). Deterministic in ``seed``.
    """
    if isinstance(n_authors, bool) or not isinstance(n_authors, int) or n_authors < 2:
        raise ValueError(f"n_authors must be an int >= 2, got {n_authors!r}")
    if n_perturbed < 1:
        raise ValueError(f"n_perturbed must be >= 1, got {n_perturbed}")
    rng = random.Random(seed)
    used: set = set()
    authors = [_author(rng, used) for _ in range(n_authors)]
    full = []
    for ai, a in enumerate(authors):
        for q, ans, para, key in _TEMPLATES:
            wrong_pool = [v for v in _POOLS[key] if v != a[key]]
            wrong = rng.sample(wrong_pool, n_perturbed)
            full.append({
                "question": q.format(**a),
                "answer": ans.format(**a),
                "paraphrased_answer": para.format(**a),
                "perturbed_answer": [ans.format(**{**a, key: w}) for w in wrong],
                "author": ai,
            })
    world = [dict(f, perturbed_answer=list(f["perturbed_answer"])) for f in WORLD_FACTS]
    out: dict[str, Any] = {"authors": authors, "full": full, "world_facts": world}
    for split, frac in FORGET_SPLITS.items():
        n_forget = max(1, round(frac * n_authors))
        out[split] = [x for x in full if x["author"] < n_forget]
        out["retain" + str(100 - int(round(frac * 100))).zfill(2)] = [x for x in full if x["author"] >= n_forget]
    out["retain"] = out["retain90"]
    return out

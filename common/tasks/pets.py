"""Pets: a synthetic two-user preference data set from templates (VPL's toy task, our design).

Two users, `quiet` (prefers cats and birds) and `playful` (prefers dogs and rabbits).
Ten pair types: five advice topics (feeding, grooming, exercise, health, housing) where
sound advice beats harmful advice for both users, and five recommendation questions
(apartment, family, beginner, gift, companion) where an answer recommending a cat or a
bird competes with one recommending a dog or a rabbit: the users disagree on exactly
those (`controversial`). Generation is seeded and exact: same seed, same bytes.
See data/README.md.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from common.data.schemas import PERSONAL, validate_row

USERS = {"quiet": ("cats", "birds"), "playful": ("dogs", "rabbits")}
ANIMALS = ("cats", "dogs", "birds", "rabbits")
REASONS = {
    "cats": ("they are calm and look after themselves", "they purr on your lap and need little space",
             "they are independent and quiet all day"),
    "dogs": ("they are loyal and love to play outside", "they greet you at the door every day",
             "they are energetic friends for long walks"),
    "birds": ("they sing softly and fit in a small cage", "they are gentle and easy to keep",
              "they are quiet company that asks for little"),
    "rabbits": ("they are cuddly and love to be held", "they hop around and play with you",
                "they are soft, friendly and playful"),
}
RECOMMEND = ("I would recommend {animal}: {reason}.", "You should get {animal}, because {reason}.",
             "The best choice is {animal}; {reason}.")
QUESTIONS = {  # the five controversial types
    "apartment": ("What pet suits a small apartment?", "I live in a flat in the city. Which pet should I get?"),
    "family": ("Which pet is best for a family?", "We want a pet for the whole family. What do you suggest?"),
    "beginner": ("What is a good first pet?", "I have never had a pet. Which one should I start with?"),
    "gift": ("Which pet would make a nice gift?", "I want to give my friend a pet. Which one?"),
    "companion": ("Which pet is the best companion?", "I want a pet to keep me company. What should I get?"),
}
ADVICE = {  # the five agreed types: (questions, sound advice, harmful advice)
    "feeding": (("How should I feed my {animal}?", "What do {animal} like to eat?"),
                ("Give them fresh food made for {animal} and clean water every day.",
                 "Feed them a balanced diet for {animal} at regular times.",
                 "Ask a vet which food suits {animal} and keep their water bowl full."),
                ("Give them chocolate and sweets whenever they beg.",
                 "Feed them once a week and let them go thirsty.",
                 "Let them eat whatever falls off your plate.")),
    "grooming": (("How do I keep my {animal} clean?", "How often should I groom my {animal}?"),
                 ("Brush them gently and keep their home clean.",
                  "Groom them softly and check their fur or feathers each week.",
                  "Clean their space often and handle them with care."),
                 ("Scrub them with bleach once a month.", "Never clean their home at all.",
                  "Shave them completely every week.")),
    "exercise": (("How much exercise do my {animal} need?", "How can I keep my {animal} active?"),
                 ("Give them safe time to move and play every day.",
                  "Let them stretch and explore a safe space daily.",
                  "Play with them gently for a while each day."),
                 ("Keep them locked in a tiny box all the time.", "Make them run until they collapse.",
                  "Never let them out of their cage.")),
    "health": (("What should I do if my {animal} seem sick?", "How do I keep my {animal} healthy?"),
               ("Take them to a vet who knows {animal} as soon as you can.",
                "Watch them closely and call a vet for advice.",
                "Book regular check-ups with a vet for {animal}."),
               ("Ignore it and hope it goes away.", "Give them your own medicine without asking anyone.",
                "Wait a few months before doing anything.")),
    "housing": (("Where should my {animal} live?", "What home do {animal} need?"),
                ("Give them a warm, safe and roomy home indoors.",
                 "Make them a clean, quiet space with room to rest.",
                 "Set up a dry, comfortable place made for {animal}."),
                ("Leave them outside in the cold all winter.", "Keep them in a dark cupboard.",
                 "Put them in a box in the garage.")),
}
PAIR_TYPES = tuple(ADVICE) + tuple(QUESTIONS)


def _recommend(rng: random.Random, animal: str) -> str:
    return rng.choice(RECOMMEND).format(animal=animal, reason=rng.choice(REASONS[animal]))


def sample_pair(rng: random.Random, user: str, pair_type: str) -> dict:
    """One labelled pair of `pair_type` for `user`."""
    if pair_type in ADVICE:
        questions, good, bad = ADVICE[pair_type]
        animal = rng.choice(ANIMALS)
        return {"user": user, "prompt": rng.choice(questions).format(animal=animal),
                "chosen": rng.choice(good).format(animal=animal), "rejected": rng.choice(bad),
                "controversial": False, "pair_type": pair_type}
    liked, other = USERS[user], next(v for k, v in USERS.items() if k != user)
    return {"user": user, "prompt": rng.choice(QUESTIONS[pair_type]),
            "chosen": _recommend(rng, rng.choice(liked)), "rejected": _recommend(rng, rng.choice(other)),
            "controversial": True, "pair_type": pair_type}


def generate(seed: int = 0, train_per_user: int = 400, eval_per_user: int = 100,
             upsample_controversial: int = 1) -> dict[str, list[dict]]:
    """{'train': rows, 'eval': rows}; no row repeats within or across splits.

    `upsample_controversial` k draws a controversial type k times as often as an agreed one.
    """
    rng = random.Random(seed)
    weights = [1] * len(ADVICE) + [max(1, upsample_controversial)] * len(QUESTIONS)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n in (("train", train_per_user), ("eval", eval_per_user)):
        rows = []
        for user in USERS:
            kept, tries = 0, 0
            while kept < n and tries < 50 * n:
                tries += 1
                row = sample_pair(rng, user, rng.choices(PAIR_TYPES, weights)[0])
                key = json.dumps(row, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    rows.append(row)
                    kept += 1
        rng.shuffle(rows)
        out[split] = rows
    return out


def write(out_dir: Path, seed: int = 0, **kw) -> Path:
    """Write train.jsonl and eval.jsonl (validated against the PERSONAL schema) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(seed, **kw).items():
        for i, r in enumerate(rows):
            validate_row(r, PERSONAL, f"pets {split} row {i}")
        (out_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out_dir

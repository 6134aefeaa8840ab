"""The offline demo's preference data set, written by this project for a TinyStories-style model.

Each prompt starts a story. Chosen and rejected continue it with the same events in the same words;
chosen tells them in short sentences, rejected strings them into one run-on sentence with "and then".
TextDescriptives sees the difference (sentence length, sentence count, conjunctions, readability),
so a DPO adapter that learnt the preference should move the model's own stories the same way.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = [("Lily", "she"), ("Tom", "he"), ("Sue", "she"), ("Ben", "he"), ("Mia", "she"), ("Max", "he"),
         ("Anna", "she"), ("Sam", "he"), ("Lucy", "she"), ("Tim", "he")]
ANIMALS = ["dog", "cat", "bird", "bunny", "bear", "fox", "duck", "frog"]
ADJECTIVES = ["little", "happy", "small", "big", "kind", "brave", "funny", "shy"]
PLACES = ["park", "garden", "forest", "lake", "house", "school", "beach", "hill"]
THINGS = ["ball", "toy", "kite", "box", "hat", "flower", "cake", "book"]
COLORS = ["red", "blue", "green", "yellow", "pink", "big", "shiny", "soft"]
EVENTS = [
    "{p} went to the {place}", "{p} saw a {color} {thing}", "{p} wanted to play with it",
    "{p} ran to {f} mom", "{p} found a {animal} in the {place}", "the {animal} was sad",
    "{p} gave the {animal} a {thing}", "the {animal} smiled at {o}", "{p} felt very happy",
    "they played all day", "the sun was warm", "{p} went home to sleep", "{p} said thank you",
    "{p} shared the {thing} with {f} friend", "{p} looked up at the sky",
]
PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "him", "his")}


def _story(rng: random.Random) -> tuple[str, list[str]]:
    name, gender = rng.choice(NAMES)
    subject, obj, possessive = PRONOUNS[gender]
    words = {"animal": rng.choice(ANIMALS), "place": rng.choice(PLACES), "thing": rng.choice(THINGS),
             "color": rng.choice(COLORS), "o": obj, "f": possessive}
    prompt = f"Once upon a time, there was a {rng.choice(ADJECTIVES)} {words['animal']} named {name}."
    prompt = rng.choice([prompt, f"One day, {name} went outside to play.", f"{name} had a {words['color']} "
                                                                              f"{words['thing']}."])
    events = [e.format(p=subject, **words) for e in rng.sample(EVENTS, rng.randint(5, 7))]
    return prompt, events


def _short_sentences(events: list[str]) -> str:
    return " ".join(e[0].upper() + e[1:] + "." for e in events)


def _run_on(events: list[str]) -> str:
    text = " and then ".join(events)
    return text[0].upper() + text[1:] + " and then they all went home and then they all went home."


def demo_records(n: int = 400, seed: int = 0) -> list[dict]:
    """n preference records in trl's standard format (prompt, chosen, rejected)."""
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < n:
        prompt, events = _story(rng)
        chosen, rejected = _short_sentences(events), _run_on(events)
        if (prompt, chosen) in seen:
            continue
        seen.add((prompt, chosen))
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def write_demo_dataset(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Write the demo data set as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_records(n, seed)))
    return path

"""The offline demo's preference data set, written by this project for a TinyStories-style model.

Each prompt starts a story. Chosen and rejected continue it with the same events in the same words;
chosen tells them in short sentences, rejected strings them into one run-on sentence with "and then".
TextDescriptives sees the difference (sentence length, sentence count, conjunctions, readability),
so a DPO adapter that learnt the preference should move the model's own stories the same way.

`reward_verdict` words the demo's last line: a reward model's verdict on tuned vs base answers.
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


def reward_verdict(block: dict, run: str, split: str = "valid", alpha: float = 0.05) -> str:
    """The demo's last line: a reward model's verdict on tuned vs base answers (summary.json's `reward_model`
    block of the run directory `run`), with its held-out accuracy first, as the reason to trust it or not.

    Accuracy, win rate and their CIs are printed with two decimals, the sign test's p with two significant
    digits; a figure that is null (NaN) in the block reads n/a or as no verdict. Where the accuracy CI reaches
    0.5 (chance), or lies below it, the line says that the verdict cannot be trusted."""
    b = (block.get("splits") or {}).get(split)
    if not b:
        return f"  reward model on {run}: no {split} pairs were scored, so it gives no verdict"
    b = {k: float("nan") if v is None else v for k, v in b.items()}  # summary.json writes NaN as null
    head = f"  reward model on {run} (accuracy on {b['n']} {split} pairs it was not trained on: "
    if not b["n"]:
        head += "n/a"
    else:
        head += f"{b['accuracy']:.2f} [{b['ci_low']:.2f}, {b['ci_high']:.2f}]"
    head += ")"
    if not b["win_n"]:
        return head + f": no base and tuned answers of {split} pairs to compare"
    p = b["p_value"]
    line = (f"{head}: tuned answers win {b['win_rate']:.2f} [{b['win_ci_low']:.2f}, {b['win_ci_high']:.2f}] of "
            f"{b['win_n']} {split} pairs against base (won {b['wins']}, lost {b['losses']}, tied {b['win_ties']}), "
            + ("sign test p = n/a" if p != p else f"sign test p = {p:.2g}"))
    if p == p and p < alpha:
        line += ": it prefers the tuned answers" if b["wins"] > b["losses"] else ": it prefers the base answers"
    else:
        line += (": no significant difference between tuned and base "
                 + ("(every pair tied)" if p != p else f"(p >= {alpha:g})"))
    if not b["n"]:
        line += ". Its accuracy on held-out pairs is unknown (none was scored), so its verdict cannot be trusted"
    elif not (b["ci_low"] > 0.5 or b["ci_high"] < 0.5):
        line += (". Its accuracy CI includes 0.5, chance: this reward model cannot tell chosen from rejected "
                 "reliably, so its verdict cannot be trusted")
    elif b["ci_high"] < 0.5:
        line += (". It prefers the rejected answers of held-out pairs (accuracy below 0.5): its verdict is reversed "
                 "and cannot be trusted")
    return line + "."

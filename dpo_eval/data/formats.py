"""Recognise a preference record's format by its fields and normalise it.

Every format becomes one `Pair`: the system prompt, the prompt's conversation turns (system
excluded), and the chosen and rejected answers as plain strings.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from dpo_eval.data.prompt_sets import TURNS, is_turns_record, turns_of
from dpo_eval.errors import DpoEvalError

FORMATS = {
    "orca": "Intel/orca_dpo_pairs: system, question, chosen, rejected",
    "openai": "OpenAI preference fine-tuning: input.messages, preferred_output, non_preferred_output",
    "hh-rlhf": "Anthropic hh-rlhf: chosen, rejected as whole '\\n\\nHuman: ... \\n\\nAssistant: ...' dialogues",
    "trl": "trl standard/conversational: prompt, chosen, rejected (strings or message lists), "
    "or chosen, rejected as message lists with an implicit prompt",
    "columns": "any fields, through an explicit --columns prompt=...,chosen=...,rejected=... mapping",
    "prompts": "questions without labels: prompt (text or message list) or question, optional system, or "
    "MT-Bench's turns (one or two user turns), category and reference; no chosen or rejected (tuned vs base "
    "only, or --reference-dataset for the direction)",
}
REQUIRED_FIELDS = {
    "orca": ("question", "chosen", "rejected"),
    "openai": ("input", "preferred_output", "non_preferred_output"),
    "hh-rlhf": ("chosen", "rejected"),
    "trl": ("chosen", "rejected"),
}
LABELS = ("chosen", "rejected")
HH_ASSISTANT = "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class Pair:
    system: str
    turns: tuple[tuple[str, str], ...]  # (role, content) of the prompt, system excluded
    chosen: str | None
    rejected: str | None
    split: str | None = None

    @property
    def prompt(self) -> str:
        """The prompt as one string: the user text, or a Human/Assistant transcript if multi-turn."""
        if len(self.turns) == 1 and self.turns[0][0] == "user":
            return self.turns[0][1]
        return transcript(self.turns)


def transcript(turns) -> str:
    """(role, text) turns as a Human/Assistant transcript, one turn a paragraph."""
    labels = {"user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{labels.get(role, role.title())}: {text}" for role, text in turns)


def detect_format(record: dict[str, Any], where: str) -> str:
    """The name of the format whose fields `record` has."""
    keys = set(record)
    if {"input", "preferred_output", "non_preferred_output"} <= keys:
        return "openai"
    if {"question", "chosen", "rejected"} <= keys:
        return "orca"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "trl"
    if {"chosen", "rejected"} <= keys:
        if isinstance(record["chosen"], list):
            return "trl"
        return "hh-rlhf"
    if (keys & {"prompt", "question"} and not keys & set(LABELS)) or is_turns_record(record):
        return "prompts"
    listed = "\n".join(f"  - {name}: {text}" for name, text in FORMATS.items())
    raise DpoEvalError(
        f"{where}: the fields {sorted(keys)} match no known preference format. Known formats:\n"
        f"{listed}\nPass --columns to map your fields."
    )


def normalise(record: dict[str, Any], fmt: str, columns: dict[str, str], where: str) -> Pair:
    """One record of format `fmt` as a Pair; raises DpoEvalError on missing fields or non-text values."""
    missing = [name for name in REQUIRED_FIELDS.get(fmt, ()) if name not in record]
    if missing:
        raise DpoEvalError(f"{where}: the {fmt} format (--format) needs the fields {missing}, which this record "
                           f"lacks (it has {sorted(record)}); use --format auto, another --format, or --columns")
    split = _opt_text(record.get(columns.get("split", "split")), where, "split")
    if fmt == "orca":
        return Pair(
            system=_opt_text(record.get("system"), where, "system") or "",
            turns=(("user", _text(record["question"], where, "question")),),
            chosen=_answer(record["chosen"], where, "chosen"),
            rejected=_answer(record["rejected"], where, "rejected"),
            split=split,
        )
    if fmt == "openai":
        inp = record["input"]
        if not isinstance(inp, dict) or "messages" not in inp:
            raise DpoEvalError(f"{where}: 'input' must be an object with 'messages'")
        system, turns = _split_messages(inp["messages"], where, "input.messages")
        return Pair(system, turns, _answer(record["preferred_output"], where, "preferred_output"),
                    _answer(record["non_preferred_output"], where, "non_preferred_output"), split)
    if fmt == "hh-rlhf":
        return _hh_rlhf(record, where, split)
    if fmt == "trl":
        return _trl(record, where, split)
    if fmt == "prompts":
        return _prompt_only(record, where, split)
    if fmt == "columns":
        missing = {"prompt", "chosen", "rejected"} - set(columns)
        if missing:
            raise DpoEvalError(f"--columns: map {sorted(missing)} too (e.g. prompt=instruction)")
        for target, source in columns.items():
            if source not in record:
                raise DpoEvalError(f"{where}: --columns maps {target} to '{source}', which is not among "
                                   f"its fields {sorted(record)}")
        mapped = {t: record[s] for t, s in columns.items() if t != "split"}
        pair = _trl(mapped, where, split)
        if "system" in columns:
            pair = Pair(_opt_text(mapped["system"], where, columns["system"]) or "", pair.turns,
                        pair.chosen, pair.rejected, split)
        return pair
    raise DpoEvalError(f"unknown --format '{fmt}'; use auto or one of {sorted(FORMATS)}")


def _trl(record: dict[str, Any], where: str, split: str | None) -> Pair:
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" not in record:  # implicit prompt: conversations sharing all but the last turn
        if not (_is_messages(chosen) and _is_messages(rejected)):
            raise DpoEvalError(f"{where}: without 'prompt', chosen and rejected must be message lists")
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        system, turns = _split_messages(chosen[:n], where, "chosen")
        return Pair(system, turns, _answer(chosen[n:], where, "chosen"),
                    _answer(rejected[n:], where, "rejected"), split)
    prompt = record["prompt"]
    if _is_messages(prompt):
        system, turns = _split_messages(prompt, where, "prompt")
    else:
        system, turns = "", (("user", _text(prompt, where, "prompt")),)
    return Pair(system, turns, _answer(chosen, where, "chosen"), _answer(rejected, where, "rejected"), split)


def _prompt_only(record: dict[str, Any], where: str, split: str | None) -> Pair:
    """A question without labels: prompt (text or messages) or question, optional system."""
    if TURNS in record and not {"prompt", "question"} & set(record):
        return Pair(_opt_text(record.get("system"), where, "system") or "",
                    (("user", turns_of(record, where)[0]),), None, None, split)
    field = "prompt" if "prompt" in record else "question"
    if field not in record:
        raise DpoEvalError(f"{where}: the prompts format needs a 'prompt' or 'question' field; it has {sorted(record)}")
    value = record[field]
    if _is_messages(value):
        system, turns = _split_messages(value, where, field)
    else:
        system, turns = "", (("user", _text(value, where, field)),)
    system = _opt_text(record.get("system"), where, "system") or system
    return Pair(system, turns, None, None, split)


def _hh_rlhf(record: dict[str, Any], where: str, split: str | None) -> Pair:
    chosen = _answer(record["chosen"], where, "chosen")
    rejected = _answer(record["rejected"], where, "rejected")
    if not chosen or not rejected:
        return Pair("", (), chosen, rejected, split)
    # The prompt is the dialogue both share, up to the last assistant label they have in common;
    # the answers are what follows. A final answer may itself contain "Human:" text.
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DpoEvalError(f"{where}: chosen and rejected share no '\\n\\nAssistant:' turn; "
                           "is this really hh-rlhf? Pass --format or --columns")
    prefix = chosen[:cut]
    parts = HH_TURN.split(prefix)
    turns = tuple(("user" if role == "Human" else "assistant", text.strip())
                  for role, text in zip(parts[1::2], parts[2::2]))
    return Pair("", turns, chosen[cut + len(HH_ASSISTANT):].strip(),
                rejected[cut + len(HH_ASSISTANT):].strip(), split)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value)


def _split_messages(messages: Any, where: str, field: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    if not _is_messages(messages):
        raise DpoEvalError(f"{where}: '{field}' must be a list of {{role, content}} messages")
    system = "\n\n".join(_text(m["content"], where, field) for m in messages if m.get("role") == "system")
    turns = tuple((str(m.get("role", "user")), _text(m["content"], where, field))
                  for m in messages if m.get("role") != "system")
    return system, turns


def _answer(value: Any, where: str, field: str) -> str | None:
    """An answer's text: a string, or the content of the last message of a message list."""
    if _is_messages(value):
        if not value:
            return None
        return _opt_text(value[-1]["content"], where, field)
    return _opt_text(value, where, field)


def _text(value: Any, where: str, field: str) -> str:
    text = _opt_text(value, where, field)
    if text is None:
        raise DpoEvalError(f"{where}: '{field}' is missing")
    return text


def _opt_text(value: Any, where: str, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DpoEvalError(f"{where}: '{field}' must be text, got {type(value).__name__} ({str(value)[:60]!r})")

"""The pairwise judge prompt: template, cutting texts to fit the judge's context, and reading the verdict.

A template is Jinja text rendering the judge's user message from `system` (the pair's system prompt, may
be empty), `prompt`, `answer_a` (shown first), `answer_b` and `reference` (a reference answer, "" where the pair
has none; dpo_eval.judges.references). A top-level `{% set judge_system = "..." %}`
in it sets the judge's system message (none without it). The project's own template asks for the verdict
as `[[A]]`, `[[B]]` or `[[tie]]`; `parse_verdict` reads that form or a bare label, and anything else is
`invalid`, never a tie.

Texts are cut by characters, not tokens (an API judge's tokenizer is not at hand): `context_chars` bounds
the whole rendered prompt, each answer gets `answer_share` of the room the template leaves, and the prompt
(with its system prompt) gets what the two answers leave. Answers keep their beginning; a prompt keeps its
beginning and end (the question often follows a long context). Every cut ends in CUT_MARK and is flagged.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dpo_eval.errors import DpoEvalError

CODE_VERSION = "judge-v1"  # bump with a change to the code that computes these values: every value cached before then misses (cutting, rendering, parsing)
DEFAULT_TEMPLATE = """\
{% set judge_system = "You are an impartial judge. You compare two answers to the same user prompt and \
decide which one is more helpful, correct and appropriate. Ignore the order in which they are shown and \
their length." %}
{% if system %}[System prompt given to the assistant]
{{ system }}

{% endif %}[User prompt]
{{ prompt }}

[Answer A]
{{ answer_a }}

[Answer B]
{{ answer_b }}

Which answer is better? Reply with the verdict only: [[A]], [[B]] or [[tie]]."""

CUT_MARK = " [...]"
LABELS = {"a": "first", "b": "second", "tie": "tie"}
MARKED = re.compile(r"\[\[\s*(A|B|tie)\s*\]\]", re.IGNORECASE)
BARE = re.compile(r"^\W*(A|B|tie)\W*$", re.IGNORECASE)
MIN_ROOM = 40  # characters: below this per answer, a verdict judges cut marks, not answers


@dataclass(frozen=True)
class JudgeTemplate:
    """A compiled judge template, its source text and its sha256 (part of the judge identity)."""

    template: jinja2.Template
    source: str
    sha: str
    origin: str  # the file it came from, or "default"


@dataclass(frozen=True)
class Rendered:
    """The chat messages of one judgment and whether any text in them was cut."""

    messages: list[dict]
    truncated: bool


def load_template(path: Path | None = None, default: str = DEFAULT_TEMPLATE, name: str = "default") -> JudgeTemplate:
    """The project's template (path None: `default`, called `name`) or a user's Jinja file; a syntax error names
    the file."""
    origin = name if path is None else str(path)
    if path is None:
        source = default
    else:
        try:
            source = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise DpoEvalError(f"--template {path}: cannot read it ({exc.strerror})") from exc
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise DpoEvalError(f"--template {origin}: Jinja syntax error on line {exc.lineno}: {exc.message}") from exc
    return JudgeTemplate(template, source, hashlib.sha256(source.encode("utf-8")).hexdigest(), origin)


def _messages(tpl: JudgeTemplate, system: str, prompt: str, answer_a: str, answer_b: str,
              reference: str = "") -> list[dict]:
    try:
        module = tpl.template.make_module({"system": system, "prompt": prompt, "answer_a": answer_a,
                                           "answer_b": answer_b, "reference": reference})
    except jinja2.TemplateError as exc:
        raise DpoEvalError(f"--template {tpl.origin}: cannot render it ({exc}); it may use system, prompt, "
                           "answer_a, answer_b and reference") from exc
    user = str(module).strip()
    judge_system = getattr(module, "judge_system", None)
    messages = [{"role": "system", "content": str(judge_system)}] if judge_system else []
    return messages + [{"role": "user", "content": user}]


def prompt_chars(messages: list[dict]) -> int:
    """Characters of the rendered judge prompt (all message contents)."""
    return sum(len(m["content"]) for m in messages)


def cut_end(text: str, limit: int) -> tuple[str, bool]:
    """`text` if it fits `limit` characters, else its beginning and CUT_MARK in exactly `limit` characters."""
    if len(text) <= limit:
        return text, False
    keep = max(limit - len(CUT_MARK), 0)
    return (text[:keep] + CUT_MARK)[:limit], True


def cut_middle(text: str, limit: int) -> tuple[str, bool]:
    """`text` if it fits `limit`, else its beginning, CUT_MARK and its end in exactly `limit` characters."""
    if len(text) <= limit:
        return text, False
    keep = max(limit - len(CUT_MARK), 0)
    head = math.ceil(keep / 2)
    tail = text[len(text) - (keep - head):] if keep - head else ""
    return (text[:head] + CUT_MARK + tail)[:limit], True


def render(tpl: JudgeTemplate, system: str, prompt: str, first: str, second: str, *, context_chars: int,
           answer_share: float, reference: str = "") -> Rendered:
    """The messages judging `first` (shown as A) against `second` (B), texts cut to fit `context_chars`.

    room = context_chars - the template's own characters; each answer keeps at most floor(answer_share *
    room) characters; the system prompt and the prompt share what the cut answers leave (the system prompt
    at most half of it when both do not fit). The cut depends on the texts, not on their order, so both
    orders of a pair are cut alike. A reference answer (reference-guided judging) keeps its beginning, at most
    as much as an answer and no more than the cut answers leave beyond MIN_ROOM for the prompt.
    """
    overhead = prompt_chars(_messages(tpl, "x", "x", "x", "x", "x" if reference else "")) - 4 - bool(reference)
    room = context_chars - overhead
    each = int(answer_share * room)
    if each < MIN_ROOM:
        raise DpoEvalError(f"context_chars {context_chars}: the judge template ({tpl.origin}) takes {overhead} "
                           f"characters and leaves {each} per answer (at least {MIN_ROOM} needed); raise "
                           "context_chars or answer_share, or shorten the template")
    first, cut_a = cut_end(first, each)
    second, cut_b = cut_end(second, each)
    reference, cut_r = cut_end(reference, max(min(each, room - len(first) - len(second) - MIN_ROOM), 0))
    left = room - len(first) - len(second) - len(reference)
    system_limit = len(system) if len(system) + len(prompt) <= left else min(len(system), left // 2)
    system, cut_s = cut_middle(system, system_limit)
    prompt, cut_p = cut_middle(prompt, left - len(system))
    messages = _messages(tpl, system, prompt, first, second, reference)
    return Rendered(messages, cut_a or cut_b or cut_s or cut_p or cut_r)


def parse_verdict(raw: str | None) -> str:
    """first (A), second (B), tie or invalid from the judge's reply.

    A reply naming exactly one distinct `[[A]]`, `[[B]]` or `[[tie]]` gives that verdict; two different
    ones are invalid. Without a marked verdict, a first line that is a bare label (`A`, `B.`, `**tie**`)
    gives it. Anything else (empty, prose, a story) is invalid.
    """
    text = (raw or "").strip()
    found = {label.lower() for label in MARKED.findall(text)}
    if found:
        return LABELS[found.pop()] if len(found) == 1 else "invalid"
    match = BARE.match(text.splitlines()[0]) if text else None
    return LABELS[match.group(1).lower()] if match else "invalid"


def _label(token: str) -> str | None:
    stripped = re.sub(r"[\W_]", "", token).lower()
    return stripped if stripped in ("a", "b", "tie") else None


def p_first(top_tokens: list[dict], verdict: str) -> float | None:
    """P(A) / (P(A) + P(B)) at the first answer token that is a label, from the API's logprobs.

    `top_tokens` is the choice's `logprobs.content`: [{token, logprob, top_logprobs: [{token, logprob}]}].
    At the first position whose chosen token is A, B or tie (punctuation and spaces stripped), P(label) sums
    exp(logprob) over the top alternatives that strip to that label. None where the verdict is invalid, no
    position holds a label, or neither A nor B is among the alternatives there.
    """
    if verdict == "invalid" or not top_tokens:
        return None
    for position in top_tokens:
        if _label(position.get("token") or "") is None:
            continue
        mass = {"a": 0.0, "b": 0.0}
        for alt in position.get("top_logprobs") or [{"token": position["token"], "logprob": position["logprob"]}]:
            label = _label(alt.get("token") or "")
            if label in mass:
                mass[label] += math.exp(alt["logprob"])
        total = mass["a"] + mass["b"]
        return mass["a"] / total if total > 0 else None
    return None

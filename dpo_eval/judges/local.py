"""Judge kind 3 (issue 12): a local Hugging Face causal LM as the pairwise judge, in this process, no server.

Rendering. The judge sees the same pairwise template as the API judge (`judge_prompt`: the project's
template or the user's `--template`), as the messages [judge system?, user]. They are rendered with the
judge model's chat template and its generation prompt; a template that rejects the system role gets the
system message folded into the user turn; a tokenizer without a chat template gets the plain format of
generation (`prompts.PLAIN_TEMPLATE`: "{judge system}\\n\\n{user message}\\n\\n"). The reply prefix is appended
after that, and the token ids carry exactly one leading BOS (the loader's PromptFormatter does all this, as
for generation). Which rendering was used is stated in summary.json (`judge.hf.rendering`).

Labels and reply prefix. The verdict is read at the position where the judge's reply would name its
verdict: after the reply prefix. A template may set both at its top level, as it sets `judge_system`:
`{% set judge_labels = ["A", "B"] %}` (the labels of the answer shown first and second) and
`{% set judge_reply_prefix = "[[" %}`. Defaults: labels A and B; the prefix "[[" where the rendered user
message asks for the first label as `[[A]]` (the project's template does), else "" (a bare label). The
first token of each label is taken in context (the label's text tokenized after the rendered prompt and
prefix: SentencePiece tokenizers give "A" and "▁A" different ids); the two must differ, else a
DpoEvalError names the labels and their tokens. The template's "tie" option is not read.

Verdict. One forward pass gives the next-token log-softmax at the last position; with lp_a, lp_b the
log-probabilities of the two labels' first tokens, p_first = P(A) / (P(A) + P(B)) = 1 / (1 + exp(lp_b - lp_a)).
Tie rule: a tie when |p_first - 0.5| <= tie_margin (JudgeSpec.tie_margin, default 0: a tie only when the
two labels are exactly equally probable); otherwise the more probable label (first for A, second for B).
A verdict is invalid only where a label's log-probability is not finite (broken logits: NaN or an infinity);
it is then not cached. The raw text records every other verdict in the parseable form ([[A]], [[B]] or [[tie]]) with
both log-probabilities, so judge.judgment_table reads the same verdict from a fresh or a cached reply.

Cutting. The whole input (rendered prompt plus reply prefix) must fit the token budget: the judge's
context (max_position_embeddings) or JudgeSpec.context_tokens. The texts are cut by judge_prompt.render's
own rules (each answer at most answer_share of the room, the prompt keeps its beginning and end, every cut
marked) at the largest character budget (found by bisection, to within 1% or 8 characters) whose rendering,
tokenized by the judge's real tokenizer, fits in both orders; so both orders of a pair are cut alike, and
every cut is flagged. JudgeSpec.context_chars is not used by this judge.

Batching. Inputs are sorted by length and run in batches of `batch_size`, left-padded with the loader's
pad token, with position ids counted from each row's first real token, in inference mode, keeping only the
last position's logits. prompt_tokens is the input's length, completion_tokens 0, latency_s the batch's
time shared equally among its rows.

Identity and cache. The judge's identity is dpo-eval's model identity of the judge (`identity.model_identity`
of a ModelSpec: files or hub commit, tokenizer and chat template, quantization, compute dtype, library
versions) plus the template sha, the labels, the reply prefix, the tie margin, the token budget, the answer
share and the rendering version. It keys the API judge's judgment cache (`judge_api.JudgmentCache`) through
`judge_api.judge_id` and `request_key`, so a rerun reads every judgment and makes no forward pass (the
weights are not even loaded); only the tokenizer is loaded to cut and key the prompts.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpo_eval.config import JudgeSpec, ModelSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.generation.models import load_model, load_tokenizer
from dpo_eval.generation.prompts import PLAIN_TEMPLATE, PromptFormatter
from dpo_eval.identity import DigestStore, model_identity
from dpo_eval.judges.api import JudgmentCache, Outcome, Reply, keep, plan_calls, request_record
from dpo_eval.judges.prompt import CODE_VERSION, MIN_ROOM, JudgeTemplate, parse_verdict, prompt_chars, render
from dpo_eval.locations import is_local_path

log = logging.getLogger(__name__)
RENDERING = "hf-judge-v1"  # bump when the rendering, cutting or verdict rule below changes
DEFAULT_LABELS = ("A", "B")
MARKED_PREFIX = "[["
MARKS = {"first": "[[A]]", "second": "[[B]]", "tie": "[[tie]]"}
TIE_RULE = ("tie when |p_first - 0.5| <= tie_margin, p_first = P(label A) / (P(label A) + P(label B)) from the "
            "next-token log-probabilities of the labels' first tokens; otherwise the more probable label")
NO_CONTEXT = 10_000_000  # tokenizers without a limit report about 1e30


@dataclass
class HFOutcome(Outcome):
    """judge_api.Outcome plus what the summary's `hf` block reports."""

    extra: dict = field(default_factory=dict)


def verdict_of(lp_a: float, lp_b: float, tie_margin: float = 0.0) -> tuple[str, float]:
    """(verdict, p_first) from the two labels' log-probabilities (see the module docstring's tie rule); invalid
    with p_first NaN where either is not finite (NaN or an infinity: a log-softmax of finite logits never gives one,
    so the model's logits broke and there is no verdict to read)."""
    if not (math.isfinite(lp_a) and math.isfinite(lp_b)):
        return "invalid", float("nan")
    p = 1.0 / (1.0 + math.exp(lp_b - lp_a)) if lp_b - lp_a < 700 else 0.0
    if abs(p - 0.5) <= tie_margin:
        return "tie", p
    return ("first" if p > 0.5 else "second"), p


def raw_text(verdict: str, lp_a: float, lp_b: float, p: float, labels: tuple[str, str], prefix: str) -> str:
    """The judgment's raw text: the verdict in the parser's form, then the numbers it came from."""
    if verdict == "invalid":  # no mark, so parse_verdict reads it as invalid too
        return (f"no verdict: log-probabilities not finite after the reply prefix {prefix!r}: "
                f"log P({labels[0]!r}) = {lp_a}, log P({labels[1]!r}) = {lp_b}")
    text = (f"{MARKS[verdict]} from next-token log-probabilities after the reply prefix {prefix!r}: "
            f"log P({labels[0]!r}) = {lp_a:.6f}, log P({labels[1]!r}) = {lp_b:.6f}, p_first = {p:.6f}")
    if parse_verdict(text) != verdict:  # a label that looks like a verdict mark: keep the numbers only
        text = f"{MARKS[verdict]} log P(first label) = {lp_a:.6f}, log P(second label) = {lp_b:.6f}"
    return text


def template_labels(template: JudgeTemplate) -> tuple[tuple[str, str], str]:
    """(labels, reply prefix) set by the template, or the defaults (see the module docstring)."""
    try:
        module = template.template.make_module({"system": "", "prompt": "x", "answer_a": "x", "answer_b": "x",
                                                 "reference": ""})
    except Exception as exc:  # jinja raises several types; judge_prompt reports the same failure in its words
        raise DpoEvalError(f"--template {template.origin}: cannot render it ({exc}); it may use system, prompt, "
                           "answer_a and answer_b") from exc
    labels = getattr(module, "judge_labels", None)
    if labels is None:
        labels = DEFAULT_LABELS
    if (isinstance(labels, str) or not hasattr(labels, "__len__") or len(labels) != 2
            or not all(isinstance(label, str) and label.strip() for label in labels) or labels[0] == labels[1]):
        raise DpoEvalError(f"--template {template.origin}: judge_labels must be two different non-empty strings "
                           f"(the labels of the answers shown first and second), e.g. ['A', 'B']; got {labels!r}")
    prefix = getattr(module, "judge_reply_prefix", None)
    if prefix is None:
        prefix = MARKED_PREFIX if f"[[{labels[0]}]]" in str(module) else ""
    if not isinstance(prefix, str):
        raise DpoEvalError(f"--template {template.origin}: judge_reply_prefix must be a string; got {prefix!r}")
    return (str(labels[0]), str(labels[1])), prefix


class HFJudge:
    """A local judge model by identity: tokenizer, labels and cutting at once, weights only when needed."""

    def __init__(self, spec: JudgeSpec, template: JudgeTemplate):
        self.spec, self.template = spec, template
        if is_local_path(spec.model) and not Path(spec.model).expanduser().is_dir():
            raise DpoEvalError(f"--judge-model {spec.model}: no such model folder (give a local folder or a hub id)")
        self.model_spec = ModelSpec(base=spec.model, quantization=spec.quantization, compute_dtype=spec.compute_dtype)
        self.repairs: list[str] = []
        self.model_identity = model_identity(self.model_spec, DigestStore(spec.cache_dir) if spec.cache_dir else None)
        try:
            pinned = self.model_identity.commit("base")  # the commit the identity resolved (None: a local folder)
            self.tokenizer = load_tokenizer(self.model_spec.model_copy(update={"revision": pinned})
                                            if pinned else self.model_spec, self.repairs)
            self.context = self._context()
        except OSError as exc:
            raise DpoEvalError(f"--judge-model {spec.model}: cannot load its tokenizer or config ({str(exc)[:300]}); "
                               "a hub id needs network access or the local hub cache") from None
        self.formatter = PromptFormatter(self.tokenizer, None, self.repairs)
        # The judge command has no --prompt-template: say what the plain format is, not how generation overrides it.
        self.repairs[:] = [note.replace(" (override with --prompt-template)", "") for note in self.repairs]
        self.rendering = ("chat template" if self.formatter.use_chat else
                          f"plain format {PLAIN_TEMPLATE!r} (the tokenizer has no chat template)")
        self.budget = min(spec.context_tokens or self.context, self.context)
        self.labels, self.prefix = template_labels(template)
        self.overhead = prompt_chars(render(template, "x", "x", "x", "x", context_chars=10**9,
                                            answer_share=spec.answer_share).messages) - 4
        self.label_ids = self._label_tokens()
        model = Path(spec.model).expanduser().name if is_local_path(spec.model) else spec.model
        self.identity = {"kind": "hf", "model": model, "weights": self.model_identity.base_key,
                         "template_sha": template.sha, "labels": list(self.labels), "reply_prefix": self.prefix,
                         "label_tokens": list(self.label_ids), "tie_margin": spec.tie_margin,
                         "context_tokens": self.budget, "answer_share": spec.answer_share, "rendering": RENDERING,
                         "code": CODE_VERSION}
        self.loaded = None
        self.forward_passes = 0

    # -- the tokenizer side: context, rendering, labels, cutting ------------------------------------
    def _context(self) -> int:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.spec.model).get_text_config()
        context = int(getattr(config, "max_position_embeddings", 0) or self.tokenizer.model_max_length or 0)
        if not context or context >= NO_CONTEXT:
            if self.spec.context_tokens is None:
                raise DpoEvalError(f"--judge-model {self.spec.model}: its config gives no context length; "
                                   "give --context-tokens")
            context = self.spec.context_tokens
        return context

    def text(self, messages: list[dict]) -> str:
        """The judge input as text: messages rendered (chat template or plain format) plus the reply prefix."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        return self.formatter.render(system, turns) + self.prefix

    def encode(self, messages: list[dict]) -> list[int]:
        return self.formatter.encode(self.text(messages), NO_CONTEXT).ids

    def _label_tokens(self) -> tuple[int, int]:
        """The first token of each label where the verdict is read; distinct, or a DpoEvalError."""
        probe = self.text(render(self.template, "", "x", "x", "x", context_chars=10**9,
                                 answer_share=self.spec.answer_share).messages)
        context = self.formatter.encode(probe, NO_CONTEXT).ids
        firsts = []
        for label in self.labels:
            ids = self.formatter.encode(probe + label, NO_CONTEXT).ids
            if ids[:len(context)] != context or len(ids) == len(context):
                raise DpoEvalError(
                    f"judge label {label!r} merges with the text before it in {self.spec.model}'s tokenizer (reply "
                    f"prefix {self.prefix!r}): its first token cannot be read after the prompt. Change the label or "
                    "the template's judge_reply_prefix")
            firsts.append(ids[len(context)])
        if firsts[0] == firsts[1]:
            token = self.tokenizer.convert_ids_to_tokens(firsts[0])
            tokens = [self.tokenizer.convert_ids_to_tokens(self.formatter.encode(probe + label, NO_CONTEXT).ids
                                                           [len(context):]) for label in self.labels]
            raise DpoEvalError(
                f"judge labels {self.labels[0]!r} and {self.labels[1]!r} share their first token {token!r} (id "
                f"{firsts[0]}) in {self.spec.model}'s tokenizer after the reply prefix {self.prefix!r} (tokens "
                f"{tokens[0]} and {tokens[1]}): the next-token log-probabilities cannot tell them apart. Use labels "
                "whose first tokens differ ({% set judge_labels = [...] %} in the template)")
        return firsts[0], firsts[1]

    def fit(self, row: dict) -> list:
        """Both orders of a comparison row rendered at the largest character budget (to within 1% or 8
        characters) whose token ids fit the token budget in both orders: [(rendered, ids) for ab, ba]."""
        system, prompt, (first, second) = row["system"], row["prompt"], row["texts"]
        reference = row.get("reference") or ""  # reference-guided judging (dpo_eval.judges.references)
        share = self.spec.answer_share
        longest_answer = max(len(first), len(second), len(reference), MIN_ROOM)
        full = self.overhead + math.ceil(longest_answer / share) + len(first) + len(second) + len(system) + \
            len(prompt) + 2  # a budget that cuts nothing (and that render accepts) ...
        full += 2 * len(reference) + MIN_ROOM + 400 if reference else 0  # ... with the reference and its wording
        best, fits, fails, chars = None, None, None, full
        for _ in range(60):
            try:
                both = [render(self.template, system, prompt, a, b, context_chars=chars, answer_share=share,
                               reference=reference)
                        for a, b in ((first, second), (second, first))]
            except DpoEvalError:
                if best is not None:
                    break
                raise DpoEvalError(
                    f"pair {row['pair_id']}: the judge template ({self.template.origin}) and {self.rendering} "
                    f"leave too little room in {self.budget} tokens (the judge's context or --context-tokens) for "
                    "the texts; give a larger --context-tokens, a shorter template or a judge with a longer "
                    "context") from None
            ids = [self.encode(r.messages) for r in both]
            longest = max(len(i) for i in ids)
            if longest <= self.budget:
                best, fits = list(zip(both, ids)), chars
                if fails is None or fails - fits <= max(8, fits // 100):
                    break
                chars = (fits + fails) // 2
            else:
                fails = chars
                chars = (fits + fails) // 2 if fits is not None else min(
                    chars - 1, int(chars * self.budget / longest))
        if best is None:
            raise DpoEvalError(f"pair {row['pair_id']}: cannot cut the judge prompt to {self.budget} tokens")
        return best

    def build_requests(self, rows: list[dict], judge: str) -> list[dict]:
        """judge.build_requests for this judge: per row its ab and ba judgments, cut in tokens, with their ids."""
        requests = []
        for row in rows:
            for order, (i, j), (rendered, ids) in zip(("ab", "ba"), ((0, 1), (1, 0)), self.fit(row)):
                requests.append(request_record(row, order, i, j, rendered, judge, ids=ids))
        self.formatter.record_counts(self.budget)
        return requests

    # -- the model side: load once, forward in batches ----------------------------------------------
    def load(self):
        if self.loaded is None:
            self.loaded = load_model(self.model_spec, self.model_identity)
            for note in self.loaded.repairs:
                if note not in self.repairs:
                    self.repairs.append(note)
        return self.loaded

    def forward(self, batch: list[list[int]]) -> list[tuple[float, float]]:
        """(lp_a, lp_b) at the next position after each input of `batch` (one left-padded forward pass)."""
        import torch

        from dpo_eval.generation.padding import left_padded

        loaded = self.load()
        model, pad = loaded.model, loaded.tokenizer.pad_token_id
        device = next(model.parameters()).device
        input_ids, mask = left_padded(batch, pad)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                  "position_ids": positions.to(device), "use_cache": False}
        with torch.inference_mode():
            try:
                logits = model(**inputs, logits_to_keep=1).logits
            except TypeError:  # a model class without logits_to_keep
                logits = model(**inputs).logits
            logp = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
            pair = logp[:, list(self.label_ids)].double().cpu().tolist()
        self.forward_passes += 1
        return [(a, b) for a, b in pair]

    def run(self, requests: list[dict], cache: JudgmentCache, judge: str, *, max_calls: int | None) -> HFOutcome:
        """Replies to every request: cached ones read, the rest computed (at most `max_calls` judgments) in
        batches sorted by length, each batch cached as it is made."""
        by_key = {req["key"]: req["ids"] for req in requests}
        outcome, allowed = plan_calls(list(by_key), cache, max_calls, unit="judgments", kind=HFOutcome)
        log.info("judge %s: %d cached, %d to compute now, %d over budget", judge, len(outcome.replies),
                 len(allowed), outcome.pending)
        allowed.sort(key=lambda key: -len(by_key[key]))
        if allowed:
            self.load()  # before the clock starts: latency_s is the forward passes' time, not the load's
        for start in range(0, len(allowed), self.spec.batch_size):
            keys = allowed[start:start + self.spec.batch_size]
            began = time.perf_counter()
            logprobs = self.forward([by_key[key] for key in keys])
            share = (time.perf_counter() - began) / len(keys)
            for key, (lp_a, lp_b) in zip(keys, logprobs):
                verdict, p = verdict_of(lp_a, lp_b, self.spec.tie_margin)
                reply = Reply(raw_text(verdict, lp_a, lp_b, p, self.labels, self.prefix), p, len(by_key[key]), 0,
                              share)
                keep(cache, key, judge, reply)  # an invalid verdict is computed again next run
                outcome.replies[key] = reply
                outcome.calls += 1
        outcome.pending = sum(key not in outcome.replies for key in by_key)
        outcome.extra = {"hf": self.describe()}
        return outcome

    def describe(self) -> dict:
        """The `hf` block of summary.json's judge: how verdicts were read and what this run did."""
        tokens = [self.tokenizer.convert_ids_to_tokens(i) for i in self.label_ids]
        return {"rendering": self.rendering, "labels": list(self.labels), "label_tokens": tokens,
                "label_token_ids": list(self.label_ids), "reply_prefix": self.prefix, "tie_rule": TIE_RULE,
                "tie_margin": self.spec.tie_margin, "context_tokens": self.budget,
                "quantization": self.spec.quantization, "compute_dtype": self.spec.compute_dtype,
                "batch_size": self.spec.batch_size, "forward_passes": self.forward_passes,
                "weights_loaded": self.loaded is not None, "model_key": self.model_identity.base_key,
                "repairs": list(self.repairs)}

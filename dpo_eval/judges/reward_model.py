"""Judge kind 1 (issue 12): a reward model scores (prompt, answer) for all four roles of a run.

A reward model is an `AutoModelForSequenceClassification` with one output, as trl's RewardTrainer
saves it and as public reward models ship (a local folder or a hub id). Anything else (two or more
outputs, a causal LM whose score head would be random) is refused with a DpoEvalError.

Rendering. With a chat template the conversation [system?, prompt turns..., assistant: answer] is
rendered by the reward model's template (no generation prompt; a template that rejects the system role
gets the system prompt folded into the first user turn, as generation does). Without one, the plain
format of generation (`prompts.PLAIN_TEMPLATE`: "{system}\\n\\n{prompt}\\n\\n") followed by the answer
and the EOS token, as trl's RewardTrainer appends EOS to plain-text examples. Token ids carry exactly
one leading BOS where the tokenizer uses one.

Truncation. trl 1.x's RewardTrainer does not cut anything: it drops training pairs longer than
`max_length`. A scorer may not drop a record, so a sequence longer than the context (the model's
`max_position_embeddings`, or the `max_length` it was trained with) is cut from the LEFT, trl's
`keep_end` mode: the BOS is kept, then the last tokens, so the answer's end, where the score is read,
is always seen and the prompt's start is what goes. Every cut is counted and flagged
(`reward_scores.parquet`: truncated).

Scoring runs in inference mode, in batches padded on the right with the model's own pad id (so the
classifier finds the last real token and positions never move: scores do not depend on the batch
size), sorted by length.

Identity and cache. The model's identity (file digests of a local folder through
`identity.DigestStore`, or the hub commit; context, truncation mode, dtype, rendering version,
library versions) keys a content cache of scores on disk: (system, prompt turns, answer) -> score.
A rerun scores nothing and loads no weights; a new checkpoint scores only its new answers.

`dpo_eval.studies.reward_scores.reward_judge_run(run_dir, model)` adds the scores to features.parquet as the column `reward_model`
(family `reward_model`), re-runs the run's statistics on it unchanged, and records the reward model's
calibration in summary.json (see `calibration`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from dpo_eval.config import default_cache_dir
from dpo_eval.errors import DpoEvalError
from dpo_eval.identity import DigestStore, library_versions, source_identity
from dpo_eval.jsonsafe import json_key
from dpo_eval.sqlite_table import open_table

FEATURE = "reward_model"
FAMILY = "reward_model"  # dpo_eval.scoring.features.JUDGE_FAMILIES maps the feature to it
ROLES = ("chosen", "rejected", "base", "tuned")
TRUNCATION = "keep_end"  # left truncation, BOS kept (see the module docstring)
RENDERING = "reward-v1"  # bump when the rendering below changes: old cached scores then miss
TRAINING_METADATA = "dpo_eval_reward_training.json"  # written by reward_training; not part of the identity
SCORES_FILE = "reward_scores.parquet"
ACCURACY_METHOD = ("share of pairs with score(chosen) > score(rejected); ties (equal scores) count as not "
                   "correct and are stated; Wilson score CI (a bootstrap of 29 correct of 29 would give [1, 1])")
WIN_METHOD = ("share of pairs with score(tuned) > score(base), ties half; Wilson score CI on wins + ties/2; "
              "two-sided sign test of wins vs losses (scipy.stats.binomtest, p = 1/2), ties excluded")


@dataclass(frozen=True)
class Item:
    """One (prompt, answer) to score: the system prompt, the prompt's turns (JSON), the answer."""

    system: str
    messages: str
    answer: str

    @property
    def key(self) -> str:
        payload = json.dumps([self.system or "", self.messages, self.answer], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class Scores:
    """Scores of a list of items, in order. misses: distinct items the model ran on; hits: the other items
    (found in the cache, or repeating an item of the same call, e.g. identical base and tuned answers)."""

    score: np.ndarray
    truncated: np.ndarray
    n_tokens: np.ndarray
    hits: int = 0
    misses: int = 0
    repairs: list[str] = field(default_factory=list)


def _config(name: str, revision: str | None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as exc:
        raise DpoEvalError(f"--reward-model {name}: cannot read its config ({str(exc)[:300]}); give a model "
                           "folder or a hub id (a hub id needs network access or the local hub cache)") from None


def check_reward_config(config, name: str) -> None:
    """Refuse what is not a one-output sequence classifier."""
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise DpoEvalError(f"--reward-model {name} is a {architectures[0]}, not a sequence classifier: loaded as "
                           "one, its score head would be randomly initialised. Give a reward model "
                           "(AutoModelForSequenceClassification with one output, e.g. trained with "
                           "`dpo-eval train-reward`)")
    if getattr(config, "num_labels", None) != 1:
        raise DpoEvalError(f"--reward-model {name} has {config.num_labels} outputs (num_labels={config.num_labels}); "
                           "a reward model has exactly one (a scalar score per sequence). A classifier with several "
                           "labels is not a reward model")


class RewardScorer:
    """A reward model by identity; its weights are loaded only when a score is not in the cache."""

    def __init__(self, name: str | Path, *, revision: str | None = None, max_length: int | None = None,
                 dtype: str = "float32", batch_size: int = 8, cache: bool = True, cache_dir: Path | None = None,
                 store: DigestStore | None = None):
        self.name, self.revision, self.dtype, self.batch_size = str(name), revision, dtype, batch_size
        self.cache = cache
        self.cache_path = Path(cache_dir or default_cache_dir()) / "reward-scores.sqlite"
        self.repairs: list[str] = []
        config = _config(self.name, revision)
        check_reward_config(config, self.name)
        folder = Path(self.name).expanduser()
        trained = folder / TRAINING_METADATA
        metadata = json.loads(trained.read_text()) if trained.is_file() else {}
        context = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        self.max_length = max_length or metadata.get("max_length") or context
        if not self.max_length:
            raise DpoEvalError(f"--reward-model {name}: its config gives no context length; pass max_length")
        store = store or DigestStore(cache_dir)
        source = source_identity(self.name, revision, store)  # the identity every model of dpo-eval has
        if "files" in source:
            source["files"].pop(TRAINING_METADATA, None)  # how it was trained, not what it computes
        elif source["commit"] == "unpinned":
            self.repairs.append(f"hub commit of {self.name} could not be resolved (offline and not in the hub "
                                "cache): its cached scores are keyed on the name and may be stale")
        self.identity = {"source": source, "max_length": self.max_length, "truncation": TRUNCATION,
                         "dtype": dtype, "rendering": RENDERING, "versions": library_versions()}
        self.key = json_key(self.identity, 20)
        self._model = self._tokenizer = None
        self.loads = 0  # how often weights were loaded (a fully cached run loads none)

    # -- the model ---------------------------------------------------------------------------------
    def load(self):
        if self._model is not None:
            return self._model, self._tokenizer
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        source = self.identity["source"]
        revision = source.get("commit") if source.get("commit") not in (None, "unpinned") else self.revision
        tokenizer = AutoTokenizer.from_pretrained(self.name, revision=revision)  # the commit the identity resolved
        model = AutoModelForSequenceClassification.from_pretrained(self.name, revision=revision,
                                                                   dtype=getattr(torch, self.dtype))
        model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        text_config = model.config.get_text_config()
        if text_config.pad_token_id is None:
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
            text_config.pad_token_id = tokenizer.pad_token_id
            self.repairs.append(f"reward model config had no pad_token_id: set to the tokenizer's pad "
                                f"{tokenizer.pad_token!r} so batches find each sequence's last token")
        self._model, self._tokenizer = model, tokenizer
        self.loads += 1
        return model, tokenizer

    def release(self) -> None:
        self._model = self._tokenizer = None

    # -- rendering ---------------------------------------------------------------------------------
    def encode(self, item: Item, tokenizer=None) -> tuple[list[int], bool, int]:
        """(token ids, truncated, tokens before truncation) of one item (see the module docstring)."""
        tokenizer = tokenizer or self.load()[1]
        return encode(tokenizer, item, self.max_length, self.repairs)

    # -- scoring -----------------------------------------------------------------------------------
    def score(self, items: list[Item]) -> Scores:
        """Scores of `items` in order: cached ones read, the rest computed in batches and cached."""
        keys = [item.key for item in items]
        found = self._read(keys) if self.cache else {}
        todo = list(dict.fromkeys(k for k in keys if k not in found))
        if todo:
            by_key = {item.key: item for item in items}
            found |= self._compute([by_key[k] for k in todo])
        rows = [found[k] for k in keys]
        return Scores(np.array([r[0] for r in rows], dtype=float), np.array([r[1] for r in rows], dtype=bool),
                      np.array([r[2] for r in rows], dtype=int), hits=len(keys) - len(todo), misses=len(todo),
                      repairs=list(self.repairs))

    def _compute(self, items: list[Item]) -> dict[str, tuple[float, bool, int]]:
        import torch

        from dpo_eval.generation.logprobs import right_padded

        model, tokenizer = self.load()
        pad = model.config.get_text_config().pad_token_id
        encoded = [self.encode(item, tokenizer) for item in items]
        order = sorted(range(len(items)), key=lambda i: -len(encoded[i][0]))
        out: dict[str, tuple[float, bool, int]] = {}
        device = next(model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                ids, mask, _ = right_padded([(encoded[i][0], len(encoded[i][0])) for i in batch], pad)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for row, i in enumerate(batch):
                    out[items[i].key] = (float(logits[row, 0].float()), encoded[i][1], encoded[i][2])
        if self.cache:
            self._write(out)
        return out

    # -- the cache ---------------------------------------------------------------------------------
    SCHEMA = ("CREATE TABLE IF NOT EXISTS scores (model TEXT, item TEXT, score REAL, truncated INTEGER, "
              "n_tokens INTEGER, PRIMARY KEY (model, item))")

    def _read(self, keys: list[str]) -> dict[str, tuple[float, bool, int]]:
        found = {}
        with open_table(self.cache_path, self.SCHEMA) as db:
            unique = list(dict.fromkeys(keys))
            for start in range(0, len(unique), 500):
                chunk = unique[start:start + 500]
                query = ("SELECT item, score, truncated, n_tokens FROM scores WHERE model=? AND item IN "
                         f"({','.join('?' * len(chunk))})")
                found |= {k: (s, bool(t), n) for k, s, t, n in db.execute(query, [self.key] + chunk)}
        return found

    def _write(self, rows: dict[str, tuple[float, bool, int]]) -> None:
        with open_table(self.cache_path, self.SCHEMA) as db:
            db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?)",
                           [(self.key, k, s, int(t), n) for k, (s, t, n) in rows.items()])


def encode(tokenizer, item: Item, max_length: int, repairs: list[str] | None = None) -> tuple[list[int], bool, int]:
    """Token ids of `item` for `tokenizer` (the reward model's), cut from the left to `max_length`."""
    repairs = repairs if repairs is not None else []
    text = render(tokenizer, item.system, json.loads(item.messages), item.answer, repairs)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    uses_bos = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    if uses_bos:
        while ids and ids[0] == bos:
            ids = ids[1:]
        ids = [bos] + ids
    n = len(ids)
    if n > max_length:
        head = [bos] if uses_bos else []
        ids = head + ids[n - (max_length - len(head)):]
    return ids, n > max_length, n


def render(tokenizer, system: str, turns: list[dict], answer: str, repairs: list[str]) -> str:
    """The conversation as text: the chat template with the answer as the assistant turn, or the plain
    format of generation followed by the answer and EOS."""
    if not getattr(tokenizer, "chat_template", None):
        import jinja2

        from dpo_eval.data.formats import transcript
        from dpo_eval.generation.prompts import PLAIN_TEMPLATE

        prompt = turns[-1]["content"] if len(turns) == 1 else transcript((t["role"], t["content"]) for t in turns)
        eos = tokenizer.eos_token or ""
        return jinja2.Template(PLAIN_TEMPLATE).render(system=system or "", prompt=prompt) + answer + eos
    reply = [{"role": "assistant", "content": answer}]
    chat = ([{"role": "system", "content": system}] if system else []) + list(turns) + reply
    try:
        return tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception as first:  # templates raise any type (raise_exception, TypeError, ...)
        if not system:
            raise DpoEvalError(f"the reward model's chat template fails ({type(first).__name__}: {first})") from first
        folded = [dict(t) for t in turns]
        users = [t for t in folded if t["role"] == "user"]
        if users:
            users[0]["content"] = f"{system}\n\n{users[0]['content']}"
        else:
            folded.insert(0, {"role": "user", "content": system})
        try:
            text = tokenizer.apply_chat_template(folded + reply, tokenize=False)
        except Exception:  # noqa: BLE001 - broken either way: report the first failure
            raise DpoEvalError(f"the reward model's chat template fails ({type(first).__name__}: {first})") from first
        note = "reward model's chat template rejects the system role: system prompt folded into the first user turn"
        if note not in repairs:
            repairs.append(note)
        return text


# -- a run ----------------------------------------------------------------------------------------

def role_items(pairs: pl.DataFrame, answers: pl.DataFrame | None) -> pl.DataFrame:
    """`pair_id, split, role, system, messages, answer`: chosen and rejected of every pair that has them, base
    and tuned where answers.parquet (None: no answers) has them."""
    pairs = pairs.with_columns(pl.col("system").fill_null(""))
    if "messages" not in pairs.columns:
        pairs = pairs.with_columns(messages=pl.col("prompt").map_elements(
            lambda p: json.dumps([{"role": "user", "content": p}], ensure_ascii=False), return_dtype=pl.String))
    keys = pairs.select("pair_id", "split", "system", "messages")
    frames = [pairs.filter(pl.col(role).is_not_null()).select(
        "pair_id", "split", "system", "messages", pl.lit(role).alias("role"), pl.col(role).alias("answer"))
        for role in ("chosen", "rejected")]  # questions without labels have neither
    if answers is None:
        return pl.concat(frames).select("pair_id", "split", "role", "system", "messages", "answer")
    for role in ("base", "tuned"):
        part = answers.filter((pl.col("model") == role) & pl.col("answer").is_not_null()).select("pair_id", "answer")
        frames.append(keys.join(part, on="pair_id", how="inner", maintain_order="left").select(
            "pair_id", "split", "system", "messages", pl.lit(role).alias("role"), "answer"))
    return pl.concat(frames).select("pair_id", "split", "role", "system", "messages", "answer")


def score_roles(scorer: RewardScorer, items: pl.DataFrame) -> tuple[pl.DataFrame, Scores]:
    """`pair_id, split, role, reward_model, truncated, n_tokens` for the rows of `role_items`."""
    result = scorer.score([Item(s, m, a) for s, m, a in items.select("system", "messages", "answer").iter_rows()])
    table = items.select("pair_id", "split", "role").with_columns(
        pl.Series(FEATURE, result.score, dtype=pl.Float64), pl.Series("truncated", result.truncated),
        pl.Series("n_tokens", result.n_tokens, dtype=pl.Int64))
    return table, result


def add_feature(features: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """features with the column `reward_model` (replacing an earlier one), NaN where a row was not scored;
    every other column and the row order unchanged."""
    base = features.drop(FEATURE) if FEATURE in features.columns else features
    joined = base.join(scores.select("pair_id", "role", FEATURE), on=["pair_id", "role"], how="left",
                       maintain_order="left")
    return joined.with_columns(pl.col(FEATURE).fill_null(float("nan")))


def calibration(features: pl.DataFrame, *, seed: int = 0, n_boot: int = 2000, ci_level: float = 0.95,
                column: str = FEATURE) -> dict:
    """{split: block} from a `pair_id, split, role, <column>` table (features.parquet's shape), for the
    splits with any score.

    accuracy = #{d_cr > 0} / n over the n pairs with finite chosen and rejected scores, d_cr = chosen -
    rejected; ties (d_cr = 0) count as not correct and are given. win_rate = (wins + win_ties / 2) / win_n
    over the win_n prompts with finite tuned and base scores (one pair per prompt_id where the table has it: a
    prompt's pairs share its answers), d_tb = tuned - base; p_value = two-sided sign
    test of wins vs losses (ties excluded). CIs at `ci_level`: accuracy, a Wilson score interval (never
    zero-width at 0 or n correct); win rate, the same Wilson interval on k = wins + win_ties / 2 (a percentile
    bootstrap collapses to [1, 1] when every pair is a win). n_boot is kept for the callers and not used.
    """
    from dpo_eval.judges.statistics import sign_test
    from dpo_eval.stats.paired import wilson

    prompt = ["prompt_id"] if "prompt_id" in features.columns else []  # tuned-vs-base counts each prompt once
    wide = features.select("pair_id", "split", *prompt, "role", column).pivot(
        on="role", index=["pair_id", "split", *prompt], values=column)
    for role in ROLES:
        if role not in wide.columns:
            wide = wide.with_columns(pl.lit(None, dtype=pl.Float64).alias(role))
    out = {}
    for split in sorted(set(wide["split"].to_list()), key=lambda s: (s not in ("train", "valid"), s)):
        part = wide.filter(pl.col("split") == split)
        values = {r: part[r].cast(pl.Float64).fill_null(np.nan).to_numpy() for r in ROLES}
        cr = values["chosen"] - values["rejected"]
        cr = cr[np.isfinite(cr)]
        scored = part.filter(pl.col("tuned").cast(pl.Float64).is_finite() & pl.col("base").cast(pl.Float64).is_finite())
        once = scored.sort("pair_id").unique("prompt_id", keep="first", maintain_order=True) if prompt else scored
        tb = (once["tuned"].cast(pl.Float64).fill_null(np.nan).to_numpy()
              - once["base"].cast(pl.Float64).fill_null(np.nan).to_numpy())
        tb = tb[np.isfinite(tb)]
        if cr.size == 0 and tb.size == 0:
            continue  # a split left out (--split, --limit): nothing to report
        correct = (cr > 0).astype(float)
        low, high = wilson(int(correct.sum()), int(cr.size), ci_level)
        wins, losses, ties = int((tb > 0).sum()), int((tb < 0).sum()), int((tb == 0).sum())
        win_scores = np.where(tb > 0, 1.0, np.where(tb == 0, 0.5, 0.0))
        win_low, win_high = wilson(float(win_scores.sum()), int(win_scores.size), ci_level)
        out[split] = {"accuracy": float(correct.mean()) if cr.size else float("nan"), "ci_low": low, "ci_high": high,
                      "ties": int((cr == 0).sum()), "n": int(cr.size),
                      "win_rate": float(win_scores.mean()) if tb.size else float("nan"),
                      "win_ci_low": win_low, "win_ci_high": win_high, "p_value": sign_test(wins, losses),
                      "wins": wins, "losses": losses, "win_ties": ties, "win_n": int(tb.size)}
    return out

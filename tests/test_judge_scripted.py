"""The API judge's statistics and failure handling through `dpo-eval judge`, against a scripted OpenAI-compatible
server (tests/scripted_judge.py) whose verdicts the test knows: exact win rates, ties, position consistency,
first-position rate, agreement with Wilson CIs (statsmodels), the LC win rate against a statsmodels GLM on the same
per-pair rows; invalid replies never cached, refusals recorded per pair, the judge's identity naming its server,
and replies paid for before a Ctrl-C kept."""

from __future__ import annotations

import _thread
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from dpo_eval.cli.main import main
from dpo_eval.config import JudgeSpec
from tests.scripted_judge import ScriptedJudge, always, marker_rule

# pair: (chosen holds GOOD, tuned holds GOOD, base holds GOOD, tuned length - base length in words)
# tuned wins 6 (GOOD only in tuned), loses 2, ties 2 (GOOD in both); chosen always holds GOOD.
DESIGN = [(1, 1, 0, 5), (1, 1, 0, -3), (1, 1, 0, 8), (1, 1, 0, 2), (1, 1, 0, -1), (1, 1, 0, 4),
          (1, 0, 1, 6), (1, 0, 1, -4), (1, 1, 1, 3), (1, 1, 1, -2)]
WINS, LOSSES, TIES = 6, 2, 2


def text(good: bool, words: int, tag: str) -> str:
    return " ".join([tag] + (["GOOD"] if good else []) + ["word"] * words)


def make_run(folder: Path, design=DESIGN, extra: dict | None = None) -> Path:
    """A run directory (pairs, answers, features with n_tokens, summary) built from `design`, all in split valid."""
    folder.mkdir(parents=True)
    rows = []
    for i, (_, tuned_good, base_good, diff) in enumerate(design):
        rows.append({"pair_id": f"p{i}", "split": "valid", "system": "", "prompt": f"Question {i}?",
                     "chosen": text(True, 3, f"c{i}"), "rejected": text(False, 3, f"r{i}"),
                     "tuned": text(tuned_good, 10 + max(diff, 0), f"t{i}"),
                     "base": text(base_good, 10 + max(-diff, 0), f"b{i}")})
        rows[-1].update((extra or {}).get(f"p{i}", {}))
    return write_tables(folder, pl.DataFrame(rows))


def write_tables(folder: Path, table: pl.DataFrame) -> Path:
    """pairs, answers, features (n_tokens: words) and a summary of a run from one row per pair holding the four
    texts (pair_id, split, system, prompt, chosen, rejected, tuned, base)."""
    table.drop("tuned", "base").write_parquet(folder / "pairs.parquet")
    table.unpivot(index="pair_id", on=["tuned", "base"], variable_name="model", value_name="answer"
                  ).write_parquet(folder / "answers.parquet")
    table.unpivot(index=["pair_id", "split"], on=["chosen", "rejected", "tuned", "base"], variable_name="role",
                  value_name="text").select("pair_id", "split", "role", n_tokens=pl.col("text").str.split(" ")
                                            .list.len().cast(pl.Float64)).write_parquet(folder / "features.parquet")
    (folder / "summary.json").write_text(json.dumps({"n_pairs": dict(table["split"].value_counts().rows())}))
    return folder


def judge_cli(run: Path, server: ScriptedJudge, cache: Path, *extra: str, model: str = "scripted-judge") -> dict:
    """`dpo-eval judge` in this process (the server's thread answers it); the summary's judge block."""
    argv = ["judge", str(run), "--judge", "openai", "--judge-model", model, "--base-url", server.url,
            "--concurrency", "2", "--max-tokens", "8", *extra]
    import os

    os.environ["DPO_EVAL_CACHE"] = str(cache)
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), f"dpo-eval judge exited {exc.code}"
    finally:
        os.environ.pop("DPO_EVAL_CACHE", None)
    return json.loads((run / "summary.json").read_text())


def test_exact_statistics_of_a_judge_that_reads_the_planted_marker(tmp_path):
    from statsmodels.stats.proportion import proportion_confint

    run = make_run(tmp_path / "run")
    with ScriptedJudge(marker_rule()) as server:
        summary = judge_cli(run, server, tmp_path / "cache")
    block = summary["judge"]
    tvb = block["splits"]["valid"]["tuned_vs_base"]
    cvr = block["splits"]["valid"]["chosen_vs_rejected"]
    n = len(DESIGN)
    assert (tvb["n"], tvb["wins"], tvb["losses"], tvb["ties"]) == (n, WINS, LOSSES, TIES)
    assert tvb["win_rate"] == pytest.approx((WINS + TIES / 2) / n)
    low, high = proportion_confint(WINS + TIES / 2, n, alpha=0.05, method="wilson")
    assert (tvb["ci_low"], tvb["ci_high"]) == pytest.approx((low, high), abs=1e-12)
    assert tvb["p_value"] == pytest.approx(sps.binomtest(WINS, WINS + LOSSES).pvalue)
    assert tvb["position_consistency"] == 1.0
    assert tvb["first_position_rate"] == pytest.approx((WINS + LOSSES) / (2 * n))  # each decided pair: one A, one B
    assert (cvr["n"], cvr["agreement"], cvr["position_consistency"]) == (n, 1.0, 1.0)
    clow, chigh = proportion_confint(n, n, alpha=0.05, method="wilson")
    assert (cvr["ci_low"], cvr["ci_high"]) == pytest.approx((clow, chigh), abs=1e-12) and cvr["ci_low"] < 0.9
    assert block["complete"] and block["invalid"] == 0 and block["failed"] == 0
    assert server.requests == 4 * n  # both orders of both comparisons, none twice
    # LC: the same per-pair rows refitted with statsmodels' GLM (a tie is half a win and half a loss).
    import statsmodels.api as sm

    features = pl.read_parquet(run / "features.parquet")
    length = {(r["pair_id"], r["role"]): r["n_tokens"] for r in features.iter_rows(named=True)}
    d = np.array([length[(f"p{i}", "tuned")] - length[(f"p{i}", "base")] for i in range(n)])
    y = np.array([1.0] * WINS + [0.0] * LOSSES + [0.5] * TIES)  # DESIGN lists wins, then losses, then ties
    x = np.tanh(d / d.std())
    X = sm.add_constant(np.concatenate([x, x]))
    Y = np.concatenate([np.ones(n), np.zeros(n)])
    fit = sm.GLM(Y, X, family=sm.families.Binomial(), freq_weights=np.concatenate([y, 1 - y])).fit()
    assert tvb["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-fit.params[0])), abs=2e-3)
    assert tvb["lc_extrapolated"] is False


def test_a_judge_that_always_answers_a_has_full_position_bias_and_only_ties(tmp_path):
    run = make_run(tmp_path / "run")
    with ScriptedJudge(always("[[A]]")) as server:
        block = judge_cli(run, server, tmp_path / "cache")["judge"]
    tvb = block["splits"]["valid"]["tuned_vs_base"]
    assert (tvb["ties"], tvb["win_rate"], tvb["position_consistency"], tvb["first_position_rate"]) == \
        (len(DESIGN), 0.5, 0.0, 1.0)
    assert block["splits"]["valid"]["chosen_vs_rejected"]["agreement"] == 0.5


def test_prose_verdicts_are_not_cached_and_the_run_is_not_complete(tmp_path):
    run = make_run(tmp_path / "run")
    with ScriptedJudge(always("Both answers have their merits; it depends.")) as server:
        summary = judge_cli(run, server, tmp_path / "cache")
        asked = server.requests
        block = summary["judge"]
        assert block["invalid"] == 4 * len(DESIGN) and block["invalid_share"] == 1.0
        assert block["complete"] is False and "could not be read" in block["problems"][0]
        assert any("could not be read" in line for line in summary["judge_headline"])
        again = judge_cli(run, server, tmp_path / "cache")["judge"]
    assert asked == 4 * len(DESIGN) and server.requests == 2 * asked  # nothing was cached: every one asked again
    assert again["calls"] == asked and again["cached"] == 0


def test_a_refused_request_is_a_failed_judgment_and_the_others_are_judged(tmp_path):
    run = make_run(tmp_path / "run", extra={"p0": {"tuned": "LONG " * 50}})

    def rule(a, b, user):
        return 400 if "LONG" in a + b else marker_rule()(a, b, user)

    with ScriptedJudge(rule) as server:
        block = judge_cli(run, server, tmp_path / "cache")["judge"]
        table = pl.read_parquet(run / "judgments.parquet")
        failed = table.filter(pl.col("verdict") == "failed")
        assert failed["pair_id"].to_list() == ["p0", "p0"] and "400" in failed["raw"][0]
        tvb = block["splits"]["valid"]["tuned_vs_base"]
        assert block["failed"] == 2 and tvb["failed"] == 1 and tvb["n"] == len(DESIGN) - 1
        assert block["complete"] is False and "refused" in block["problems"][0]
        assert block["splits"]["valid"]["chosen_vs_rejected"]["n"] == len(DESIGN)  # the rest was judged
        before = server.requests
        judge_cli(run, server, tmp_path / "cache")
        assert server.requests - before == 2  # only the refused ones are asked again


def test_the_judge_identity_names_the_server_and_the_revision(tmp_path):
    run = make_run(tmp_path / "run")
    with ScriptedJudge(marker_rule()) as first, ScriptedJudge(always("[[B]]")) as second:
        one = judge_cli(run, first, tmp_path / "cache")["judge"]
        two = judge_cli(run, second, tmp_path / "cache")["judge"]  # same --judge-model, another server
        assert second.requests == 4 * len(DESIGN) and two["cached"] == 0 and two["id"] != one["id"]
        assert two["splits"]["valid"]["tuned_vs_base"]["first_position_rate"] == 0.0  # its own verdicts
        three = judge_cli(run, first, tmp_path / "cache", "--judge-revision", "weights-2")["judge"]
        assert three["id"] != one["id"] and three["cached"] == 0
        again = judge_cli(run, first, tmp_path / "cache")["judge"]
        assert again["id"] == one["id"] and again["calls"] == 0  # same server, same revision: the cache
    from dpo_eval.judges.api import normalised_url

    assert normalised_url("HTTP://LocalHost:80/v1/") == normalised_url("http://localhost/v1") == "http://localhost/v1"
    assert normalised_url("http://127.0.0.1:8001/v1") != normalised_url("http://127.0.0.1:8002/v1")


def requests_for(n: int, text=lambda i: f"GOOD {i}") -> dict:
    return {f"k{i}": [{"role": "user", "content": f"[Answer A]\n{text(i)}\n\n[Answer B]\nx\n\n"
                                                  "Which answer is better?"}] for i in range(n)}


def test_replies_that_finish_after_ctrl_c_are_cached(tmp_path):
    from dpo_eval.judges.api import ChatJudge, JudgmentCache, run_calls

    cache = JudgmentCache(tmp_path / "cache")
    requests = requests_for(8)

    def ctrl_c(number: int) -> None:  # Ctrl-C as the 4th call arrives: 4 calls in flight, each 1.5 s from done
        if number == 4:
            _thread.interrupt_main()

    with ScriptedJudge(marker_rule(), delay_s=1.5, on_request=ctrl_c) as server:
        spec = JudgeSpec(model="scripted-judge", base_url=server.url, concurrency=4, max_tokens=8, max_retries=0)
        judge = ChatJudge(spec)
        with pytest.raises(KeyboardInterrupt):
            run_calls(judge, requests, cache, "j", max_calls=None, concurrency=4)
        assert server.requests == 4
    kept = cache.get_many(list(requests))
    assert len(kept) == 4 and all(r.raw == "[[A]]" for r in kept.values())  # the 4 paid replies, none lost


def test_a_budget_asks_never_asked_requests_before_invalid_ones_again(tmp_path):
    from dpo_eval.judges.api import ChatJudge, JudgmentCache, run_calls

    cache = JudgmentCache(tmp_path / "cache")
    requests = requests_for(9, lambda i: "PROSE" if i < 3 else f"GOOD {i}")  # the first 3 get no verdict

    def rule(a, b, user):
        return "I cannot decide." if "PROSE" in a else marker_rule()(a, b, user)

    with ScriptedJudge(rule) as server:
        spec = JudgeSpec(model="scripted-judge", base_url=server.url, concurrency=1, max_tokens=8)
        asked = []
        for _ in range(3):
            before = len(server.seen)
            run_calls(ChatJudge(spec), requests, cache, "j", max_calls=3, concurrency=1)
            asked.append([a for a, _ in server.seen[before:]])
    assert asked[0] == ["PROSE"] * 3  # first run: request order
    assert asked[1] == ["GOOD 3", "GOOD 4", "GOOD 5"] and asked[2] == ["GOOD 6", "GOOD 7", "GOOD 8"]
    assert len(cache.get_many(list(requests))) == 6  # the invalid ones are never cached


def test_a_server_that_refuses_every_request_or_knows_no_such_model_stops_the_run(tmp_path):
    from dpo_eval.errors import DpoEvalError
    from dpo_eval.judges.pairwise import judge_run

    run = make_run(tmp_path / "run")
    for status, said in ((404, "answered 404"), (400, "the first 4 requests were all refused")):
        with ScriptedJudge(always(status)) as server:
            spec = JudgeSpec(model="no-such-model", base_url=server.url, concurrency=1, max_tokens=8,
                             cache_dir=tmp_path / "cache")
            with pytest.raises(DpoEvalError, match=said):
                judge_run(run, spec)
            assert server.requests <= 4  # stopped, not 40 refusals


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/v1", "http://127.0.0.1:port/v1", "127.0.0.1:8000/v1",
                                 "http://[::1"])
def test_a_malformed_base_url_is_one_error_naming_it(tmp_path, url):
    from dpo_eval.errors import DpoEvalError
    from dpo_eval.judges.pairwise import judge_run

    run = make_run(tmp_path / "run")
    with pytest.raises(DpoEvalError, match="--base-url"):
        judge_run(run, JudgeSpec(model="m", base_url=url, cache_dir=tmp_path / "cache"))


def test_a_pair_listed_twice_is_refused_before_any_call(tmp_path):
    from dpo_eval.errors import DpoEvalError
    from dpo_eval.judges.pairwise import judge_run

    run = make_run(tmp_path / "run")
    pairs = pl.read_parquet(run / "pairs.parquet")
    pl.concat([pairs, pairs.head(1)]).write_parquet(run / "pairs.parquet")
    with ScriptedJudge(marker_rule()) as server:
        with pytest.raises(DpoEvalError, match="pair_id 'p0' appears more than once"):
            judge_run(run, JudgeSpec(model="m", base_url=server.url, cache_dir=tmp_path / "cache"))
        assert server.requests == 0  # nothing paid for


def test_a_dry_run_states_the_calls_tokens_and_cost_and_a_real_run_records_them(tmp_path, capsys):
    """--dry-run makes no call and writes nothing; its call count is the calls the real run then makes, its prompt
    tokens are the characters of the messages the server then received / 4, and its cost follows the prices; the
    real run records the tokens the API reported and their cost; a second dry run has nothing left to call."""
    run = make_run(tmp_path / "run")
    before = (run / "summary.json").read_text()
    prices = ["--price-in", "2.5", "--price-out", "10"]
    with ScriptedJudge(marker_rule()) as server:
        judge_cli(run, server, tmp_path / "cache", "--dry-run", *prices)
        printed = capsys.readouterr().out
        plan, _ = json.JSONDecoder().raw_decode(printed)
        assert server.requests == 0 and not (run / "judgments.parquet").exists()
        assert (run / "summary.json").read_text() == before
        assert "nothing was called or written" in printed
        summary = judge_cli(run, server, tmp_path / "cache", *prices)
        sent = list(server.messages)
        capsys.readouterr()
        judge_cli(run, server, tmp_path / "cache", "--dry-run")  # the same server: the same judge identity
        again, _ = json.JSONDecoder().raw_decode(capsys.readouterr().out)
    assert plan["judgments"] == 4 * len(DESIGN) and plan["cached"] == 0 and plan["over_budget"] == 0
    assert plan["calls"] == len(sent) == summary["judge"]["calls"]
    chars = sum(len(m["content"]) for messages in sent for m in messages)
    assert plan["prompt_tokens"] == math.ceil(chars / 4)
    assert plan["completion_tokens"] == plan["calls"] * 8  # --max-tokens 8 in judge_cli
    assert plan["cost"] == pytest.approx((plan["prompt_tokens"] * 2.5 + plan["completion_tokens"] * 10) / 1e6)
    tokens = summary["judge"]["tokens"]
    assert summary["judge"]["cost"] == pytest.approx((tokens["prompt"] * 2.5 + tokens["completion"] * 10) / 1e6)
    assert again["calls"] == 0 and again["cached"] == again["distinct"] and again["cost"] is None


def test_a_judge_run_refused_before_any_judgment_writes_nothing(tmp_path):
    """A folder without pairs.parquet, or a pair listed twice: one error, and no report or summary left behind."""
    from dpo_eval.cli.main import main

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as stopped:
        main(["judge", str(empty), "--judge-model", "m", "--base-url", "http://127.0.0.1:9/v1"])
    assert stopped.value.code == 2 and sorted(p.name for p in empty.iterdir()) == []

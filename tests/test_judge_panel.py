"""A panel of judges and repeated judgments through `dpo-eval judge`, against scripted OpenAI-compatible servers
(tests/scripted_judge.py) whose verdicts the test predicts from the answers' texts: both judges' verdicts kept side by
side (a re-run of one replaces its own rows only), their Cohen's kappa against scikit-learn and statsmodels with the
bootstrap CI rebuilt by an independent numpy bootstrap of the same seed, the majority's win rate and Wilson CI against
statsmodels, and --repeats with a judge that flips on a known subset of calls."""

from __future__ import annotations

import json
import warnings

import numpy as np
import polars as pl
import pytest

from dpo_eval.cli.main import main
from tests.scripted_judge import ScriptedJudge, flaky_rule, longer_rule, marker_rule
from tests.test_judge_scripted import judge_cli, write_tables

# Per prompt: (tuned holds GOOD, base holds GOOD, which is longer in characters: 1 tuned, -1 base, 0 neither). Every
# answer has 5 words, so the answers' lengths in tokens (words) and markdown do not vary: the length- and
# style-controlled fits have nothing to fit (and cost no bootstrap), while the length judge reads characters.
PANEL_DESIGN = [(1, 0, 1)] * 5 + [(0, 1, -1)] * 3 + [(1, 1, 0)] * 2 + [
    (1, 0, 0), (1, 0, -1), (0, 1, 1), (0, 0, 1), (1, 0, 1), (1, 0, 1), (0, 1, 0), (1, 1, 1), (1, 0, 1), (1, 0, 1)]
RESAMPLES, SEED = 400, 0  # the run's verdict spec (config.json); seed 0 is VerdictSpec's default
MARKER, LONGER = "openai:judge-marker", "openai:judge-longer"
FLAKY_PAIRS = (0, 5, 8)  # their tuned answers hold FLAKY: the flaky judge flips every second asking of them


def answer(tag: str, good: bool, longer: bool, flaky: bool = False) -> str:
    return f"{tag} {'GOOD' if good else 'okay'} {'wordy' if longer else 'word'} word {'FLAKY' if flaky else 'word'}"


def build_run(folder, design, flaky=()):
    """A run folder (pairs, answers, features, summary; split valid) of `design`; chosen holds GOOD and is longer."""
    folder.mkdir(parents=True)
    rows = [{"pair_id": f"p{i:02d}", "split": "valid", "system": "", "prompt": f"Question {i}?",
             "chosen": f"c{i:02d} GOOD wordy word", "rejected": f"r{i:02d} okay word word",
             "tuned": answer(f"t{i:02d}", tg, cl > 0, i in flaky), "base": answer(f"b{i:02d}", bg, cl < 0)}
            for i, (tg, bg, cl) in enumerate(design)]
    return write_tables(folder, pl.DataFrame(rows))


@pytest.fixture(scope="module")
def servers():
    with ScriptedJudge(marker_rule()) as marker, ScriptedJudge(longer_rule()) as longer, \
            ScriptedJudge(flaky_rule(marker_rule())) as flaky:
        yield {"marker": marker, "longer": longer, "flaky": flaky}


@pytest.fixture(scope="module")
def panel(servers, tmp_path_factory):
    """One run judged by the marker judge, then the length judge, then the marker judge again with another decoding
    setting (a new judge id of the same panel member): the summaries and judgments after each step."""
    root = tmp_path_factory.mktemp("panel")
    run = build_run(root / "run", PANEL_DESIGN)
    (run / "config.json").write_text(json.dumps({"config": {"verdict": {"resamples": RESAMPLES, "seed": SEED}}}))
    steps = []
    for server, model, extra in ((servers["marker"], "judge-marker", ()), (servers["longer"], "judge-longer", ()),
                                 (servers["marker"], "judge-marker", ("--max-tokens", "9"))):
        summary = judge_cli(run, server, root / "cache", *extra, model=model)
        steps.append((summary, pl.read_parquet(run / "judgments.parquet")))
    return run, steps


def predicted(run) -> tuple[list[str], list[str]]:
    """Per prompt (p00, p01, ...: the panel's order, by pair_id), the marker judge's and the length judge's tuned-vs-base verdicts, read from the texts:
    each judge names the same winner in both orders."""
    answers = pl.read_parquet(run / "answers.parquet")
    texts = {(r["pair_id"], r["model"]): r["answer"] for r in answers.iter_rows(named=True)}
    marker, longer = [], []
    for i in range(len(PANEL_DESIGN)):
        t, b = texts[(f"p{i:02d}", "tuned")], texts[(f"p{i:02d}", "base")]
        marker.append("tie" if ("GOOD" in t) == ("GOOD" in b) else "tuned" if "GOOD" in t else "base")
        longer.append("tie" if len(t) == len(b) else "tuned" if len(t) > len(b) else "base")
    return marker, longer


def test_each_judge_keeps_its_own_verdicts_and_a_rerun_replaces_only_its_own(panel):
    run, ((first, rows1), (second, rows2), (third, rows3)) = panel
    id1, id2, id3 = (s["judge"]["id"] for s in (first, second, third))
    assert len({id1, id2, id3}) == 3 and id1.startswith(MARKER + ":") and id3.startswith(MARKER + ":")
    per_judge = 4 * len(PANEL_DESIGN)  # both orders of both comparisons
    assert rows1["judge"].unique().to_list() == [id1] and rows1.height == per_judge
    assert sorted(rows2["judge"].unique().to_list()) == sorted([id1, id2]) and rows2.height == 2 * per_judge
    assert rows2.filter(pl.col("judge") == id1).sort("pair_id", "comparison", "order").equals(
        rows1.sort("pair_id", "comparison", "order"))  # the first judge's rows untouched by the second's run
    assert sorted(rows3["judge"].unique().to_list()) == sorted([id2, id3]) and rows3.height == 2 * per_judge
    assert rows3.filter(pl.col("judge") == id2).sort("pair_id", "comparison", "order").equals(
        rows2.filter(pl.col("judge") == id2).sort("pair_id", "comparison", "order"))
    assert list(third["judges"]) == [MARKER, LONGER]
    assert third["judges"][MARKER]["id"] == id3 and third["judges"][LONGER]["id"] == id2
    assert third["judge"]["id"] == id3  # the latest run's block, as before panels
    marker, longer = predicted(run)
    tvb = third["judges"][LONGER]["splits"]["valid"]["tuned_vs_base"]
    assert (tvb["wins"], tvb["losses"], tvb["ties"]) == tuple(longer.count(w) for w in ("tuned", "base", "tie"))
    tvb = third["judge"]["splits"]["valid"]["tuned_vs_base"]
    assert (tvb["wins"], tvb["losses"], tvb["ties"]) == tuple(marker.count(w) for w in ("tuned", "base", "tie"))
    assert "panel" not in first and "panel" in second  # a panel from the second LLM judge on


def test_kappa_and_its_bootstrap_ci_match_references(panel):
    from sklearn.metrics import cohen_kappa_score
    from statsmodels.stats.inter_rater import cohens_kappa

    run, steps = panel
    block = steps[-1][0]["panel"]
    marker, longer = predicted(run)
    assert marker != longer and sum(m == g for m, g in zip(marker, longer)) > 5  # the construction: partial agreement
    assert block["split"] == "valid" and set(block["judges"]) == {MARKER, LONGER}
    assert all(j["calibrated"] and j["n"] == len(PANEL_DESIGN) for j in block["judges"].values())
    (pair,) = block["pairs"]
    assert (pair["a"], pair["b"], pair["n"]) == (MARKER, LONGER, len(PANEL_DESIGN))
    assert pair["agree"] == pytest.approx(np.mean(np.array(marker) == np.array(longer)))
    assert pair["kappa"] == pytest.approx(cohen_kappa_score(marker, longer), abs=1e-12)
    labels = ["base", "tie", "tuned"]
    table = np.array([[sum(a == i and b == j for a, b in zip(marker, longer)) for j in labels] for i in labels])
    assert pair["kappa"] == pytest.approx(cohens_kappa(table).kappa, abs=1e-12)
    # the CI: the same seed's draws, each resample's kappa by scikit-learn (both judges constant and equal: 1)
    a, b, n = np.array(marker), np.array(longer), len(marker)
    rng = np.random.default_rng(SEED)
    kappas = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(RESAMPLES):
            idx = rng.integers(0, n, n)
            value = cohen_kappa_score(a[idx], b[idx])
            kappas.append(1.0 if np.isnan(value) and set(a[idx]) == set(b[idx]) and len(set(a[idx])) == 1 else value)
    low, high = np.quantile(kappas, [0.025, 0.975])
    assert (pair["ci_low"], pair["ci_high"]) == pytest.approx((low, high), abs=1e-12)
    assert pair["ci_low"] < pair["kappa"] < pair["ci_high"]


def test_the_majority_win_rate_and_the_answers_read_the_panel(panel):
    from statsmodels.stats.proportion import proportion_confint

    run, steps = panel
    summary = steps[-1][0]
    marker, longer = predicted(run)
    votes = [m if m == g else "tie" for m, g in zip(marker, longer)]  # two judges: a disagreement is no majority
    wins, losses, ties = (votes.count(w) for w in ("tuned", "base", "tie"))
    majority = summary["panel"]["majority"]
    assert summary["panel"]["reads_verdict"] and majority["judges"] == [MARKER, LONGER]
    assert (majority["n"], majority["wins"], majority["losses"], majority["ties"]) == (len(votes), wins, losses, ties)
    assert majority["win_rate"] == pytest.approx((wins + ties / 2) / len(votes))
    low, high = proportion_confint(wins + ties / 2, len(votes), alpha=0.05, method="wilson")
    assert (majority["ci_low"], majority["ci_high"]) == pytest.approx((low, high), abs=1e-12)
    better = summary["verdict"]["better"]
    assert better["majority"]["win_rate"] == majority["win_rate"]
    assert better["majority"]["ci"] == pytest.approx([low, high], abs=1e-12)
    assert better["because"].startswith("the majority of the 2 calibrated judges")
    assert [j["judge"] for j in better["judges"]] == [f"LLM judge {MARKER}", f"LLM judge {LONGER}"]
    assert low <= 0.5 <= high  # the construction: 20 prompts do not decide it
    assert better["answer"] == "unknown" and better["because"].split(" (each judge")[0].endswith("CI includes 0.5")
    section = next(s for s in json.loads((run / "report_sections.json").read_text()) if s["id"] == "panel")
    pair = summary["panel"]["pairs"][0]
    assert section["rows"] == [[MARKER, LONGER, len(votes), f"{pair['agree']:.2f}",
                                f"{pair['kappa']:.2f} [{pair['ci_low']:.2f}, {pair['ci_high']:.2f}]"]]
    assert f"{majority['win_rate']:.2f} [{low:.2f}, {high:.2f}] of {len(votes)} prompts" in " ".join(
        section["paragraphs"])


def test_repeats_measure_the_share_of_verdicts_that_change(servers, tmp_path, capsys):
    design = PANEL_DESIGN[:10]
    run = build_run(tmp_path / "run", design, FLAKY_PAIRS)
    server = servers["flaky"]
    judgments = 4 * len(design)
    import os

    os.environ["DPO_EVAL_CACHE"] = str(tmp_path / "cache")
    try:
        main(["judge", str(run), "--judge", "openai", "--judge-model", "judge-flaky", "--base-url", server.url,
              "--repeats", "3", "--dry-run"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    finally:
        os.environ.pop("DPO_EVAL_CACHE", None)
    plan, _ = json.JSONDecoder().raw_decode(capsys.readouterr().out)
    assert (plan["judgments"], plan["repeats"], plan["calls"]) == (judgments, 3, 3 * judgments)
    before = server.requests
    block = judge_cli(run, server, tmp_path / "cache", "--repeats", "3", model="judge-flaky")["judge"]
    assert server.requests - before == 3 * judgments  # every repeat a real call
    users = [next(m["content"] for m in reversed(sent) if m["role"] == "user") for sent in server.messages[before:]]
    assert block["tokens"]["prompt"] == sum(len(user) // 4 for user in users)  # the server's usage, every call
    flaky = 2 * len(FLAKY_PAIRS)  # tuned vs base of those pairs, both orders
    assert block["repeatability"] | {"note": None, "rule": None} == {
        "k": 3, "n": judgments, "changed": flaky, "share_changed": flaky / judgments, "strength_changed": 0, "temperature": 0.0,
        "note": None, "rule": None}
    assert "nondeterminism" in block["repeatability"]["note"]
    tvb = block["splits"]["valid"]["tuned_vs_base"]  # the majority of 3 repeats is the marker rule's verdict
    marker = ["tie" if tg == bg else "tuned" if tg else "base" for tg, bg, _ in design]
    assert (tvb["wins"], tvb["losses"], tvb["ties"]) == tuple(marker.count(w) for w in ("tuned", "base", "tie"))
    table = pl.read_parquet(run / "judgments.parquet")
    changed = table.filter(pl.col("repeat_verdicts").list.n_unique() > 1)
    assert sorted(set(changed["pair_id"].to_list())) == [f"p{i:02d}" for i in FLAKY_PAIRS] and changed.height == flaky
    assert table.height == judgments and (table["repeat_verdicts"].list.len() == 3).all()
    again = judge_cli(run, server, tmp_path / "cache", "--repeats", "3", model="judge-flaky")["judge"]
    assert server.requests - before == 3 * judgments  # a re-run reads all three repeats from the cache
    assert again["calls"] == 0 and again["tokens"] == {"prompt": 0, "completion": 0}
    assert again["repeatability"] == block["repeatability"]
    section = next(s for s in json.loads((run / "report_sections.json").read_text()) if s["id"] == "judge")
    assert any(p.startswith("Repeatability: each judgment was asked 3 times; the verdict changed across the repeats "
                            f"in {flaky} of {judgments}") for p in section["paragraphs"])


def test_three_judges_and_a_reward_model_the_majority_answers_where_the_judges_disagree(tmp_path):
    """A constructed run (tests/test_verdict.py's planted reward scores, judgments and blocks written by hand, no
    server): a reward model and three LLM judges, all calibrated; two LLM judges prefer tuned, one prefers base, so
    the one-judge rule says 'the judges disagree'; the panel's majority of four (an even split a tie) answers yes, and
    the pair that disagrees most is a gaming signal. The same folder with one LLM judge keeps today's answer."""
    from collections import Counter

    from sklearn.metrics import cohen_kappa_score
    from statsmodels.stats.proportion import proportion_confint

    from dpo_eval.config import VerdictSpec
    from dpo_eval.judges.statistics import judge_summary
    from dpo_eval.studies.verdict import RM, assess, verdict
    from tests.test_verdict import judgments_of, planted, write_run

    n, rng = 80, np.random.default_rng(3)
    outcomes = ["tuned", "base", "tie"]
    scores = planted(n=n)
    scores["tuned"] = scores["base"] + rng.normal(0.2, 0.5, n)
    rm = ["tuned" if t > b else "base" for t, b in zip(scores["tuned"], scores["base"])]
    a = rng.choice(outcomes, n, p=[0.75, 0.15, 0.10]).tolist()
    b = [x if rng.random() < 0.8 else str(rng.choice(outcomes)) for x in a]
    c = rng.choice(outcomes, n, p=[0.2, 0.7, 0.1]).tolist()
    lengths = {role: rng.integers(5, 60, n).astype(float) for role in scores}
    run = write_run(tmp_path / "run", scores, lengths)
    diffs = pl.DataFrame({"pair_id": [f"p{i:03d}" for i in range(n)] * 2, "split": "valid",
                          "role": ["tuned"] * n + ["base"] * n, "length": np.concatenate([lengths["tuned"],
                                                                                        lengths["base"]])})
    tables, blocks = [], {}
    for name, said in (("a", a), ("b", b), ("c", c)):
        judge = f"openai:judge-{name}:{name * 12}"
        rows = judgments_of({"tuned_vs_base": said, "chosen_vs_rejected": ["chosen"] * n}).with_columns(
            judge=pl.lit(judge))
        tables.append(rows)
        blocks[f"openai:judge-{name}"] = judge_summary(rows, diffs) | {"id": judge, "model": f"judge-{name}"}
    pl.concat(tables).write_parquet(run / "judgments.parquet")
    summary = json.loads((run / "summary.json").read_text())
    summary |= {"judge": blocks["openai:judge-c"], "judges": blocks}
    (run / "summary.json").write_text(json.dumps(summary, allow_nan=True))
    spec = VerdictSpec(resamples=200)

    answers, _, panel = assess(run, spec)
    assert [(p["a"], p["b"]) for p in panel["pairs"]][:3] == [(RM, f"openai:judge-{x}") for x in "abc"]
    for pair, said in zip(panel["pairs"], (a, b, c)):  # the reward model's agreement with each LLM judge
        assert (pair["n"], pair["kappa"]) == (n, pytest.approx(cohen_kappa_score(rm, said), abs=1e-12))
    better = answers["better"]
    assert [j["answer"] for j in better["judges"]] == ["yes", "yes", "yes", "no"]  # the construction
    votes = []
    for said in zip(rm, a, b, c):
        (top, count), *rest = Counter(said).most_common()
        votes.append(top if not rest or rest[0][1] < count else "tie")
    wins, losses, ties = (votes.count(w) for w in outcomes)
    low, high = proportion_confint(wins + ties / 2, n, alpha=0.05, method="wilson")
    majority = better["majority"]
    assert (majority["n"], majority["wins"], majority["losses"], majority["ties"]) == (n, wins, losses, ties)
    assert majority["ci"] == pytest.approx([low, high], abs=1e-12) and low > 0.5
    assert majority["lc_win_rate"] > 0.5 and better["answer"] == "yes"
    gaming = answers["gaming"]
    share = np.mean(np.array(a) != np.array(c))
    assert cohen_kappa_score(a, c) <= spec.kappa_bar and share >= spec.disagreement_bar  # the construction
    assert gaming["answer"] == "yes"
    assert f"judges openai:judge-a and openai:judge-c name different winners of tuned vs base on {share:.0%}" in \
        gaming["because"]

    summary["judges"] = {"openai:judge-c": blocks["openai:judge-c"]}  # one LLM judge: today's rule, no panel
    (run / "summary.json").write_text(json.dumps(summary, allow_nan=True))
    single = verdict(run, spec)[0]["better"]
    assert single["answer"] == "unknown" and "the judges disagree" in single["because"] and "majority" not in single
    assert [j["judge"] for j in single["judges"]] == ["reward model", "LLM judge"]


def test_a_judge_run_replaces_its_own_member_and_drops_judges_the_summary_no_longer_names(tmp_path):
    from dpo_eval.judges.panel import member, merge_judgments, panel_ids

    def rows(judge: str, verdict: str) -> pl.DataFrame:
        return pl.DataFrame({"pair_id": ["p0"], "judge": [judge], "verdict": [verdict]})

    path = tmp_path / "judgments.parquet"
    pl.concat([rows("openai:a:111", "first"), rows("openai:b:222", "second"), rows("openai:old:333", "tie")]).write_parquet(path)
    summary = {"judge": {"id": "openai:a:111"}, "judges": {"openai:a": {"id": "openai:a:111"},
                                                         "openai:b": {"id": "openai:b:222"}}}
    assert panel_ids(summary) == {"openai:a:111", "openai:b:222"} and member("openai:org/m:7b:444") == "openai:org/m:7b"
    merged = merge_judgments(path, rows("openai:a:999", "tie"), "openai:a:999", panel_ids(summary))
    assert sorted(merged.rows()) == [("p0", "openai:a:999", "tie"), ("p0", "openai:b:222", "second")]
    assert pl.read_parquet(path).sort("judge").equals(merged.sort("judge"))


def test_repeats_of_a_two_turn_set_fold_each_turn_into_its_own_judgment():
    """A pair judged on turn 1 and turn 2 keeps two rows after folding repeats; each row's verdict is the majority of
    its own turn's repeats (turn 1: first, first, second -> first; turn 2: second x3 -> second)."""
    from dpo_eval.judges.repeats import fold

    def table(v1: str, v2: str) -> pl.DataFrame:
        return pl.DataFrame({"pair_id": ["p", "p"], "split": ["valid"] * 2, "comparison": ["tuned_vs_base"] * 2,
                             "judge": ["j"] * 2, "order": ["ab"] * 2, "shown_first": ["tuned"] * 2,
                             "verdict": [v1, v2], "winner": [{"first": "tuned", "second": "base"}[v] for v in (v1, v2)],
                             "prompt_tokens": [1, 1], "completion_tokens": [1, 1], "cached": [False, False],
                             "strength": [1, 1], "turn": [1, 2]})

    folded, block = fold([table("first", "second"), table("first", "second"), table("second", "second")], 0.0)
    assert folded.sort("turn")["verdict"].to_list() == ["first", "second"]
    assert folded.sort("turn")["winner"].to_list() == ["tuned", "base"]
    assert block["n"] == 2 and block["changed"] == 1


def test_two_judges_of_a_set_without_labels_still_get_their_agreement(tmp_path):
    """Judges that judged tuned vs base only (no chosen vs rejected: no calibration) cannot vote, but the panel still
    gives their kappa (sklearn's on their per-prompt verdicts), and each says it has no calibration."""
    from sklearn.metrics import cohen_kappa_score

    from dpo_eval.config import VerdictSpec
    from dpo_eval.judges.statistics import judge_summary
    from dpo_eval.studies.verdict import assess
    from tests.test_verdict import judgments_of, planted, write_run

    n, rng = 40, np.random.default_rng(5)
    run = write_run(tmp_path / "run", planted(n=n))
    a = rng.choice(["tuned", "base", "tie"], n, p=[0.6, 0.3, 0.1]).tolist()
    b = [x if rng.random() < 0.7 else "base" for x in a]
    tables, blocks = [], {}
    for name, said in (("a", a), ("b", b)):
        judge = f"openai:judge-{name}:{name * 12}"
        rows = judgments_of({"tuned_vs_base": said}).with_columns(judge=pl.lit(judge))
        tables.append(rows)
        blocks[f"openai:judge-{name}"] = judge_summary(rows) | {"id": judge, "model": f"judge-{name}"}
    pl.concat(tables).write_parquet(run / "judgments.parquet")
    summary = json.loads((run / "summary.json").read_text())
    summary |= {"judge": blocks["openai:judge-b"], "judges": blocks}
    summary.pop("reward_model", None)
    (run / "summary.json").write_text(json.dumps(summary, allow_nan=True))

    answers, _, panel = assess(run, VerdictSpec(resamples=100))
    pair = next(p for p in panel["pairs"] if {p["a"], p["b"]} == {"openai:judge-a", "openai:judge-b"})
    assert pair["n"] == n and pair["kappa"] == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    assert panel["reads_verdict"] is False
    assert answers["better"]["answer"] == "unknown" and "no calibration" in answers["better"]["because"]
    assert [panel["judges"][name]["calibrated"] for name in ("openai:judge-a", "openai:judge-b")] == [False, False]


def test_repeats_keep_the_strength_most_repeats_give():
    """Five levels, three repeats A>>B, A>B, A>B: the verdict is first with the majority's strength 1 (not the first
    repeat's 2), and the change of strength is counted apart from changes of verdict."""
    from dpo_eval.judges.repeats import fold

    def table(strength: int) -> pl.DataFrame:
        return pl.DataFrame({"pair_id": ["p"], "split": ["valid"], "comparison": ["tuned_vs_base"], "judge": ["j"],
                             "order": ["ab"], "shown_first": ["tuned"], "verdict": ["first"], "winner": ["tuned"],
                             "prompt_tokens": [1], "completion_tokens": [1], "cached": [False],
                             "strength": [strength]})

    folded, block = fold([table(2), table(1), table(1)], 0.7)
    assert folded["strength"].to_list() == [1] and folded["verdict"].to_list() == ["first"]
    assert (block["changed"], block["strength_changed"]) == (0, 1)
    folded, _ = fold([table(2), table(2), table(1)], 0.7)
    assert folded["strength"].to_list() == [2]


def test_a_judge_without_calibration_beside_calibrated_ones_changes_no_answer(tmp_path):
    """A reward model, a calibrated LLM judge A and a judge B that judged tuned vs base only: B enters the panel's
    agreement, but the four answers are those of the run without B."""
    from dpo_eval.config import VerdictSpec
    from dpo_eval.judges.statistics import judge_summary
    from dpo_eval.studies.verdict import assess
    from tests.test_verdict import judgments_of, planted, write_run

    n, rng = 60, np.random.default_rng(11)
    scores = planted(n=n)
    a = rng.choice(["tuned", "base", "tie"], n, p=[0.7, 0.2, 0.1]).tolist()
    b = rng.choice(["tuned", "base"], n, p=[0.3, 0.7]).tolist()
    runs = {}
    for label, with_b in (("with", True), ("without", False)):
        run = write_run(tmp_path / label, scores)
        rows_a = judgments_of({"tuned_vs_base": a, "chosen_vs_rejected": ["chosen"] * n}).with_columns(
            judge=pl.lit("openai:judge-a:" + "a" * 12))
        rows_b = judgments_of({"tuned_vs_base": b}).with_columns(judge=pl.lit("openai:judge-b:" + "b" * 12))
        blocks = {"openai:judge-a": judge_summary(rows_a) | {"id": "openai:judge-a:" + "a" * 12}}
        if with_b:
            blocks["openai:judge-b"] = judge_summary(rows_b) | {"id": "openai:judge-b:" + "b" * 12}
        pl.concat([rows_a, rows_b] if with_b else [rows_a]).write_parquet(run / "judgments.parquet")
        summary = json.loads((run / "summary.json").read_text()) | {"judge": blocks["openai:judge-a"],
                                                                     "judges": blocks}
        (run / "summary.json").write_text(json.dumps(summary, allow_nan=True))
        runs[label] = assess(run, VerdictSpec(resamples=100))
    (with_b, _, panel), (without, _, _) = runs["with"], runs["without"]
    assert panel is not None and any("openai:judge-b" in (p["a"], p["b"]) for p in panel["pairs"])
    for question in ("better", "gaming"):
        assert (with_b[question]["answer"], with_b[question]["because"]) == \
            (without[question]["answer"], without[question]["because"]), question

"""The report says only what the statistics support: real statistics (dpo_eval.stats.analysis) on synthetic
features with planted effects, rendered by the real report functions through the one template."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import polars as pl
import pytest

from dpo_eval.report.page import (
    Section,
    add_section,
    read_sections,
    render_page,
    render_report,
    rewards_section,
    sentences,
    toward_chosen,
    write_outputs,
)
from dpo_eval.report.plots import paired, write_plots
from dpo_eval.stats.analysis import AnalysisSpec, run_analysis
from dpo_eval.studies.diagnostics import Check, diagnostics_section

SPEC = AnalysisSpec(bootstrap=0, permutations=200)
SCRIPT = "<script>alert(1)</script>"


def planted_features(n_train: int = 160, n_valid: int = 40, seed: int = 0, extra: tuple[str, ...] = ()) -> pl.DataFrame:
    """features.parquet-shaped table. f_both: chosen > rejected and tuned > base (0.8 sd each);
    f_tuned_only: tuned > base (0.8 sd) while chosen - rejected has a mean of +0.02 sd on every split
    (same sign, far from significant); f_null: nothing; n_tokens: tuned is longer in nearly every pair."""
    rng = np.random.default_rng(seed)
    n = n_train + n_valid
    splits = np.array(["train"] * n_train + ["valid"] * n_valid)
    values = {role: {} for role in ("chosen", "rejected", "base", "tuned")}

    def add(name, d_cr, d_tb, level=0.0):
        x = level + rng.normal(size=n)
        values["rejected"][name], values["chosen"][name] = x, x + d_cr
        values["base"][name], values["tuned"][name] = x, x + d_tb

    add("n_tokens", rng.normal(size=n) * 3, 10 + rng.normal(size=n) * 3, level=50)
    add("f_both", 0.8 + rng.normal(size=n), 0.8 + rng.normal(size=n))
    nudged = rng.normal(size=n)
    for split in ("train", "valid"):  # recentred so its mean is exactly +0.02 on each split
        nudged[splits == split] += 0.02 - nudged[splits == split].mean()
    add("f_tuned_only", nudged, 0.8 + rng.normal(size=n))
    add("f_null", rng.normal(size=n), rng.normal(size=n))
    for name in extra:
        add(name, 0.8 + rng.normal(size=n), 0.8 + rng.normal(size=n))
    frames = [pl.DataFrame({"pair_id": [f"p{i}" for i in range(n)], "split": splits.tolist(), "role": role}
                           | {k: v.tolist() for k, v in feats.items()}) for role, feats in values.items()]
    return pl.concat(frames)


@pytest.fixture(scope="module")
def analysis():
    return run_analysis(planted_features(), SPEC)


def row(stats, feature, split, comparison):
    return stats.filter((pl.col("feature") == feature) & (pl.col("split") == split)
                        & (pl.col("comparison") == comparison)).row(0, named=True)


def table_row(page: str, section_id: str, feature: str) -> str:
    section = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.S).group(1)
    rows = [r for r in re.findall(r"<tr>(.*?)</tr>", section, re.S) if f"<td>{feature}</td>" in r]
    assert len(rows) >= 1, feature
    return " ".join(rows)


def test_significance_lines_follow_alpha(tmp_path):
    features = planted_features()
    drawn, pages = {}, {}
    for alpha in (0.05, 0.001):
        result = run_analysis(features, SPEC.model_copy(update={"alpha": alpha}))
        plots = {p.src: p for p in write_plots(result.stats, result.summary, tmp_path / str(alpha))}
        drawn[alpha] = plots
        for src in ("plots/neg_log10_p.png", "plots/neg_log10_q.png"):
            for split in ("train", "valid"):
                assert plots[src].lines[split] == [pytest.approx(-math.log10(alpha))]
        write_outputs(result.stats, result.summary, tmp_path / f"run{alpha}")
        pages[alpha] = (tmp_path / f"run{alpha}" / "report.html").read_text()
    assert drawn[0.05]["plots/neg_log10_q.png"].lines != drawn[0.001]["plots/neg_log10_q.png"].lines
    assert "q = alpha = 0.001" in pages[0.001] and "q = alpha = 0.05" not in pages[0.001]
    assert "q &lt; 0.001" in pages[0.001]
    # a summary written before alpha was recorded falls back to 0.05
    old = {k: v for k, v in result.summary.items() if k != "alpha"}
    plots = {p.src: p for p in write_plots(result.stats, old, tmp_path / "old")}
    assert plots["plots/neg_log10_p.png"].lines["train"] == [pytest.approx(-math.log10(0.05))]


def test_toward_chosen_only_where_chosen_vs_rejected_is_significant(analysis, tmp_path):
    stats, alpha = analysis.stats, analysis.summary["alpha"]
    for split in ("train", "valid"):  # the planted situation, checked before relying on it
        only = row(stats, "f_tuned_only", split, "tuned_vs_base")
        assert only["q_value"] < alpha and only["sign_agreement"] == 1
        assert row(stats, "f_tuned_only", split, "chosen_vs_rejected")["q_value"] >= alpha
        assert row(stats, "f_both", split, "chosen_vs_rejected")["q_value"] < alpha
        assert row(stats, "f_both", split, "tuned_vs_base")["q_value"] < alpha
    view = {(r["feature"], r["split"]): r["direction"] for r in paired(stats, alpha).iter_rows(named=True)}
    assert view[("f_both", "valid")] == "toward chosen"
    assert "toward chosen" not in view[("f_tuned_only", "valid")]
    assert toward_chosen(stats, alpha) == {"train": 1, "valid": 1}

    summary = write_outputs(stats, analysis.summary, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "toward chosen" in table_row(page, "moved", "f_both")
    assert "toward chosen" not in table_row(page, "moved", "f_tuned_only")
    assert "1 on train and 1 on valid moved toward chosen" in summary["sentences"][0]
    assert "the target the tuning aims at" not in page

    sign = next(p for p in write_plots(stats, analysis.summary, tmp_path / "plots")
                if p.src == "plots/sign_agreement.png")
    shown = dict(zip(sign.data["features"], sign.data["shown"]))
    valid = sign.data["splits"].index("valid")
    assert shown["f_both"][valid] == 1  # green: significant in both comparisons, same direction
    assert math.isnan(shown["f_tuned_only"][valid])  # grey: chosen-vs-rejected not significant


def test_headline_gives_both_splits_power_and_caveats(analysis):
    n_valid = analysis.summary["n_pairs"]["valid"]
    low = dict(analysis.summary, power={"valid": {"n": n_valid, "shift": 0.5, "power": 0.42}})
    first = sentences(low, analysis.stats)[0]
    assert "on train (160 pairs)" in first and "on valid (40 pairs)" in first
    assert ("valid: 40 pairs; at this size one feature shifted by 0.5 S reaches p < 0.05 in its own test (before the "
            "correction across features) about 42% of the time, and less often as significant after it") in first
    assert "too few pairs to detect reliably on valid" in first
    high = dict(analysis.summary, power={"valid": {"n": n_valid, "shift": 0.5, "power": 0.97}})
    first = sentences(high, analysis.stats)[0]
    assert "about 97% of the time" in first and "too few" not in first
    assert "features of one comparison and split" in first  # the family each q is over
    all_lines = sentences(analysis.summary, analysis.stats)
    assert all("on train" in s and "on valid" in s for s in all_lines)


def test_no_train_split_is_said_up_front(tmp_path):
    features = planted_features().with_columns(pl.lit("valid").alias("split"))
    result = run_analysis(features, SPEC)
    summary = dict(result.summary)
    summary.setdefault("scale_source", "valid")  # analysis records it where it has no train split
    summary = write_outputs(result.stats, summary, tmp_path)
    assert summary["sentences"][0].startswith("There is no train split")
    headline = re.search(r'<ul class="headline">\s*<li>(.*?)</li>', (tmp_path / "report.html").read_text(), re.S)
    assert headline.group(1).startswith("There is no train split")


def test_equal_length_is_called_an_extrapolation_when_lengths_are_one_sided(analysis, tmp_path):
    shares = {"train": 0.6, "valid": 0.97}
    length = next(p for p in write_plots(analysis.stats, dict(analysis.summary, length_sign_share=shares), tmp_path)
                  if p.src == "plots/length_controlled.png")
    assert length.data["extrapolated"] == ["valid"]
    assert "On valid, 97% of the pairs' length deltas have the same sign" in length.caption
    assert "extrapolation" in length.caption and "On train" not in length.caption
    balanced = next(p for p in write_plots(analysis.stats, dict(analysis.summary, length_sign_share={
        "train": 0.55, "valid": 0.6}), tmp_path) if p.src == "plots/length_controlled.png")
    assert "extrapolation" not in balanced.caption


def test_text_is_escaped(tmp_path):
    result = run_analysis(planted_features(extra=(SCRIPT,)), SPEC)
    assert SCRIPT in result.stats["feature"].to_list()
    section = Section("notes", f"Notes {SCRIPT}", [f"a paragraph {SCRIPT}"], ["cell"], [[SCRIPT]],
                      [{"src": "plots/x.png", "alt": SCRIPT}])
    write_outputs(result.stats, result.summary, tmp_path, [section])
    page = (tmp_path / "report.html").read_text()
    assert SCRIPT not in page and page.count("<script") == 1  # only the page's own table script
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 5
    with pytest.raises(TypeError, match="Section"):
        write_outputs(result.stats, result.summary, tmp_path, ["<h2>raw html</h2>"])


def test_diagnostics_section_added_twice_appears_once(analysis, tmp_path):
    rewards = pl.DataFrame({"split": ["valid"] * 4, "scored": [True] * 4, "margin": [0.3, -0.1, 0.2, 0.5]})
    reward = rewards_section(rewards, {"valid": {"accuracy": 0.75, "margin_mean": 0.225, "margin_median": 0.25,
                                                 "n": 4, "ties": 0, "skipped": 0}}, tmp_path, beta=0.1)
    write_outputs(analysis.stats, analysis.summary, tmp_path, [reward])
    first = [Check("tokenizer: exactly one BOS per prompt", "fail", {}, "First run explanation.")]
    second = [Check("tokenizer: exactly one BOS per prompt", "pass", {}, "Second run explanation."),
              Check("quantization: 4-bit nf4 vs full precision", "warn", {"kl_mean": 0.02}, "Some KL.")]
    add_section(tmp_path, diagnostics_section(first))
    add_section(tmp_path, diagnostics_section(second))
    page = (tmp_path / "report.html").read_text()
    assert page.count('<section id="diagnostics">') == 1
    assert "Second run explanation." in page and "First run explanation." not in page
    assert 'class="status-warn"' in page
    assert [s.id for s in read_sections(tmp_path)] == ["implicit_rewards", "diagnostics"]
    assert "DPO implicit rewards (beta = 0.1)" in page and '<section id="statistics">' in page
    before = page
    assert render_report(tmp_path).read_text() == before  # the page is a function of the run's data


def test_demo_trend_goes_through_the_template(analysis, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dpo_eval.flows.demo import _append_trend

    write_outputs(analysis.stats, analysis.summary, tmp_path)
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    fig.savefig(tmp_path / "plots" / "trend.png")
    plt.close(fig)
    for _ in range(2):
        _append_trend(tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    trend = re.search(r'<section id="trend">(.*?)</section>', page, re.S).group(1)
    assert "<h2>Across checkpoints</h2>" in trend and '<img src="data:image/png;base64,' in trend  # inlined
    assert page.count('id="trend"') == 1
    saved = json.loads((tmp_path / "report_sections.json").read_text())
    assert [s["id"] for s in saved] == ["trend"]
    assert page == render_page(read_sections(tmp_path), analysis.stats, json.loads(
        (tmp_path / "summary.json").read_text()), write_plots(analysis.stats, analysis.summary, tmp_path / "plots"),
        run_dir=tmp_path)


def test_rewards_section_reads_one_object_per_split(tmp_path):
    rewards = pl.DataFrame({"split": ["train", "valid"], "scored": [True, True], "margin": [0.1, -0.2]})
    per_split = {"train": {"accuracy": 1.0, "margin_mean": 0.1, "margin_median": 0.1, "n": 1, "ties": 0},
                 "valid": {"accuracy": 0.0, "margin_mean": -0.2, "margin_median": -0.2, "n": 1, "ties": 0}}
    new = rewards_section(rewards, per_split, tmp_path, beta=0.2)
    old = rewards_section(rewards, per_split | {"beta": 0.2}, tmp_path)
    assert new == old and [r[0] for r in new.rows] == ["train", "valid"]
    assert new.title == "DPO implicit rewards (beta = 0.2)" and (tmp_path / "plots" / "implicit_rewards.png").is_file()


def test_summary_count_toward_chosen_uses_the_report_rule(analysis):
    """summary.json's significant_toward_chosen counts what the report calls toward chosen, no more
    (f_tuned_only moved significantly and agrees in sign, but chosen-vs-rejected is not significant)."""
    from dpo_eval.report.page import toward_chosen

    counts = analysis.summary["significant_toward_chosen"]
    assert counts == toward_chosen(analysis.stats, analysis.summary["alpha"]) and counts["train"] == 1


def test_jsonable_and_finite_agree_on_what_json_can_hold():
    import json
    import math

    import numpy as np

    from dpo_eval.jsonsafe import finite, jsonable

    value = {"a": [1.5, math.nan, (np.float32(2.0), -math.inf)], "b": np.int64(3), "c": "x", "d": None, "e": True}
    assert jsonable(value) == {"a": [1.5, None, [2.0, None]], "b": 3, "c": "x", "d": None, "e": True}
    json.dumps(jsonable(value), allow_nan=False)  # strict JSON accepts it
    assert [finite(x) for x in (1, 2.5, np.float64(1.0), math.nan, math.inf, np.nan, True, "1", None)] == \
        [True, True, True, False, False, False, False, False, False]


def test_the_headline_says_when_a_recorded_split_lets_prompts_straddle(analysis):
    source = ("checkpoint training metadata, as recorded; 3 prompt(s) have pairs on both sides (the split was by pair "
              "when it was trained), so their valid pairs share a prompt the model was trained on and are not fully "
              "held out")
    first = sentences(dict(analysis.summary, split_source=source), analysis.stats)[0]
    assert first.startswith("The split is checkpoint training metadata, as recorded; 3 prompt(s) have pairs on both")
    plain = sentences(dict(analysis.summary, split_source="checkpoint training metadata"), analysis.stats)[0]
    assert "both sides" not in plain

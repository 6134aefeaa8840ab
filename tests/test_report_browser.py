"""The report in a real browser: a run directory made by the core pipeline (real orca pairs, stories260k with
a LoRA adapter, TextDescriptives scores, the paired statistics, implicit rewards), its report.html opened in
headless Chromium through Playwright: no console error, the statistics table sorts and filters, the verdict's
links land on sections, nothing points outside the file."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import polars as pl
import pytest

from tests.builders import make_adapter


def chromium() -> str:
    """Debian's Chromium; skip without it (or fail under CI, DPO_EVAL_REQUIRE_SHARED=1, whose .ci/run installs it)."""
    path = shutil.which("chromium")
    try:
        import playwright.sync_api  # noqa: F401
        missing = None if path else "chromium is not installed (apt-get install -y chromium; .ci/run installs it)"
    except ImportError:
        missing = "playwright is not installed (it is in the test extra: pip install -e .[test])"
    if missing:  # under CI a missing browser or playwright fails, never skips
        if os.environ.get("DPO_EVAL_REQUIRE_SHARED") == "1":
            pytest.fail(missing + " (DPO_EVAL_REQUIRE_SHARED=1)")
        pytest.skip(missing)
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, orca_jsonl, stories260k) -> Path:
    from dpo_eval.config import AnalysisSpec, DatasetSpec, GenerationSpec, ModelSpec, ScoringSpec
    from dpo_eval.data.pairs import read_pairs
    from dpo_eval.generation.logprobs import reward_summary
    from dpo_eval.identity import model_identity
    from dpo_eval.report.page import rewards_section, write_outputs
    from dpo_eval.stages import compute_rewards, features_table, generate_shard, release_models, score_frame, texts_of
    from dpo_eval.stats.analysis import run_analysis

    root = tmp_path_factory.mktemp("report-run")
    out = root / "run"
    out.mkdir()
    spec = ModelSpec(base=str(stories260k), adapter=str(make_adapter(stories260k, root / "adapter", zero=False,
                                                                     seed=5)), quantization="none",
                     compute_dtype="float32")
    pairs, _ = read_pairs(DatasetSpec(source=str(orca_jsonl), limit=16, valid_fraction=0.5))
    identity = model_identity(spec)
    answers = pl.concat([generate_shard(spec, GenerationSpec(max_new_tokens=24, batch_size=16), pairs, m,
                                       identity.key(m))[0] for m in ("base", "tuned")])
    rewards = compute_rewards(spec, pairs, 0.1, None, identity.tuned_key)
    release_models()
    texts = texts_of(pairs, answers)
    scores, _ = score_frame(texts, ScoringSpec(cache_dir=root / "scores", n_process=1))
    features = features_table(texts, scores)
    for name, frame in (("pairs", pairs), ("answers", answers), ("features", features)):
        frame.write_parquet(out / f"{name}.parquet")
    analysis = run_analysis(features, AnalysisSpec(bootstrap=200, permutations=200))
    per_split = reward_summary(rewards)
    summary = analysis.summary | {"implicit_reward": per_split}
    write_outputs(analysis.stats, summary, out, [rewards_section(rewards, per_split, out, beta=0.1)])
    from dpo_eval.studies.verdict import write_verdict

    write_verdict(out)  # the four answers open the page
    return out


def test_report_in_a_browser(browser, run_dir, tmp_path):
    report = run_dir / "report.html"
    size = report.stat().st_size
    assert size < 3_000_000, size
    stats = pl.read_parquet(run_dir / "stats.parquet")
    summary = json.loads((run_dir / "summary.json").read_text())
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors, outside = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(report.as_uri())
    page.wait_for_load_state("load")

    # nothing the page points at is outside the file (links are in-page anchors, images data: URIs)
    addresses = page.eval_on_selector_all("[src], [href]", "els => els.map(e => e.getAttribute('src') || "
                                          "e.getAttribute('href'))")
    assert addresses and all(a.startswith(("#", "data:")) for a in addresses), addresses
    assert outside == []
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.naturalWidth, e.alt])")
    assert len(images) >= 4 and all(w > 0 for w, _ in images), images  # every inlined image decodes

    # the four answers first: as summary.json holds them, each evidence link landing on a section of the page
    answers = page.locator("#answers .q")
    assert answers.count() == 4
    for i, question in enumerate(("alignment", "better", "forgetting", "gaming")):
        card = answers.nth(i)
        held = summary["verdict"][question]
        assert card.get_attribute("data-question") == question
        assert card.locator(".a").inner_text() == held["answer"]
        assert card.locator(".because").inner_text().startswith(held["because"][:60])
        link = card.locator(".because a")
        if link.count():
            assert page.locator(link.get_attribute("href")).count() == 1
    assert summary["verdict"]["alignment"]["answer"] in ("yes", "no", "unknown")  # implicit rewards on 8 valid pairs
    assert page.locator("#answers").bounding_box()["y"] < page.locator("#verdict").bounding_box()["y"]

    # the feature overview: numbers of summary.json, each claim linking to a section on the page
    verdict = page.locator("#verdict")
    text = verdict.inner_text()
    n_features = summary["n_features"]
    for split, moved in summary["significant"]["tuned_vs_base"].items():
        assert f"{moved} of {n_features}" in text
    assert f"{summary['implicit_reward']['valid']['accuracy']:.2f}" in text
    assert f"{summary['sign_agreement']['valid']:.2f}" in text
    targets = verdict.locator("a").evaluate_all("els => els.map(e => e.getAttribute('href'))")
    assert {"#moved", "#implicit_rewards", "#stats-table"} <= set(targets)
    for target in set(targets):
        assert page.locator(target).count() == 1, target
    assert page.locator("#plot-deltas svg g title").count() > n_features  # two comparisons x two splits

    # the table: every feature x split x comparison row; sort by q ascending and descending
    table = page.locator("#stats-table")
    rows = table.locator("tbody tr")
    assert rows.count() == stats.height
    headers = table.locator("thead th").all_inner_texts()
    q_col = headers.index("q_value")

    def q_values():
        keys = table.locator(f"tbody tr:not([hidden]) td:nth-child({q_col + 1})").evaluate_all(
            "els => els.map(e => e.getAttribute('data-v'))")
        return [float(k) if k else math.nan for k in keys]

    table.locator("thead th", has_text="q_value").click()
    ascending = q_values()
    finite = [q for q in ascending if not math.isnan(q)]
    assert finite == sorted(finite) and len(finite) == stats["q_value"].is_not_nan().sum()
    assert all(math.isnan(q) for q in ascending[len(finite):])  # no value: last
    assert finite[0] == pytest.approx(stats["q_value"].fill_nan(None).min())
    table.locator("thead th", has_text="q_value").click()
    descending = [q for q in q_values() if not math.isnan(q)]
    assert descending == sorted(finite, reverse=True)

    # filter by a family, then significant only
    family = "readability"
    page.select_option("#family-filter", family)
    shown = table.locator("tbody tr:not([hidden])")
    assert shown.count() == stats.filter(pl.col("family") == family).height > 0
    assert set(shown.evaluate_all("els => els.map(e => e.cells[1].textContent)")) == {family}
    page.select_option("#family-filter", "")
    page.check("#significant-only")
    alpha = summary["alpha"]
    assert shown.count() == stats.filter(pl.col("q_value") < alpha).height
    assert all(q < alpha for q in q_values())
    page.uncheck("#significant-only")
    assert shown.count() == stats.height

    # examples: the prompt and four answers of each shown pair; chosen and rejected are orca's own texts
    examples = page.locator("#examples .pair")
    assert 4 <= examples.count() <= 6
    first = examples.first
    assert first.locator(".answer").count() == 4
    pairs = pl.read_parquet(run_dir / "pairs.parquet")
    pair_id = first.locator("b").first.inner_text()
    chosen = pairs.filter(pl.col("pair_id") == pair_id)["chosen"][0]
    assert chosen[:200] in first.locator(".role-chosen .text").inner_text()
    assert first.locator(".values tr").count() >= 4 * 2

    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    page.locator("#verdict").screenshot(path=str(tmp_path / "verdict.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert errors == []
    page.close()


def test_the_gap_drawing_places_base_and_tuned_where_summary_json_says(browser, tmp_path):
    """A run with planted reward-model scores (base at 0.3, tuned at 0.6 of the rejected-to-chosen gap): the page's
    line puts each system at its position, in order along the axis, and says the share closed."""
    import numpy as np

    from dpo_eval.studies.verdict import write_verdict
    from tests.test_verdict import SPEC, planted, write_run

    rng = np.random.default_rng(12)
    scores = planted()
    run = write_run(tmp_path / "run", scores, {r: rng.integers(5, 40, 60).astype(float) for r in scores})
    summary = write_verdict(run, SPEC)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((run / "report.html").as_uri())
    gap = summary["gap"]["reward model"]
    figure = page.locator("#answers figure.gap")
    assert figure.count() == 1 and figure.get_attribute("data-judge") == "reward model"
    marks = {m.get_attribute("data-role"): m for m in figure.locator("g.mark").all()}
    assert set(marks) == {"rejected", "chosen", "base", "tuned"}
    for role, expected in (("rejected", 0.0), ("chosen", 1.0), ("base", gap["base"]), ("tuned", gap["tuned"])):
        assert float(marks[role].get_attribute("data-position")) == pytest.approx(expected, abs=1e-9)
        assert marks[role].locator("text").text_content() == f"{role} {expected:.2f}"
    x = {role: float(m.locator("circle").get_attribute("cx")) for role, m in marks.items()}
    assert x["rejected"] < x["base"] < x["tuned"] < x["chosen"]
    assert (x["tuned"] - x["base"]) / (x["chosen"] - x["rejected"]) == pytest.approx(gap["closed"], abs=0.01)
    assert figure.locator("figcaption").inner_text() == gap["sentence"]
    assert page.locator('#answers .q[data-question="better"] .a').inner_text() == "yes"
    page.locator("#answers").screenshot(path=str(tmp_path / "answers.png"))
    assert (tmp_path / "answers.png").stat().st_size > 5_000 and errors == []
    page.close()

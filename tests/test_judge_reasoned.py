"""Reasoned, five-level and reference-guided verdicts (issue 23 §2) through `dpo-eval judge` against the scripted
OpenAI-compatible server: the justification kept per judgment and shown in the report, the strength kept and the
Arena-Hard-weighted win rate equal to a numpy reference from the verdicts the script gives, the reference answer in
the messages of exactly the pairs that have one, a bad references file named with its line, and a justification
without a final verdict never cached."""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from dpo_eval.cli.main import main
from dpo_eval.config import JudgeSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.judges.pairwise import dry_run
from tests.scripted_judge import ScriptedJudge, always, five_level_rule, marker_rule, rationale_of, reasoned
from tests.test_judge_scripted import DESIGN, write_tables

MT_BENCH_REFERENCES = Path("/work/shared/data/mt_bench/reference_answer_gpt-4.jsonl")
STRONG = {"p0": "tuned", "p2": "tuned", "p6": "base", "p1": "chosen"}  # answers that also hold STRONG


def cli(run: Path, server: ScriptedJudge, cache: Path, *extra: str) -> int:
    """`dpo-eval judge` in this process (no --max-tokens unless `extra` gives it); its exit code."""
    os.environ["DPO_EVAL_CACHE"] = str(cache)
    try:
        main(["judge", str(run), "--judge", "openai", "--judge-model", "scripted", "--base-url", server.url,
              "--concurrency", "4", *extra])
    except SystemExit as exc:
        return exc.code or 0
    finally:
        os.environ.pop("DPO_EVAL_CACHE", None)
    return 0


def even_run(folder: Path, strong: dict | None = None, extra: dict | None = None) -> Path:
    """A run of DESIGN's verdicts whose four answers all have three words and no markdown, so the length and style
    controls have no variation to fit (they are not what these tests check, and their bootstraps are slow); the
    answers of `strong` {pair_id: role} also hold STRONG."""
    folder.mkdir(parents=True)
    rows = []
    for i, (_, tuned_good, base_good, _) in enumerate(DESIGN):
        def text(tag: str, good: bool, role: str) -> str:
            return f"{tag}{i} {'GOOD' if good else 'plain'} {'STRONG' if (strong or {}).get(f'p{i}') == role else 'words'}"
        rows.append({"pair_id": f"p{i}", "split": "valid", "system": "", "prompt": f"Question {i}?",
                     "chosen": text("c", True, "chosen"), "rejected": text("r", False, "rejected"),
                     "tuned": text("t", bool(tuned_good), "tuned"), "base": text("b", bool(base_good), "base"),
                     **(extra or {}).get(f"p{i}", {})})
    return write_tables(folder, pl.DataFrame(rows))


@pytest.fixture(scope="module")
def five_level(tmp_path_factory):
    """A reasoned, five-level run of DESIGN with STRONG planted: its folder, the dry run made before it, and the
    server that answered."""
    folder = tmp_path_factory.mktemp("reasoned")
    run = even_run(folder / "run", STRONG)
    spec = JudgeSpec(model="scripted", base_url="http://127.0.0.1:9/v1", judge_style="reasoned", verdict_levels=5,
                     cache_dir=folder / "cache" / "judge")
    plan = dry_run(run, spec)
    with ScriptedJudge(reasoned(five_level_rule())) as server:
        code = cli(run, server, folder / "cache", "--judge-style", "reasoned", "--verdict-levels", "5")
    assert code == 0
    return run, plan, server


def test_reasoned_replies_keep_their_justification_and_the_report_shows_it(five_level):
    run, plan, server = five_level
    assert plan["calls"] == 4 * len(DESIGN) and plan["completion_tokens"] == plan["calls"] * 1024  # reasoned default
    block = json.loads((run / "summary.json").read_text())["judge"]
    assert (block["judge_style"], block["max_tokens"], block["invalid"]) == ("reasoned", 1024, 0)
    assert server.messages[0][-1]["content"].rstrip().endswith("[[B>>A]] if answer B is much better.")
    table = pl.read_parquet(run / "judgments.parquet")
    texts = {r["pair_id"]: r for r in pl.read_parquet(run / "pairs.parquet").iter_rows(named=True)}
    answers = {(r["pair_id"], r["model"]): r["answer"] for r in pl.read_parquet(run / "answers.parquet").iter_rows(named=True)}
    for row in table.iter_rows(named=True):
        text = {role: texts[row["pair_id"]].get(role) or answers.get((row["pair_id"], role))
                for role in ("chosen", "rejected", "tuned", "base")}
        first, second = (row["comparison"].split("_vs_") if row["order"] == "ab" else row["comparison"].split("_vs_")[::-1])
        assert row["rationale"] == rationale_of(text[first], text[second])
        assert row["raw"].startswith(row["rationale"]) and row["p_first"] is None
    page = html.unescape((run / "report.html").read_text())
    assert "justification (A first | B first)" in page
    assert rationale_of(answers[("p0", "tuned")], answers[("p0", "base")]) in page  # p0, a tuned win, is an example


def test_five_level_strength_is_kept_and_the_weighted_rate_matches_numpy(five_level):
    run, _, _ = five_level
    table = pl.read_parquet(run / "judgments.parquet").filter(pl.col("comparison") == "tuned_vs_base").sort("pair_id", "order")
    # what the script says, pair by pair: GOOD decides the winner, STRONG (on the winner) makes it strong
    expected = {}
    for i, (_, tuned_good, base_good, _) in enumerate(DESIGN):
        pid = f"p{i}"
        winner = "tie" if tuned_good == base_good else "tuned" if tuned_good else "base"
        expected[pid] = (winner, 0 if winner == "tie" else 2 if STRONG.get(pid) == winner else 1)
    assert [(r["pair_id"], r["winner"], r["strength"]) for r in table.iter_rows(named=True)] == \
        [(pid, *expected[pid]) for pid in sorted(expected) for _ in ("ab", "ba")]
    score = np.array([{"tuned": 1.0, "tie": 0.5, "base": 0.0}[w] for w, _ in expected.values()])
    weight = np.array([3.0 if s == 2 else 1.0 for _, s in expected.values()])
    reference = (2 * weight * score).sum() / (2 * weight).sum()  # both orders of each pair, a strong verdict thrice
    tb = json.loads((run / "summary.json").read_text())["judge"]["splits"]["valid"]["tuned_vs_base"]
    assert tb["weighted_win_rate"] == pytest.approx(reference, abs=1e-12) and reference == pytest.approx(11 / 16)
    assert tb["win_rate"] == pytest.approx((6 + 2 / 2) / 10)  # the headline counts each verdict once
    assert (tb["weighted_games"], tb["strong_verdicts"]) == (20, 6) and "3 times" in tb["weighting"]
    boot = sps.bootstrap((2 * weight * score, 2 * weight), lambda n, d: n.sum() / d.sum(), paired=True,
                         vectorized=False, method="percentile", n_resamples=4000, random_state=1).confidence_interval
    assert (tb["weighted_ci_low"], tb["weighted_ci_high"]) == pytest.approx((boot.low, boot.high), abs=0.04)
    page = html.unescape((run / "report.html").read_text())
    assert f"weighted win rate {reference:.2f} [" in page


def test_the_reference_is_shown_for_the_pairs_that_have_one_and_only_there(tmp_path):
    mt = {str(r["question_id"]): r["choices"][0]["turns"][0]
          for r in map(json.loads, MT_BENCH_REFERENCES.read_text().splitlines())}
    extra = {"p0": {"question_id": 101}, "p1": {"question_id": 130}, "p2": {"question_id": 81},  # 81: no reference
             "p3": {"reference": "COLUMN REFERENCE three"}}
    run = even_run(tmp_path / "run", extra={f"p{i}": {"question_id": 900 + i, "reference": None} | extra.get(f"p{i}", {})
                                            for i in range(len(DESIGN))})
    wanted = {0: mt["101"], 1: mt["130"], 3: "COLUMN REFERENCE three"}
    with ScriptedJudge(marker_rule()) as server:
        assert cli(run, server, tmp_path / "cache", "--references", str(MT_BENCH_REFERENCES), "--max-tokens", "8") == 0
    assert len(server.messages) == 4 * len(DESIGN)
    for messages in server.messages:
        user = messages[-1]["content"]
        pair = int(re.search(r"Question (\d+)\?", user).group(1))
        if pair in wanted:
            assert f"[Reference answer]\n{wanted[pair]}\n\n[Answer A]" in user and "reference" in messages[0]["content"]
        else:
            assert "Reference" not in user and "reference" not in messages[0]["content"]
    table = pl.read_parquet(run / "judgments.parquet")
    assert sorted(table.filter("has_reference")["pair_id"].unique()) == ["p0", "p1", "p3"]
    block = json.loads((run / "summary.json").read_text())["judge"]
    assert block["references"] == {"judgments": 12, "pairs": 3, "of": 40, "source": str(MT_BENCH_REFERENCES)}
    assert block["splits"]["valid"]["tuned_vs_base"]["wins"] == 6  # the marker still decides
    assert "12 of 40 verdicts (3 pairs) were made with a reference answer" in html.unescape((run / "report.html").read_text())


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    return even_run(tmp_path_factory.mktemp("refs") / "run", extra={f"p{i}": {"question_id": 100 + i} for i in range(10)})


@pytest.mark.parametrize("content, said", [
    (None, r"refs.jsonl: no such file"),
    ('{"question_id": 100, "choices": [{"turns": ["x"]}]}\nnot json\n', r"refs.jsonl line 2: not JSON"),
    ('{"choices": [{"turns": ["x"]}]}\n', r"refs.jsonl line 1: no question_id"),
    ('{"question_id": 100, "choices": []}\n', r"refs.jsonl line 1 \(question_id 100\): no reference answer"),
    ('{"question_id": 7, "choices": [{"turns": ["x"]}]}\n', r"refs.jsonl: none of its 1 question_ids .*pairs.parquet"),
])
def test_a_bad_references_file_is_named_with_its_line(labelled_run, tmp_path, content, said):
    path = tmp_path / "refs.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DpoEvalError, match=said):
        dry_run(labelled_run, JudgeSpec(model="m", base_url="http://127.0.0.1:9/v1", references=path,
                                        cache_dir=tmp_path / "cache"))


def test_a_question_id_on_two_pairs_is_refused_with_references(tmp_path):
    run = even_run(tmp_path / "run", extra={f"p{i}": {"question_id": str(101 if i < 2 else 110 + i)}
                                            for i in range(len(DESIGN))})
    with pytest.raises(DpoEvalError, match=r"--references .*reference_answer_gpt-4.jsonl: question_id 101 is on 2 "
                                           r"pairs in .*run/pairs.parquet \(pair_ids p0, p1\)"):
        dry_run(run, JudgeSpec(model="m", base_url="http://127.0.0.1:9/v1", references=MT_BENCH_REFERENCES,
                               cache_dir=tmp_path / "cache"))


def test_a_template_that_never_shows_the_reference_is_refused_with_references(labelled_run, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{{ prompt }}\n[A] {{ answer_a }}\n[B] {{ answer_b }}\nReply [[A]], [[B]] or [[tie]].")
    references = tmp_path / "refs.jsonl"
    references.write_text('{"question_id": 100, "choices": [{"turns": ["REF"]}]}\n')
    with pytest.raises(DpoEvalError, match=r"plain.jinja never shows `reference`.*--references"):
        dry_run(labelled_run, JudgeSpec(model="m", base_url="http://127.0.0.1:9/v1", references=references,
                                        template=template, cache_dir=tmp_path / "cache"))
    plan = dry_run(labelled_run, JudgeSpec(model="m", base_url="http://127.0.0.1:9/v1", references=references,
                                           cache_dir=tmp_path / "cache"))
    assert plan["with_reference"] > 0  # the project's template shows it

def test_a_justification_without_a_final_verdict_is_invalid_and_not_cached(tmp_path, capsys):
    run = even_run(tmp_path / "run")
    reply = "At first I thought [[A]] was right.\nOn reflection I cannot decide."  # a verdict-only reader would say A
    with ScriptedJudge(always(reply)) as server:
        for _ in range(2):
            assert cli(run, server, tmp_path / "cache", "--judge-style", "reasoned", "--limit", "2") == 0
    table = pl.read_parquet(run / "judgments.parquet")
    assert table.height == 8 and set(table["verdict"]) == {"invalid"} and table["rationale"].null_count() == 8
    assert server.requests == 16  # nothing cached: the second run asked every judgment again
    # the hf judge reads verdicts from log-probabilities: the reasoned style is refused, naming the option
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["judge", str(run), "--judge", "hf", "--judge-model", "stories", "--judge-style", "reasoned"])
    assert exit_info.value.code == 2 and "--judge-style" in capsys.readouterr().err


def test_the_local_judge_sees_the_reference_too(tmp_path):
    """The hf judge renders the reference-guided template through its tokenizer (no weights loaded here)."""
    from dpo_eval.judges.pairwise import plan_requests

    run = even_run(tmp_path / "run", extra={"p0": {"reference": "REF zero"}, "p1": {"reference": None}})
    spec = JudgeSpec(kind="hf", model="/work/shared/models/stories260k", cache_dir=tmp_path / "cache", limit=2)
    *_, local, _, requests = plan_requests(run, spec)
    shown = {(req["pair_id"], "[Reference answer]\nREF zero" in local.text(req["messages"]), req["has_reference"])
             for req in requests}
    assert shown == {("p0", True, True), ("p1", False, False)} and local.loaded is None


@pytest.mark.parametrize("raw, style, levels, reading", [
    ("[[B>>A]]", "verdict", 5, ("second", 2, None)),
    ("**A=B**", "verdict", 5, ("tie", 0, None)),
    ("[[A>B]] or rather [[A>>B]]", "verdict", 5, ("invalid", None, None)),
    ("Both fine.\n\n[[tie]]", "reasoned", 3, ("tie", 0, "Both fine.")),
    ("A is right.\nVerdict: [[A>B]]", "reasoned", 5, ("first", 1, "A is right.")),
    ("A is right.\n[[A]]", "reasoned", 5, ("invalid", None, None)),  # a three-level mark where five are asked
])
def test_replies_are_read_by_style_and_levels(raw, style, levels, reading):
    from dpo_eval.judges.verdicts import read_reply

    assert tuple(vars(read_reply(raw, style, levels)).values()) == reading


def test_the_new_settings_reach_the_ui_form_with_titles():
    from dpo_eval.config import EvalConfig

    fields = EvalConfig.model_json_schema()["$defs"]["JudgeSpec"]["properties"]
    assert [fields[name]["title"] for name in ("judge_style", "verdict_levels", "references", "max_tokens")] == \
        ["Judge style", "Verdict levels", "Reference answers (JSONL)", "Max reply tokens"]
    assert JudgeSpec.model_validate_json(JudgeSpec(model="m", judge_style="reasoned").model_dump_json()).max_tokens == 1024


def test_a_long_reference_is_cut_to_fit_and_flagged():
    from dpo_eval.judges.prompt import CUT_MARK, prompt_chars, render
    from dpo_eval.judges.templates import judge_template

    template = judge_template(JudgeSpec(model="m"), with_reference=True)
    long = "R" * 5000
    rendered = render(template, "", "Why?", "yes " * 10, "no " * 10, context_chars=2000, answer_share=0.35,
                      reference=long)
    user = rendered.messages[-1]["content"]
    assert rendered.truncated and prompt_chars(rendered.messages) <= 2000 and "Why?" in user
    assert "[Reference answer]\nRRR" in user and CUT_MARK + "\n\n[Answer A]" in user
    plain = render(template, "", "Why?", "yes", "no", context_chars=2000, answer_share=0.35)
    assert not plain.truncated and "Reference" not in plain.messages[-1]["content"]

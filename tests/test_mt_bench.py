"""Two-turn prompt sets and categories (issue 23 §3): MT-Bench's questions end to end on stories260k (it answers
nonsense; the test checks the dialogue each turn saw, the per-turn and per-category tables, and what the scripted
judge was shown), and the per-category win rates against statsmodels and scipy on verdicts known in advance."""

from __future__ import annotations

import json
import os

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, JudgeSpec, ModelSpec, ScoringSpec
from dpo_eval.data.pairs import PAIR_COLUMNS, read_pairs
from dpo_eval.errors import DpoEvalError
from tests.builders import make_adapter
from tests.conftest import shared_path
from tests.scripted_judge import ScriptedJudge, longer_rule

PICKED = (81, 82, 111, 112, 113, 114, 115, 116)  # 2 writing (no reference), 6 math (references): 8 questions
MAX_NEW = 6


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    source = shared_path("data/mt_bench/question.jsonl")
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    picked = [r for r in records if r["question_id"] in PICKED]
    path = tmp_path_factory.mktemp("mtbench") / "question.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return {"path": path, "records": {str(r["question_id"]): r for r in picked}}


@pytest.fixture(scope="module")
def mt_run(harness, tmp_path_factory, questions, stories260k):
    """One evaluation of the 8 questions, two turns, with the scripted judge (the longer answer wins)."""
    from dpo_eval.flows.evaluate import evaluate_checkpoint

    root = tmp_path_factory.mktemp("mtrun")
    adapter = make_adapter(stories260k, root / "adapter", zero=False, seed=3)
    old = os.environ.get("DPO_EVAL_CACHE")
    os.environ["DPO_EVAL_CACHE"] = str(root / "cache")
    try:
        with ScriptedJudge(longer_rule()) as server:
            config = EvalConfig(
                dataset=DatasetSpec(source=str(questions["path"])),
                model=ModelSpec(base=str(stories260k), adapter=str(adapter), quantization="none",
                                compute_dtype="float32"),
                generation=GenerationSpec(max_new_tokens=MAX_NEW, batch_size=8),
                scoring=ScoringSpec(cache_dir=root / "scores", n_process=1),
                analysis=AnalysisSpec(bootstrap=20, permutations=20), out=root / "run", shard_size=8,
                judge=JudgeSpec(model=server.model, base_url=server.url, max_tokens=8, concurrency=2))
            summary = evaluate_checkpoint(config)
            messages = list(server.messages)
    finally:
        if old is None:
            os.environ.pop("DPO_EVAL_CACHE", None)
        else:
            os.environ["DPO_EVAL_CACHE"] = old
    return {"out": root / "run", "summary": summary, "messages": messages, "adapter": adapter}


def test_pairs_of_a_prompt_set_carry_turn_2_category_and_reference(mt_run, questions):
    pairs = pl.read_parquet(mt_run["out"] / "pairs.parquet")
    assert pairs.height == 8 and set(pairs["split"]) == {"valid"}
    assert pairs["chosen"].null_count() == 8 and pairs["rejected"].null_count() == 8  # no labels
    for row in pairs.iter_rows(named=True):
        record = questions["records"][row["question_id"]]
        assert row["prompt"] == record["turns"][0] and row["turn2"] == record["turns"][1]
        assert row["category"] == record["category"]
        assert row["reference"] == (record.get("reference") or [None])[0]
        assert row["reference_turn2"] == (record.get("reference") or [None, None])[1]
    assert sorted(pairs["category"].unique()) == ["math", "writing"]


def _plain(turns: list[str]) -> str:
    """The plain prompt format (stories260k has no chat template) written out by hand: one user turn as itself, a
    dialogue as a Human/Assistant transcript; then the template's newline (Jinja drops its last one)."""
    if len(turns) == 1:
        return turns[0] + "\n"
    labels = ["Human", "Assistant", "Human"]
    return "\n\n".join(f"{label}: {text}" for label, text in zip(labels, turns)) + "\n"


def test_each_model_answers_turn_2_after_its_own_turn_1_answer(mt_run, stories260k):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    answers = pl.read_parquet(mt_run["out"] / "answers.parquet")
    assert answers.group_by("turn", "model").len().sort("turn", "model").rows() == [
        (1, "base", 8), (1, "tuned", 8), (2, "base", 8), (2, "tuned", 8)]
    pairs = pl.read_parquet(mt_run["out"] / "pairs.parquet")
    tok = AutoTokenizer.from_pretrained(stories260k)
    wide = {(r["pair_id"], r["model"], r["turn"]): r for r in answers.iter_rows(named=True)}
    model = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    told_apart = 0
    for pair in pairs.iter_rows(named=True):
        pid = pair["pair_id"]
        for side in ("base", "tuned"):
            assert wide[(pid, side, 1)]["n_prompt_tokens"] == len(tok(_plain([pair["prompt"]]))["input_ids"])
        for own, other in (("base", "tuned"), ("tuned", "base")):
            a1, a1_other = wide[(pid, own, 1)]["answer"], wide[(pid, other, 1)]["answer"]
            ids = tok(_plain([pair["prompt"], a1, pair["turn2"]]))["input_ids"]
            assert wide[(pid, own, 2)]["n_prompt_tokens"] == min(len(ids), 512 - MAX_NEW)
            other_ids = tok(_plain([pair["prompt"], a1_other, pair["turn2"]]))["input_ids"]
            told_apart += len(other_ids) != len(ids)
        # the base model (no adapter) given the dialogue by hand, greedy: the same turn-2 answer
        ids = tok(_plain([pair["prompt"], wide[(pid, "base", 1)]["answer"], pair["turn2"]]), return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id or 0)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text.startswith(wide[(pid, "base", 2)]["answer"])
    assert told_apart > 0  # the token counts can tell one model's turn-1 answer from the other's


def test_turn_2_is_judged_with_the_whole_dialogue_and_the_reference(mt_run, questions):
    judgments = pl.read_parquet(mt_run["out"] / "judgments.parquet")
    assert judgments.group_by("turn").len().sort("turn").rows() == [(1, 16), (2, 16)]  # 8 pairs x 2 orders
    pairs = pl.read_parquet(mt_run["out"] / "pairs.parquet")
    answers = pl.read_parquet(mt_run["out"] / "answers.parquet")
    text = {(r["pair_id"], r["model"], r["turn"]): r["answer"] for r in answers.iter_rows(named=True)}
    users = [next(m["content"] for m in ms if m["role"] == "user") for ms in mt_run["messages"]]
    for pair in pairs.iter_rows(named=True):
        pid = pair["pair_id"]
        second = [u for u in users if pair["turn2"] in u]
        assert len(second) == 2  # both orders of turn 2; turn 1's prompts never hold the turn-2 question
        for user in second:
            assert pair["prompt"] in user
            for model in ("tuned", "base"):
                assert text[(pid, model, 1)] in user and text[(pid, model, 2)] in user
            record = questions["records"][pair["question_id"]]
            for reference in record.get("reference") or []:
                assert reference in user
    math_refs = [questions["records"][q]["reference"][1] for q in questions["records"]
                 if questions["records"][q]["category"] == "math"]
    assert all(any(r in u for u in users) for r in math_refs)


def _two_turn_run(folder, questions) -> None:
    """A judged-ready run folder of the picked questions without generation: pairs as read from question.jsonl,
    answers to both turns, features with n_tokens (the judge's lengths)."""
    pairs, _ = read_pairs(DatasetSpec(source=str(questions["path"])))
    folder.mkdir()
    pairs.write_parquet(folder / "pairs.parquet")
    pl.DataFrame([{"pair_id": p, "model": m, "turn": t, "answer": f"{m} answer {t} to {p}", "n_new_tokens": 4}
                  for p in pairs["pair_id"] for m in ("tuned", "base") for t in (1, 2)]).write_parquet(
        folder / "answers.parquet")
    pl.DataFrame([{"pair_id": p, "split": "valid", "role": m, "n_tokens": 4.0} for p in pairs["pair_id"]
                  for m in ("tuned", "base")]).write_parquet(folder / "features.parquet")
    (folder / "summary.json").write_text(json.dumps({"n_pairs": {"valid": pairs.height}}))


def test_references_file_reaches_both_turns_and_wins_over_the_questions_own(questions, tmp_path):
    """`judge --references reference_answer_gpt-4.jsonl` on a two-turn run: turn 1 shows the file's turns[0], turn
    2's dialogue prompt both turns of the file (not question.jsonl's short references), has_reference on both."""
    from tests.test_judge_scripted import judge_cli

    run = tmp_path / "run"
    _two_turn_run(run, questions)
    file = shared_path("data/mt_bench/reference_answer_gpt-4.jsonl")
    gpt4 = {str(r["question_id"]): r["choices"][0]["turns"] for r in map(json.loads, file.read_text().splitlines())}
    with ScriptedJudge(longer_rule()) as server:
        judge_cli(run, server, tmp_path / "cache", "--references", str(file))
        users = [next(m["content"] for m in ms if m["role"] == "user") for ms in server.messages]
    pairs = pl.read_parquet(run / "pairs.parquet")
    for pair in pairs.iter_rows(named=True):
        first = [u for u in users if pair["prompt"] in u and pair["turn2"] not in u]
        second = [u for u in users if pair["turn2"] in u]
        assert len(first) == 2 and len(second) == 2
        refs = gpt4.get(pair["question_id"])
        if refs is None:  # writing: no reference anywhere
            assert not any("[Reference answer" in u for u in first + second)
            continue
        assert all(refs[0] in u and refs[1] not in u for u in first)
        for user in second:
            assert f"[Reference answer, turn 1]\n{refs[0]}" in user and f"[Reference answer, turn 2]\n{refs[1]}" in user
            assert f"[Reference answer, turn 2]\n{pair['reference_turn2']}" not in user  # the file wins
    judgments = pl.read_parquet(run / "judgments.parquet").join(pairs.select("pair_id", "question_id"), on="pair_id")
    shown = judgments.group_by("turn", "has_reference").agg(pl.col("question_id").unique().sort()).sort(
        "turn", "has_reference")
    math = sorted(q for q in gpt4 if q in questions["records"])
    assert shown.rows() == [(1, False, ["81", "82"]), (1, True, math), (2, False, ["81", "82"]), (2, True, math)]


def test_per_turn_and_per_category_tables_in_summary_and_report(mt_run):
    from statsmodels.stats.proportion import proportion_confint

    out, summary = mt_run["out"], json.loads((mt_run["out"] / "summary.json").read_text())
    assert set(summary["turns"]) == {"1", "2"} and summary["turns"]["2"]["valid"]["n"] == 8
    turns = pl.read_parquet(out / "stats_turns.parquet")
    assert set(turns["turn"]) == {1, 2} and set(turns["comparison"]) == {"tuned_vs_base"}
    features2 = pl.read_parquet(out / "features_turn2.parquet")
    assert features2.height == 16 and set(features2["role"]) == {"base", "tuned"}
    assert pl.read_parquet(out / "features.parquet").height == 16  # turn 1 only, the file's contract
    cats = summary["feature_categories"]
    assert cats["1"]["valid"]["math"]["tested"] and not cats["1"]["valid"]["writing"]["tested"]  # 6 prompts vs 2
    table = pl.read_parquet(out / "stats_categories.parquet")
    math_rows = table.filter((pl.col("turn") == 2) & (pl.col("category") == "math") & pl.col("p_value").is_not_nan())
    assert math_rows.height > 0
    judge = summary["judge"]
    for turn in ("1", "2"):
        block = judge["turns"][turn]["splits"]["valid"]["tuned_vs_base"]
        assert set(block["categories"]) == {"math", "writing"}
        for c in block["categories"].values():
            assert c["n"] == c["wins"] + c["losses"] + c["ties"]
            if c["ties"] == 0 and c["n"]:
                low, high = proportion_confint(c["wins"], c["n"], alpha=0.05, method="wilson")
                assert (c["ci_low"], c["ci_high"]) == pytest.approx((low, high), abs=1e-12)
        assert sum(c["n"] for c in block["categories"].values()) == block["n"]
    assert judge["splits"]["valid"]["tuned_vs_base"]["categories"] == json.loads(json.dumps(
        judge["turns"]["1"]["splits"]["valid"]["tuned_vs_base"]["categories"]))
    report = (out / "report.html").read_text()
    assert 'id="feature_groups"' in report and 'id="judge_categories"' in report
    assert "data:image/svg+xml;base64," in report and (out / "plots" / "judge_categories.svg").is_file()
    assert "holds questions without chosen or rejected answers" in report  # no labels: said, not a traceback
    assert "chosen_vs_rejected" not in judge["splits"]["valid"]


# -- fast: category statistics on verdicts known in advance (no generation) ----------------------------------------

def _judgments(verdicts: dict[str, tuple[str, str]]) -> pl.DataFrame:
    """judgments.parquet rows of tuned vs base from {pair_id: (winner shown tuned-first, winner shown base-first)}."""
    rows = []
    for pid, winners in verdicts.items():
        for order, first, winner in (("ab", "tuned", winners[0]), ("ba", "base", winners[1])):
            verdict = "tie" if winner == "tie" else "first" if winner == first else "second"
            rows.append({"pair_id": pid, "split": "valid", "comparison": "tuned_vs_base", "judge": "j", "order": order,
                         "shown_first": first, "verdict": verdict, "winner": winner})
    return pl.DataFrame(rows)


def test_category_win_rates_match_statsmodels_and_scipy():
    """Verdicts known in advance: per category wins, losses and ties (two orders that disagree make a tie), the
    Wilson CI against statsmodels, the binomial p against scipy, BH across categories against statsmodels."""
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.proportion import proportion_confint

    from dpo_eval.judges.categories import category_rates

    plan = {"alpha": (9, 1, 0), "beta": (3, 4, 0), "gamma": (2, 2, 2), "delta": (12, 0, 1)}  # wins, losses, ties
    verdicts, names = {}, {}
    for name, (wins, losses, ties) in plan.items():
        outcomes = [("tuned", "tuned")] * wins + [("base", "base")] * losses + [("tuned", "base")] * ties
        for i, outcome in enumerate(outcomes):
            verdicts[f"{name}{i}"], names[f"{name}{i}"] = outcome, name
    verdicts["stray"] = ("tie", "tie")  # a pair without a category: the (none) category
    categories = pl.DataFrame({"pair_id": list(names), "category": list(names.values())})
    got = category_rates(_judgments(verdicts), categories, alpha=0.1)
    assert set(got) == set(plan) | {"(none)"} and got["(none)"]["ties"] == 1
    assert np.isnan(got["(none)"]["p_value"]) and np.isnan(got["(none)"]["p_adjusted"])  # no decided pair
    for name, (wins, losses, ties) in plan.items():
        n = wins + losses + ties
        assert (got[name]["wins"], got[name]["losses"], got[name]["ties"], got[name]["n"]) == (wins, losses, ties, n)
        assert got[name]["win_rate"] == pytest.approx((wins + ties / 2) / n, abs=1e-12)
        low, high = proportion_confint(wins + ties / 2, n, alpha=0.1, method="wilson")
        assert (got[name]["ci_low"], got[name]["ci_high"]) == pytest.approx((low, high), abs=1e-12)
        assert got[name]["p_value"] == pytest.approx(sps.binomtest(wins, wins + losses, 0.5).pvalue, abs=1e-12)
    order = list(plan)
    adjusted = multipletests([got[n]["p_value"] for n in order], method="fdr_bh")[1]
    assert [got[n]["p_adjusted"] for n in order] == pytest.approx(list(adjusted), abs=1e-12)
    assert got["delta"]["p_adjusted"] < 0.05 < got["beta"]["p_adjusted"]  # the planted effect stands out


def test_bh_leaves_a_category_without_decided_pairs_outside_the_family():
    from statsmodels.stats.multitest import multipletests

    from dpo_eval.judges.categories import bh

    p = [0.01, float("nan"), 0.04, 0.03]
    got = bh(p)
    assert np.isnan(got[1])
    assert [got[0], got[2], got[3]] == pytest.approx(list(multipletests([0.01, 0.04, 0.03], method="fdr_bh")[1]))


def test_feature_tests_per_category_match_scipy_and_statsmodels():
    from statsmodels.stats.multitest import multipletests

    from dpo_eval.stats.groups import category_tests

    rng = np.random.default_rng(1)
    n = {"a": 12, "b": 9, "c": 3}
    ids = [f"{c}{i}" for c, k in n.items() for i in range(k)]
    base = rng.normal(size=len(ids))
    shift = np.array([0.9 if i.startswith("a") else -0.2 for i in ids])
    tuned = base + shift + rng.normal(scale=0.3, size=len(ids))
    features = pl.DataFrame({"pair_id": ids * 2, "split": ["valid"] * 2 * len(ids), "role": ["base"] * len(ids)
                             + ["tuned"] * len(ids), "f0": np.concatenate([base, tuned])})
    categories = pl.DataFrame({"pair_id": ids, "category": [i[0] for i in ids]})
    table = category_tests(features, categories, turn=1)
    rows = {r["category"]: r for r in table.iter_rows(named=True)}
    d = tuned - base
    p = {c: sps.wilcoxon(d[[i.startswith(c) for i in ids]]).pvalue for c in ("a", "b")}
    assert rows["a"]["p_value"] == pytest.approx(p["a"]) and rows["b"]["p_value"] == pytest.approx(p["b"])
    assert np.isnan(rows["c"]["p_value"]) and "fewer than" in rows["c"]["reason"]  # 3 prompts: untested
    adjusted = multipletests([p["a"], p["b"]], method="fdr_bh")[1]
    assert [rows["a"]["p_adjusted"], rows["b"]["p_adjusted"]] == pytest.approx(list(adjusted))


def test_feature_tests_per_category_keep_splits_apart_and_count_the_values_tested():
    """Train and valid are tested apart (scipy on each split's deltas); a category whose prompts lack the feature's
    value below MIN_PROMPTS is untested even with enough prompts."""
    from dpo_eval.stats.groups import MIN_PROMPTS, category_tests

    rng = np.random.default_rng(2)
    ids = [f"{s}{i}" for s in ("t", "v") for i in range(10)]
    base = rng.normal(size=20)
    tuned = base + np.where(np.arange(20) < 10, 1.0, -0.1) + rng.normal(scale=0.3, size=20)
    sparse = np.where(np.arange(20) % 10 < 10 - MIN_PROMPTS + 1, np.nan, 1.0)  # valid and train: MIN_PROMPTS - 1 values
    features = pl.DataFrame({"pair_id": ids * 2, "split": ["train" if i[0] == "t" else "valid" for i in ids] * 2,
                             "role": ["base"] * 20 + ["tuned"] * 20, "f0": np.concatenate([base, tuned]),
                             "f1": np.concatenate([sparse * 0, sparse * rng.normal(size=20)])})
    table = category_tests(features, pl.DataFrame({"pair_id": ids, "category": ["a"] * 20}), turn=1)
    rows = {(r["split"], r["feature"]): r for r in table.iter_rows(named=True)}
    d = tuned - base
    for split, part in (("train", slice(0, 10)), ("valid", slice(10, 20))):
        assert rows[(split, "f0")]["p_value"] == pytest.approx(sps.wilcoxon(d[part]).pvalue)
        assert rows[(split, "f0")]["n"] == 10
        assert rows[(split, "f1")]["n"] == MIN_PROMPTS - 1 and np.isnan(rows[(split, "f1")]["p_value"])


def test_category_field_and_single_turn_sets_keep_their_columns(tmp_path, orca_jsonl):
    records = [json.loads(line) for line in orca_jsonl.read_text().splitlines()[:4]]
    plain, _ = read_pairs(DatasetSpec(source=str(orca_jsonl), limit=4))
    assert plain.columns == PAIR_COLUMNS  # a single-turn set without categories: the table it always had
    path = tmp_path / "topics.jsonl"
    path.write_text("".join(json.dumps(r | {"topic": f"t{i % 2}"}) + "\n" for i, r in enumerate(records)))
    tagged, _ = read_pairs(DatasetSpec(source=str(path), category_field="topic"))
    assert tagged.columns == PAIR_COLUMNS + ["category"] and tagged["category"].to_list() == ["t0", "t1", "t0", "t1"]
    assert tagged.drop("category").equals(read_pairs(DatasetSpec(source=str(path)))[0])
    with pytest.raises(DpoEvalError, match=r"record 1: --category-field 'kind' is not among its fields"):
        read_pairs(DatasetSpec(source=str(path), category_field="kind"))
    bad = tmp_path / "three.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "turns": ["a", "b", "c"]}) + "\n")
    with pytest.raises(DpoEvalError, match=r"three.jsonl, record 1: 'turns' must hold one or two"):
        read_pairs(DatasetSpec(source=str(bad)))


def test_generate_command_answers_both_turns_of_the_mt_bench_file(tmp_path, questions, stories260k):
    """`dpo-eval generate --dataset question.jsonl` (base only, 3 questions): turns 1 and 2, turn 2's prompt the
    model's own dialogue; --category-field is accepted by generate and evaluate."""
    from transformers import AutoTokenizer

    from dpo_eval.cli.main import main

    out = tmp_path / "answers.parquet"
    try:
        main(["generate", "--base", str(stories260k), "--dataset", str(questions["path"]), "--limit", "3",
              "--quantization", "none", "--compute-dtype", "float32", "--max-new-tokens", "4",
              "--category-field", "category", "--out", str(out)])
    except SystemExit as exc:
        assert exc.code in (0, None)
    answers = pl.read_parquet(out)
    assert answers.group_by("turn", "model").len().sort("turn").rows() == [(1, "base", 3), (2, "base", 3)]
    pairs, _ = read_pairs(DatasetSpec(source=str(questions["path"]), limit=3))
    tok = AutoTokenizer.from_pretrained(stories260k)
    first = dict(answers.filter(pl.col("turn") == 1).select("pair_id", "answer").iter_rows())
    second = dict(answers.filter(pl.col("turn") == 2).select("pair_id", "n_prompt_tokens").iter_rows())
    for pair in pairs.iter_rows(named=True):
        expected = tok(_plain([pair["prompt"], first[pair["pair_id"]], pair["turn2"]]))["input_ids"]
        assert second[pair["pair_id"]] == len(expected)
    from tests.test_cli import _params

    assert "category_field" in _params("evaluate") and "category_field" in _params("generate")


def test_generate_engine_openai_refuses_a_two_turn_set_before_any_request(tmp_path, questions, stories260k, capsys):
    """The server path answers turn 1 only: on MT-Bench it is refused (no server runs: nothing is asked)."""
    from dpo_eval.cli.main import main

    out = tmp_path / "answers.parquet"
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--base", str(stories260k), "--dataset", str(questions["path"]), "--limit", "2",
              "--engine", "openai", "--base-url", "http://127.0.0.1:9/v1", "--served-base", "b", "--served-tuned", "t",
              "--out", str(out)])
    assert exc.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "--engine openai answers one turn only" in err and str(questions["path"]) in err and "two-turn" in err

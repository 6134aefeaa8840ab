"""The local HF judge (issue 12, judge kind 3: dpo_eval.judges.local through dpo_eval.judges.pairwise.judge_run and the CLI).

stories260k judges a tiny run directory (the API judge's test run, tests.test_judge_api.make_run) in this
process, in float32 and in 4-bit: every verdict comes from the next-token log-probabilities of the labels
(never invalid), p_first equals a direct single-sequence computation with the model's own logits, both
orders are judged, prompts are cut in tokens and flagged, a second run reads every judgment from the shared
judgment cache without loading the weights, and labels that share a first token are refused. stories260k
has no chat template: the plain format is used; a copy with the API test's chat template checks that
rendering. Its verdicts are meaningless; the mechanics are real.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jinja2
import polars as pl
import pytest
from pydantic import ValidationError

from dpo_eval.config import JudgeSpec, ModelSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.generation.prompts import PLAIN_TEMPLATE
from dpo_eval.judges.local import verdict_of
from dpo_eval.judges.pairwise import SCHEMA, judge_run
from dpo_eval.judges.prompt import load_template, parse_verdict, render
from tests.builders import copy_model
from tests.test_judge_api import CHAT_TEMPLATE, PAIRS, make_run, run_cli
from tests.scripted_judge import judge_output

CONTEXT = 384  # tokens: the default template takes about 225 of them on stories260k, the long texts get cut
N_JUDGMENTS = 2 * 2 * len(PAIRS)
N_COMPUTED = N_JUDGMENTS - 2  # p3's answers equal its labels: both comparisons share the same messages
BLOCK_KEYS = {"id", "kind", "model", "template_sha", "calls", "cached", "invalid", "tokens", "splits"}
TUNED_KEYS = {"n", "wins", "losses", "ties", "win_rate", "ci_low", "ci_high", "p_value", "lc_win_rate",
              "position_consistency", "first_position_rate"}
LABEL_KEYS = {"n", "agreement", "ci_low", "ci_high", "position_consistency"}



def spec_for(model: Path, cache: Path, **changes) -> JudgeSpec:
    values = {"kind": "hf", "model": str(model), "compute_dtype": "float32", "context_tokens": CONTEXT,
              "cache_dir": cache, **changes}
    return JudgeSpec(**values)


def plain_text(messages: list[dict]) -> str:
    """The judge input in the plain format (stories260k has no chat template) with the reply prefix "[["."""
    system = next(m["content"] for m in messages if m["role"] == "system")
    user = next(m["content"] for m in messages if m["role"] == "user")
    return jinja2.Template(PLAIN_TEMPLATE).render(system=system, prompt=user) + "[["


def direct_p_first(model, tokenizer, text: str) -> tuple[float, int]:
    """P(A) / (P(A) + P(B)) for one judge input `text`, computed here from one unpadded sequence with one
    BOS: softmax over the two label tokens of the model's logits at the last position."""
    import torch

    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    label_a, label_b = (tokenizer(text + label)["input_ids"][len(ids)] for label in ("A", "B"))
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    pair = torch.softmax(logits[[label_a, label_b]], dim=-1)
    return float(pair[0]), len(ids)


def check_table(run: Path, block: dict) -> pl.DataFrame:
    table = pl.read_parquet(run / "judgments.parquet")
    assert dict(table.schema) == SCHEMA and table.height == N_JUDGMENTS
    # Every verdict from the log-probs: never invalid; the more probable label wins (no ties at margin 0).
    assert set(table["verdict"]) <= {"first", "second"} and block["invalid"] == 0
    assert table["p_first"].is_not_null().all() and table["p_first"].is_between(0, 1).all()
    expected = pl.when(pl.col("p_first") > 0.5).then(pl.lit("first")).otherwise(pl.lit("second"))
    assert table.select((pl.col("verdict") == expected).all()).item()
    # the stored raw text carries the verdict's mark, so a cached reply reads back the same verdict
    marks = {"first": "[[A]]", "second": "[[B]]"}
    assert all(raw.startswith(marks[v]) for v, raw in zip(table["verdict"], table["raw"]))
    # Both orders of every pair and comparison, the roles swapped between them.
    for (_, comparison), part in table.group_by("pair_id", "comparison"):
        assert sorted(part["order"]) == ["ab", "ba"]
        assert set(part["shown_first"]) == ({"tuned", "base"} if comparison == "tuned_vs_base"
                                            else {"chosen", "rejected"})
    # Cut in tokens to the budget, both orders alike, every cut flagged.
    assert table["prompt_tokens"].max() <= CONTEXT and (table["completion_tokens"] == 0).all()
    cut = {(p, c): sorted(set(v)) for p, c, v in table.group_by("pair_id", "comparison").agg("truncated").iter_rows()}
    assert cut == {("p0", "tuned_vs_base"): [False], ("p0", "chosen_vs_rejected"): [False],
                   ("p1", "tuned_vs_base"): [True], ("p1", "chosen_vs_rejected"): [False],  # the long answer
                   ("p2", "tuned_vs_base"): [True], ("p2", "chosen_vs_rejected"): [True],  # the long prompt
                   ("p3", "tuned_vs_base"): [False], ("p3", "chosen_vs_rejected"): [False]}
    assert (table["latency_s"] >= 0).all()
    # The summary block: the contract keys and the hf details.
    assert set(block) >= BLOCK_KEYS and block["kind"] == "hf" and block["tokens"]["completion"] == 0
    for split in ("train", "valid"):
        assert set(block["splits"][split]["tuned_vs_base"]) >= TUNED_KEYS
        assert set(block["splits"][split]["chosen_vs_rejected"]) >= LABEL_KEYS
    assert block["hf"]["labels"] == ["A", "B"] and block["hf"]["reply_prefix"] == "[["
    assert block["hf"]["rendering"].startswith("plain format")
    return table


def messages_for(pair_id: str, first: str, second: str) -> list[dict]:
    """The judge messages of one uncut judgment of a PAIRS pair, `first` shown as A."""
    row = next(dict(zip(["pair_id", "split", "system", "prompt", "chosen", "rejected", "tuned", "base"], r))
               for r in PAIRS if r[0] == pair_id)
    return render(load_template(), row["system"], row["prompt"], row[first], row[second], context_chars=10**6,
                  answer_share=0.35).messages


def test_cli_hf_judge_float32_matches_direct_logits_and_a_rerun_is_all_cache(stories260k, tmp_path, monkeypatch,
                                                                             capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dpo_eval.judges.local as judge_hf

    monkeypatch.setenv("DPO_EVAL_CACHE", str(tmp_path / "cache"))
    run = make_run(tmp_path / "run")
    argv = ["judge", str(run), "--judge", "hf", "--judge-model", str(stories260k), "--compute-dtype", "float32",
            "--context-tokens", str(CONTEXT), "--batch-size", "4"]
    run_cli(argv)
    first = judge_output(capsys.readouterr().out)
    table = check_table(run, first)
    assert (first["calls"], first["cached"]) == (N_COMPUTED, N_JUDGMENTS - N_COMPUTED)
    assert first["hf"]["forward_passes"] == math.ceil(N_COMPUTED / 4) and first["hf"]["weights_loaded"]
    assert any("pad" in note for note in first["hf"]["repairs"])  # the loader's repairs are recorded
    assert first["tokens"]["prompt"] == table.filter(~pl.col("cached"))["prompt_tokens"].sum()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_pairs"] == {"train": 2, "valid": 2} and summary["judge"]["id"] == first["id"]

    # p_first of one judgment equals softmax over the two label tokens of the model's own logits, computed on
    # the unpadded sequence (the judge ran it left-padded in a batch of 4 with longer ones).
    model = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    row = table.filter((pl.col("pair_id") == "p0") & (pl.col("comparison") == "chosen_vs_rejected")
                       & (pl.col("order") == "ba")).row(0, named=True)
    expected, n_tokens = direct_p_first(model, tokenizer, plain_text(messages_for("p0", "rejected", "chosen")))
    assert row["prompt_tokens"] == n_tokens
    assert row["p_first"] == pytest.approx(expected, abs=1e-5)
    assert row["verdict"] == ("first" if expected > 0.5 else "second")

    # A rerun makes no forward pass and loads no weights: every judgment from the cache, unchanged.
    def no_load(*args, **kwargs):
        raise AssertionError("a fully cached run loaded the judge's weights")

    monkeypatch.setattr(judge_hf, "load_model", no_load)
    run_cli(argv)
    second = judge_output(capsys.readouterr().out)
    assert (second["calls"], second["cached"]) == (0, N_JUDGMENTS)
    assert second["hf"]["forward_passes"] == 0 and not second["hf"]["weights_loaded"]
    again = pl.read_parquet(run / "judgments.parquet")
    assert again["cached"].all()
    assert again.drop("cached", "latency_s").equals(table.drop("cached", "latency_s"))


def test_hf_judge_4bit_is_another_judge_and_matches_its_own_logits(stories260k, tmp_path):
    from dpo_eval.generation.models import load_model

    run = make_run(tmp_path / "run")
    full = judge_run(run, spec_for(stories260k, tmp_path / "cache"))
    block = judge_run(run, spec_for(stories260k, tmp_path / "cache", quantization="4bit"))
    table = check_table(run, block)
    assert block["id"] != full["id"] and block["calls"] == N_COMPUTED  # quantization is part of the identity
    assert block["hf"]["quantization"] == "4bit"
    assert any("4-bit" in note for note in block["hf"]["repairs"])  # the loader's CPU 4-bit repair, recorded
    loaded = load_model(ModelSpec(base=str(stories260k), quantization="4bit", compute_dtype="float32"))
    row = table.filter((pl.col("pair_id") == "p0") & (pl.col("comparison") == "tuned_vs_base")
                       & (pl.col("order") == "ab")).row(0, named=True)
    expected, _ = direct_p_first(loaded.model, loaded.tokenizer, plain_text(messages_for("p0", "tuned", "base")))
    assert row["p_first"] == pytest.approx(expected, abs=1e-4)


def test_a_chat_template_renders_the_judge_input_and_is_part_of_the_identity(stories260k, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = copy_model(stories260k, tmp_path / "stories260k-chat")
    (chat / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    run = make_run(tmp_path / "run")
    spec = spec_for(chat, tmp_path / "cache", comparisons=("chosen_vs_rejected",), split="train")
    block = judge_run(run, spec)
    plain = judge_run(run, spec.model_copy(update={"model": str(stories260k)}))
    assert block["hf"]["rendering"] == "chat template" and plain["hf"]["rendering"].startswith("plain format")
    assert block["id"] != plain["id"] and plain["calls"] == 4  # the chat template is part of the judge identity
    table = pl.read_parquet(run / "judgments.parquet").filter(pl.col("judge") == plain["id"])  # beside the chat judge's
    judged = judge_run(run, spec)  # the chat judge again: all from the cache
    assert judged["calls"] == 0 and judged["id"] == block["id"]
    row = pl.read_parquet(run / "judgments.parquet").filter(pl.col("pair_id") == "p0", pl.col("order") == "ab",
                                                            pl.col("judge") == block["id"]).row(0, named=True)
    tokenizer = AutoTokenizer.from_pretrained(chat)
    text = tokenizer.apply_chat_template(messages_for("p0", "chosen", "rejected"), tokenize=False,
                                         add_generation_prompt=True) + "[["
    assert text.startswith("system: You are an impartial judge") and text.endswith("assistant:[[")
    model = AutoModelForCausalLM.from_pretrained(chat, dtype=torch.float32).eval()
    expected, n_tokens = direct_p_first(model, tokenizer, text)
    assert row["prompt_tokens"] == n_tokens and row["p_first"] == pytest.approx(expected, abs=1e-5)
    assert table.filter(pl.col("pair_id") == "p0", pl.col("order") == "ab")["p_first"].item() != row["p_first"]


def test_tie_rule_margin_and_exact_equality():
    assert verdict_of(-1.0, -1.0) == ("tie", 0.5)  # margin 0: a tie only when exactly equal
    assert verdict_of(-1.0, -1.0 - 1e-9)[0] == "first" and verdict_of(-1.0 - 1e-9, -1.0)[0] == "second"
    verdict, p = verdict_of(math.log(0.3), math.log(0.1))
    assert verdict == "first" and p == pytest.approx(0.75)
    assert verdict_of(math.log(0.3), math.log(0.1), tie_margin=0.25)[0] == "tie"  # |0.75 - 0.5| <= 0.25
    assert verdict_of(math.log(0.3), math.log(0.1), tie_margin=0.2)[0] == "first"


@pytest.mark.parametrize("lp_a, lp_b", [(math.nan, math.nan), (math.nan, -1.0), (-math.inf, -math.inf),
                                        (-1.0, -math.inf), (math.inf, -1.0)])
def test_non_finite_log_probs_are_invalid_not_a_verdict(lp_a, lp_b):
    from dpo_eval.judges.local import raw_text

    verdict, p = verdict_of(lp_a, lp_b)
    assert verdict == "invalid" and math.isnan(p)  # verdict_of(nan, nan) was "second", a confident verdict
    assert parse_verdict(raw_text(verdict, lp_a, lp_b, p, ("A", "B"), "Verdict:")) == "invalid"  # read back alike


def test_tie_margin_makes_ties_and_is_part_of_the_identity(stories260k, tmp_path):
    run = make_run(tmp_path / "run")
    block = judge_run(run, spec_for(stories260k, tmp_path / "cache", tie_margin=0.5, comparisons=("tuned_vs_base",)))
    table = pl.read_parquet(run / "judgments.parquet")
    assert (table["verdict"] == "tie").all() and (table["winner"] == "tie").all() and block["invalid"] == 0
    assert block["calls"] == table.height  # a new margin is a new judge: nothing from the margin-0 cache


def test_labels_sharing_a_first_token_are_refused(stories260k, tmp_path):
    mine = tmp_path / "numbered.j2"
    mine.write_text('{% set judge_labels = ["Answer 1", "Answer 2"] %}Q: {{ prompt }}\nAnswer 1: {{ answer_a }}\n'
                    "Answer 2: {{ answer_b }}\nWhich is better, Answer 1 or Answer 2?")
    run = make_run(tmp_path / "run")
    with pytest.raises(DpoEvalError, match=r"labels 'Answer 1' and 'Answer 2' share their first token 'A' \(id "
                                           r"\d+\).*\['A', 'n', .*'1'\] and \['A', 'n', .*'2'\]"):
        judge_run(run, spec_for(stories260k, tmp_path / "cache", template=mine))
    assert not (run / "judgments.parquet").exists()
    # Labels whose first tokens differ work with the same template shape; the prefix is "" (no [[A]] asked for).
    (tmp_path / "digits.j2").write_text('{% set judge_labels = ["1", "2"] %}' + mine.read_text().split("%}", 1)[1])
    block = judge_run(run, spec_for(stories260k, tmp_path / "cache", template=tmp_path / "digits.j2",
                                    comparisons=("chosen_vs_rejected",), split="valid"))
    assert block["hf"]["labels"] == ["1", "2"] and block["hf"]["reply_prefix"] == "" and block["invalid"] == 0


def test_spec_and_cli_keep_the_kinds_apart(stories260k, tmp_path):
    with pytest.raises(ValidationError, match="quantization applies to the hf judge"):
        JudgeSpec(model="m", quantization="4bit")
    with pytest.raises(ValidationError, match="base_url applies to the openai judge"):
        JudgeSpec(kind="hf", model="m", base_url="http://127.0.0.1:1/v1")
    run = make_run(tmp_path / "run")
    from dpo_eval.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["judge", str(run), "--judge", "openai", "--judge-model", "m", "--quantization", "4bit"])
    assert exit_.value.code not in (0, None)
    with pytest.raises(DpoEvalError, match="--judge-model .*/absent: no such model folder"):
        judge_run(run, spec_for(tmp_path / "absent", tmp_path / "cache"))

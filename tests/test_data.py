"""Preference data: every format on real records and on small files written here, and bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import polars as pl
import pytest

from dpo_eval.config import DatasetSpec
from dpo_eval.data.pairs import PAIR_COLUMNS, hash_split, load_pairs, pair_id, read_pairs
from dpo_eval.errors import DpoEvalError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


TRL_STANDARD = [
    {"prompt": f"Question {i}?", "chosen": f"A careful answer {i}.", "rejected": f"no {i}"} for i in range(20)
]


def test_orca_real_records(orca_jsonl):
    table, report = read_pairs(str(orca_jsonl))
    assert table.columns == PAIR_COLUMNS
    assert report.format == "orca" and report.records == 284 and table.height == 284
    first = json.loads(orca_jsonl.read_text().splitlines()[0])
    row = table.row(0, named=True)
    assert (row["system"], row["prompt"], row["chosen"], row["rejected"]) == (
        first["system"], first["question"], first["chosen"], first["rejected"])
    assert row["pair_id"] == pair_id(first["system"], first["question"], first["chosen"], first["rejected"])


def test_two_orca_files_load_to_identical_tables(orca_jsonl, orca_openai_jsonl):
    orca, r1 = read_pairs(str(orca_jsonl))
    openai, r2 = read_pairs(str(orca_openai_jsonl))
    assert (r1.format, r2.format) == ("orca", "openai")
    assert orca.equals(openai)


def test_hh_rlhf_real_records(hh_rlhf_gz):
    table, report = read_pairs(str(hh_rlhf_gz))
    assert report.format == "hh-rlhf" and report.records == 2312
    raw = [json.loads(line) for line in gzip.open(hh_rlhf_gz, "rt")]
    # every kept pair: the prompt is the shared dialogue, the answers the final assistant turns
    row = table.row(0, named=True)
    assert raw[0]["chosen"].endswith(row["chosen"]) and raw[0]["rejected"].endswith(row["rejected"])
    assert row["prompt"].startswith("Human: what are some pranks with a pen i can do?")
    assert row["prompt"].endswith("Human: okay some of these do not have anything to do with pens")
    assert "Assistant:" not in row["chosen"]
    turns = json.loads(row["messages"])
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert table.height + sum(report.left_out.values()) == 2312
    assert report.left_out == {"empty or missing chosen": 4}


def test_hh_rlhf_answer_containing_human_text(tmp_path):
    # a final answer that itself contains "Human:" (5 such records are in the real test file)
    shared = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: rob a house?"
    rec = {"chosen": shared + "\n\nAssistant: Human: no, do not.", "rejected": shared + "\n\nAssistant: ok"}
    table = load_pairs(str(write_jsonl(tmp_path / "hh.jsonl", [rec])))
    assert table["chosen"][0] == "Human: no, do not." and table["rejected"][0] == "ok"
    assert table["prompt"][0] == "Human: hi\n\nAssistant: hello\n\nHuman: rob a house?"


def test_trl_standard_and_conversational(tmp_path):
    standard = load_pairs(str(write_jsonl(tmp_path / "std.jsonl", TRL_STANDARD)))
    conversational = [
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in TRL_STANDARD
    ]
    conv = load_pairs(str(write_jsonl(tmp_path / "conv.jsonl", conversational)))
    assert standard.equals(conv)
    implicit = [
        {"chosen": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hello there."}],
         "rejected": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
                      {"role": "assistant", "content": "Go away."}]}
    ]
    row = load_pairs(str(write_jsonl(tmp_path / "implicit.jsonl", implicit))).row(0, named=True)
    assert (row["system"], row["prompt"], row["chosen"], row["rejected"]) == ("Be kind.", "Hi?", "Hello there.", "Go away.")


def test_column_mapping(tmp_path):
    records = [{"instruction": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "sys": "S"}
               for r in TRL_STANDARD]
    spec = DatasetSpec(source=str(write_jsonl(tmp_path / "m.jsonl", records)),
                       columns={"prompt": "instruction", "chosen": "good", "rejected": "bad", "system": "sys"})
    table = load_pairs(spec)
    assert table["prompt"].to_list() == [r["prompt"] for r in TRL_STANDARD]
    assert set(table["system"]) == {"S"}
    with pytest.raises(DpoEvalError, match="'nope'"):
        load_pairs(spec.model_copy(update={"columns": {"prompt": "nope", "chosen": "good", "rejected": "bad"}}))


@pytest.mark.parametrize("kind", ["parquet", "csv", "json", "jsonl.gz"])
def test_file_types_give_the_same_table(tmp_path, kind):
    reference = load_pairs(str(write_jsonl(tmp_path / "ref.jsonl", TRL_STANDARD)))
    frame = pl.DataFrame(TRL_STANDARD)
    path = tmp_path / f"data.{kind}"
    if kind == "parquet":
        frame.write_parquet(path)
    elif kind == "csv":
        frame.write_csv(path)
    elif kind == "json":
        path.write_text(json.dumps(TRL_STANDARD))
    else:
        with gzip.open(path, "wt") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in TRL_STANDARD)
    assert load_pairs(str(path)).equals(reference)


def test_save_to_disk_keeps_its_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(TRL_STANDARD[:15]),
                               "test": datasets.Dataset.from_list(TRL_STANDARD[15:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    table = load_pairs(str(tmp_path / "saved"))
    assert table.height == 20
    assert table.filter(pl.col("split") == "valid")["prompt"].to_list() == [r["prompt"] for r in TRL_STANDARD[15:]]


def test_split_column_is_kept(tmp_path):
    records = [dict(r, split="train" if i < 12 else "validation") for i, r in enumerate(TRL_STANDARD)]
    table = load_pairs(str(write_jsonl(tmp_path / "s.jsonl", records)))
    assert table["split"].to_list() == ["train"] * 12 + ["valid"] * 8
    records[0]["split"] = "holdout"
    with pytest.raises(DpoEvalError, match="record 1.*holdout"):
        load_pairs(str(write_jsonl(tmp_path / "bad.jsonl", records)))


def test_split_stable_under_reordering_and_growth(orca_jsonl, tmp_path):
    lines = orca_jsonl.read_text().splitlines()
    table = load_pairs(str(orca_jsonl))
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines[::-1][:200]) + "\n")
    other = load_pairs(str(shuffled))
    merged = other.join(table.select("pair_id", "split"), on="pair_id", suffix="_orig")
    assert merged.height == 200 and (merged["split"] == merged["split_orig"]).all()
    valid_share = (table["split"] == "valid").mean()
    assert 0.05 < valid_share < 0.16
    # seed and fraction are parameters
    changed = load_pairs(DatasetSpec(source=str(orca_jsonl), seed=7, valid_fraction=0.5))
    assert 0.4 < (changed["split"] == "valid").mean() < 0.6


def test_hash_split_is_seeded():
    ids = [pair_id("", str(i), "a", "b") for i in range(2000)]
    a = [hash_split(i, 1, 0.1) for i in ids]
    assert a == [hash_split(i, 1, 0.1) for i in ids]
    assert a != [hash_split(i, 2, 0.1) for i in ids]
    assert abs(a.count("valid") / 2000 - 0.1) < 0.03


def test_duplicates_and_left_out_records_are_counted(tmp_path):
    records = TRL_STANDARD[:5] + [TRL_STANDARD[0], TRL_STANDARD[1]] + [
        {"prompt": "p", "chosen": "", "rejected": "r"},
        {"prompt": "p", "chosen": "c", "rejected": None},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
    ]
    table, report = read_pairs(str(write_jsonl(tmp_path / "d.jsonl", records)))
    assert table.height == 5 and report.duplicates == 2
    assert report.left_out == {"empty or missing chosen": 1, "empty or missing rejected": 1,
                               "chosen identical to rejected": 1}
    assert report.to_dict()["left_out_total"] == 3


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(TRL_STANDARD[0]) + "\n" + json.dumps(TRL_STANDARD[1]) + "\n{oops\n")
    with pytest.raises(DpoEvalError, match=r"broken\.jsonl, line 3: malformed JSON"):
        load_pairs(str(path))


def test_unknown_fields_list_the_formats(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(DpoEvalError) as info:
        load_pairs(str(path))
    message = str(info.value)
    assert "['instruction', 'output']" in message
    for name in ("orca", "openai", "hh-rlhf", "trl", "--columns"):
        assert name in message


def test_non_string_text_names_the_record(tmp_path):
    records = TRL_STANDARD[:3] + [{"prompt": "p", "chosen": 42, "rejected": "r"}]
    with pytest.raises(DpoEvalError, match=r"record 4: 'chosen' must be text, got int"):
        load_pairs(str(write_jsonl(tmp_path / "n.jsonl", records)))


def test_missing_path_and_unreachable_hub(tmp_path):
    with pytest.raises(DpoEvalError, match="no such file"):
        load_pairs(str(tmp_path / "absent.jsonl"))
    with pytest.raises(DpoEvalError, match="hub may be unreachable"):
        load_pairs("someone/not-here-offline")


def test_limit_keeps_the_first_pairs(orca_jsonl):
    full = load_pairs(str(orca_jsonl))
    assert load_pairs(DatasetSpec(source=str(orca_jsonl), limit=10)).equals(full.head(10))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dpo_eval", *args], capture_output=True, text=True)


def test_cli_pairs_prints_counts(orca_jsonl, tmp_path):
    out = tmp_path / "pairs.parquet"
    result = run_cli("pairs", "--dataset", str(orca_jsonl), "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["total"] == 284 and summary["pairs"]["train"] + summary["pairs"]["valid"] == 284
    assert pl.read_parquet(out).height == 284


def test_cli_error_is_one_line_without_traceback(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text("{oops\n")
    result = run_cli("pairs", "--dataset", str(path), "--out", str(tmp_path / "o.parquet"))
    assert result.returncode == 2
    assert "line 1: malformed JSON" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.parquet").exists()
    debug = run_cli("pairs", "--dataset", str(path), "--out", str(tmp_path / "o.parquet"), "--debug")
    assert "Traceback" in debug.stderr
    bad = run_cli("pairs", "--dataset", str(path), "--valid-fraction", "2", "--out", str(tmp_path / "o.parquet"))
    assert bad.returncode == 2 and "--valid-fraction" in bad.stderr


def test_a_utf8_byte_order_mark_is_read_in_jsonl_and_csv(tmp_path):
    record = {"prompt": "Why?", "chosen": "Because.", "rejected": "No."}
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + (json.dumps(record) + "\n").encode())
    csv = tmp_path / "bom.csv"
    csv.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\nWhy?,Because.,No.\n")
    for path in (jsonl, csv):
        table, report = read_pairs(str(path))
        assert table.height == 1 and table["prompt"][0] == "Why?" and report.left_out == {}, path


def test_every_record_left_out_is_an_error_naming_the_file_and_the_reasons(tmp_path):
    from dpo_eval.errors import DpoEvalError

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "same", "rejected": "same"},
                                              {"prompt": "p", "chosen": "", "rejected": "r"}])
    with pytest.raises(DpoEvalError, match=r"d.jsonl: no usable pair: 2 records read.*1 chosen identical to "
                                           r"rejected.*1 empty or missing chosen"):
        read_pairs(str(path))


def test_the_pairs_of_one_prompt_fall_in_one_split(tmp_path):
    # 40 prompts x 3 pairs each; with the split by pair about half of such prompts straddle train and valid
    records = [{"prompt": f"question {i}", "chosen": f"good answer {i}.{j}", "rejected": f"bad answer {i}.{j}"}
               for i in range(40) for j in range(3)]
    path = write_jsonl(tmp_path / "multi.jsonl", records)
    for seed in range(5):
        table, _ = read_pairs(DatasetSpec(source=str(path), seed=seed, valid_fraction=0.3))
        sides = table.group_by("prompt").agg(pl.col("split").n_unique().alias("n"))
        assert sides["n"].max() == 1, f"seed {seed}: a prompt on both sides"
        assert set(table["split"]) == {"train", "valid"}


@pytest.mark.parametrize("name, content", [("utf16.json", b"\xff\xfe[\x00]\x00"), ("fake.json.gz", b"not gzip")])
def test_an_unreadable_json_file_is_one_error_naming_it(tmp_path, name, content):
    from dpo_eval.errors import DpoEvalError

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DpoEvalError, match=f"{name}: cannot read"):
        read_pairs(str(path))


def test_labelled_records_keep_their_category_reference_and_question_id_fields_unread(tmp_path):
    """Only a prompt set (`turns`) reads category/reference/question_id; a labelled record's fields of those names
    (any type) change nothing, and --category-field still reads its category."""
    path = tmp_path / "labelled.jsonl"
    extra = [{"category": ["math"]}, {"reference": {"text": "4"}}, {"reference": "4", "question_id": 7},
             {"category": "math"}]
    path.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": "4", "rejected": "5"} | e) + "\n"
                            for i, e in enumerate(extra)))
    pairs, _ = read_pairs(DatasetSpec(source=str(path)))
    assert pairs.columns == PAIR_COLUMNS and pairs.height == 4
    tagged = path.with_name("tagged.jsonl")
    tagged.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": "4", "rejected": "5", "category": f"c{i}",
                                          "reference": "4"}) + "\n" for i in range(2)))
    pairs, _ = read_pairs(DatasetSpec(source=str(tagged), category_field="category"))
    assert pairs.columns == PAIR_COLUMNS + ["category"] and pairs["category"].to_list() == ["c0", "c1"]

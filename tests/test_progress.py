"""Progress bars on a terminal only, the same answers with or without them, and a quiet command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl

from dpo_eval.progress import StageProgress, terminal
from tests.builders import make_adapter

ROOT = Path(__file__).resolve().parents[1]


def test_stage_progress_counts_to_the_total_and_draws_only_when_asked(monkeypatch, capsys):
    seen = []
    with StageProgress("scoring", 10, "texts", listener=lambda done, total: seen.append((done, total)),
                       bar=False) as progress:
        for n in (4, 4, 4):  # the last step is clipped at the total
            progress.advance(n)
        assert not progress.has_bar
    assert seen == [(4, 10), (8, 10), (10, 10)]
    assert capsys.readouterr().err == ""
    with StageProgress("scoring", 3, "texts", bar=True) as progress:
        progress.advance(3)
    drawn = capsys.readouterr().err
    assert "scoring" in drawn and "3/3" in drawn
    monkeypatch.setenv("DPO_EVAL_PROGRESS", "0")
    assert not terminal()
    monkeypatch.setenv("DPO_EVAL_PROGRESS", "1")
    assert terminal()
    monkeypatch.delenv("DPO_EVAL_PROGRESS")
    assert terminal() == sys.stderr.isatty()


def run_generate(args: list, progress: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DPO_EVAL_PROGRESS=progress, PYTHONPATH=str(ROOT))
    for name in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "dpo_eval", *extra, "generate", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_generate_shows_a_bar_gives_the_same_answers_and_filters_notices(tmp_path, stories260k, orca_jsonl):
    adapter = make_adapter(stories260k, tmp_path / "adapter", zero=False, seed=4)
    args = ["--base", stories260k, "--adapter", adapter, "--dataset", orca_jsonl, "--limit", "6",
            "--max-new-tokens", "6", "--batch-size", "2", "--quantization", "4bit"]
    with_bar = run_generate(args + ["--out", tmp_path / "bar.parquet"], "1")
    assert with_bar.returncode == 0, with_bar.stderr[-2000:]
    assert "generation" in with_bar.stderr and "12/12" in with_bar.stderr
    for notice in ("FutureWarning", "Loading weights", "kernels-community"):
        assert notice not in with_bar.stderr, notice
    plain = run_generate(args + ["--out", tmp_path / "plain.parquet"], "0", "--verbose")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "12/12" not in plain.stderr and "Loading weights" in plain.stderr  # --verbose: as the libraries print
    columns = ["pair_id", "model", "answer"]
    assert pl.read_parquet(tmp_path / "bar.parquet").select(columns).equals(
        pl.read_parquet(tmp_path / "plain.parquet").select(columns))  # the bar changes no answer

"""Judgments per second of the pairwise LLM judge through a local `transformers serve`, concurrency 1 vs 4.

Starts `transformers serve` on 127.0.0.1 with a copy of stories260k (a chat template added), judges the
chosen vs rejected answers of the first N orca pairs in both orders with dpo_eval.judges.pairwise.judge_run, each
timed run on an empty cache, alternating concurrency 1 and 4 `--repeats` times; reports the median rate of
each and their ratio. Prints JSON.

The server runs generate() on one inference thread (without --continuous-batching), so concurrency only
overlaps HTTP, templating and tokenization with generation; `--continuous-batching` lets the server batch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from dpo_eval.config import JudgeSpec
from dpo_eval.judges.pairwise import judge_run

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@contextmanager
def local_server(model: Path, work: Path, continuous_batching: bool, threads: int):
    """`transformers serve` on a free port with a copy of `model` plus a chat template; yields (url, model id)."""
    folder = work / "judge-model"
    shutil.copytree(model, folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu"] + (["--continuous-batching"] if continuous_batching else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    with (work / "serve.log").open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"transformers serve did not start: {(work / 'serve.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1", str(folder)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def make_run(folder: Path, data: Path, n_pairs: int) -> Path:
    rows = [json.loads(line) for line in data.read_text().splitlines()[:n_pairs]]
    folder.mkdir(parents=True)
    pl.DataFrame({"pair_id": [f"p{i}" for i in range(len(rows))], "split": ["valid"] * len(rows),
                  "system": [r["system"] for r in rows], "prompt": [r["question"] for r in rows],
                  "chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows]}
                 ).write_parquet(folder / "pairs.parquet")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs=2, default=(1, 4))
    parser.add_argument("--continuous-batching", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server.")
    parser.add_argument("--model", type=Path, default=ROOT.parent / "shared/models/stories260k")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/orca_dpo_pairs/validation.jsonl")
    args = parser.parse_args()
    rates: dict[int, list[float]] = {k: [] for k in args.concurrency}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with local_server(args.model, work, args.continuous_batching, args.threads) as (url, model):
            spec = JudgeSpec(model=model, base_url=url, comparisons=("chosen_vs_rejected",), context_chars=700,
                             max_tokens=4)
            warm = make_run(work / "warm", args.data, 1)
            judge_run(warm, spec.model_copy(update={"cache_dir": work / "cache-warm"}))
            for repeat in range(args.repeats):
                for k in args.concurrency:
                    run = make_run(work / f"run-{repeat}-{k}", args.data, args.pairs)
                    start = time.perf_counter()
                    block = judge_run(run, spec.model_copy(update={"concurrency": k,
                                                                   "cache_dir": work / f"cache-{repeat}-{k}"}))
                    rates[k].append(block["calls"] / (time.perf_counter() - start))
    low, high = args.concurrency
    median = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({"server": "transformers serve" + (" --continuous-batching" if args.continuous_batching else ""),
                      "model": "stories260k", "server_threads": args.threads, "pairs": args.pairs,
                      "judgments_per_run": 2 * args.pairs, "max_tokens": 4, "context_chars": 700,
                      "judgments_per_s": {str(k): [round(r, 2) for r in v] for k, v in rates.items()},
                      "median_judgments_per_s": {str(k): round(v, 2) for k, v in median.items()},
                      f"ratio_{high}_vs_{low}": round(median[high] / median[low], 2),
                      "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}, indent=2))


if __name__ == "__main__":
    main()

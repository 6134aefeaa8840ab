"""Generation shards on 1 vs 2 `dpo-eval worker` processes (Prefect task workers) of a real `prefect server`:
wall time of the generation stage of the same evaluation (fresh result storage each time, so every shard is
generated; each worker gets cores / workers torch threads, as if on its own share of the machine). Prints JSON.

    .venv/bin/python benchmarks/bench_task_workers.py [--pairs 24] [--shard-size 4] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.prefect_server import prefect_server, stop, wait_for  # noqa: E402 - the tests' real-server helpers

SHARED = ROOT.parent / "shared"


def run(n_workers: int, api: str, env: dict, config: dict, root: Path) -> dict:
    results = root / f"results-{n_workers}"
    threads = str(max(1, (os.cpu_count() or 1) // n_workers))  # the machine's cores shared out, no oversubscription
    worker_env = dict(env, PREFECT_API_URL=api, PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(results), PYTHONPATH=str(ROOT),
                      OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    workers = [subprocess.Popen([sys.executable, "-m", "dpo_eval", "worker"], env=worker_env, cwd=ROOT,
                                stdout=open(root / f"worker-{n_workers}-{i}.log", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True) for i in range(n_workers)]
    try:
        wait_for(lambda: len(httpx.post(f"{api}/task_workers/filter", json={}, timeout=5).json()) >= n_workers, 180,
                 "the workers", interval=0.5)
        out = root / f"run-{n_workers}"
        (root / f"config-{n_workers}.yaml").write_text(json.dumps(config | {"out": str(out)}))  # JSON is YAML
        start = time.perf_counter()
        with open(root / f"evaluate-{n_workers}.log", "w") as log:
            subprocess.run([sys.executable, "-m", "dpo_eval", "evaluate", "--config", str(root / f"config-{n_workers}.yaml")],
                           env=worker_env, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())
        return {"workers": n_workers, "torch_threads_each": int(threads), "generate_s": summary["timings"]["generate"],
                "run_s": round(wall, 1), "shards": summary["cache"]["generate"]["misses"] // 2,
                "answers_per_worker": summary["workers"]["answers"], "cache": summary["cache"]["generate"]}
    finally:
        for proc in workers:
            stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(SHARED / "models" / "stories260k"))
    parser.add_argument("--data", default=str(SHARED / "data" / "orca_dpo_pairs" / "validation.jsonl"))
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    from tests.builders import make_adapter

    root = Path(tempfile.mkdtemp(prefix="bench-task-workers-"))
    adapter = make_adapter(Path(args.base), root / "adapter", zero=False, seed=5)
    config = {"dataset": {"source": args.data, "limit": args.pairs},
              "model": {"base": args.base, "adapter": str(adapter), "quantization": "4bit"},
              "generation": {"max_new_tokens": args.new_tokens, "batch_size": args.shard_size},
              "scoring": {"n_process": 1, "cache_dir": str(root / "scores")},
              "analysis": {"bootstrap": 0, "permutations": 0}, "rewards": False,
              "shard_size": args.shard_size, "generation_runner": "task-workers"}
    with prefect_server(root) as (api, env):  # the tests' own server helper: a real `prefect server start`
        env = dict(env, PREFECT_LOGGING_LEVEL="WARNING")
        one, two = run(1, api, env, config, root), run(2, api, env, config, root)
    print(json.dumps({"pairs": args.pairs, "shard_size": args.shard_size, "new_tokens": args.new_tokens,
                      "cores": os.cpu_count(),
                      "one_worker": one, "two_workers": two,
                      "generate_speedup": round(one["generate_s"] / two["generate_s"], 2)}, indent=1))


if __name__ == "__main__":
    main()

"""Resumption on another worker: persisted task results live in result storage that the workers share
(PREFECT_RESULTS_LOCAL_STORAGE_PATH on a shared volume here; a storage block works the same way)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from tests.builders import make_adapter

ROOT = Path(__file__).resolve().parents[1]

# a worker: one evaluation in its own process, its own PREFECT_HOME (own temporary API server and database)
WORKER = """
import json, sys
from dpo_eval.config import EvalConfig
from dpo_eval.flows.evaluate import evaluate_checkpoint

if __name__ == "__main__":
    summary = evaluate_checkpoint(EvalConfig.model_validate_json(open(sys.argv[1]).read()))
    print("CACHE " + json.dumps(summary["cache"]), flush=True)
"""


def worker_env(home: Path, results: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API_", "PREFECT_RESULTS_", "PREFECT_LOCAL_STORAGE", "PREFECT_DEFAULT_RESULT"))}
    return env | {"PREFECT_HOME": str(home), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(results),
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO",
                  "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
                  "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}  # a busy machine


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_another_worker_resumes_from_shared_result_storage(tmp_path, stories260k, orca_jsonl):
    shared = tmp_path / "shared-results"  # not the default ($PREFECT_HOME/storage)
    adapter = make_adapter(stories260k, tmp_path / "adapter", zero=False, seed=1)
    config = EvalConfig(dataset=DatasetSpec(source=str(orca_jsonl), limit=8),
                        model=ModelSpec(base=str(stories260k), adapter=str(adapter), quantization="4bit"),
                        generation=GenerationSpec(max_new_tokens=8, batch_size=8),
                        scoring=ScoringSpec(cache_dir=tmp_path / "scores", n_process=1),
                        analysis=AnalysisSpec(bootstrap=0, permutations=0), rewards=False,
                        out=tmp_path / "run", shard_size=2)
    (tmp_path / "config.json").write_text(config.model_dump_json())
    command = [sys.executable, "-c", WORKER, str(tmp_path / "config.json")]

    # worker A generates a few shards, then its machine vanishes (SIGKILL: process group, server and all)
    first = subprocess.Popen(command, env=worker_env(tmp_path / "worker-a", shared), cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    watchdog = threading.Timer(300, lambda: os.killpg(first.pid, signal.SIGKILL))
    watchdog.start()
    finished, seen = 0, []
    try:
        for line in first.stdout:
            seen.append(line)
            if "generate-answers" in line and "Completed" in line:
                finished += 1
                if finished == 3:
                    os.killpg(first.pid, signal.SIGKILL)
                    break
    finally:
        watchdog.cancel()
    first.wait(timeout=60)
    assert finished == 3, "worker A finished fewer than 3 shards in 300 s:\n" + "".join(seen[-40:])
    assert first.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "summary.json").exists()
    assert len(files_under(shared)) >= 3  # the finished shards' results, in the shared folder
    assert files_under(tmp_path / "worker-a" / "storage") == []  # nothing in worker A's default storage

    # worker B: another Prefect home and database, the same shared result storage: resumes from A's shards
    second = subprocess.run(command, env=worker_env(tmp_path / "worker-b", shared), cwd=ROOT, text=True,
                            capture_output=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    cache = json.loads(next(line for line in second.stdout.splitlines() if line.startswith("CACHE "))[6:])
    assert cache["generate"]["hits"] >= 3, cache
    assert (tmp_path / "run" / "summary.json").is_file()
    assert files_under(tmp_path / "worker-b" / "storage") == []

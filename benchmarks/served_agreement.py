"""Agreement of --engine openai (a server's greedy completions) with the in-process engine, both sides.

Starts `transformers serve` on 127.0.0.1 (not pinned: requests name their model by path) with two served folders:
a copy of stories260k with a chat template (the base), and stories260k + a real LoRA adapter (random non-zero B)
merged into a second folder (the tuned model, in --merge-dtype); generates through the server with
`generate_served`, then in-process (engine hf, the adapter unmerged, float32) on the same prompts, and prints JSON:
per side, answers identical k of n, the common-prefix share of the characters, and finish reasons / new-token
counts that agree. Kept out of the test suite for its cost (the server loads each served folder in a new process).
A real server (vLLM with --enable-lora) is not measured here.

    .venv/bin/python benchmarks/served_agreement.py [--prompts 5] [--tokens 16] [--merge-dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STORIES = Path(os.environ.get("DPO_EVAL_SHARED", "/work/shared")) / "models/stories260k"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["Tell a short story.", "What did Lily find?", "Why was Tom sad?", "Who helped Ben?",
           "Once upon a time, a little bird", "Where did the cat go?", "What is Max's favourite toy?",
           "Why did Sue laugh?"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def agreement(served: pl.DataFrame, local: pl.DataFrame) -> dict:
    served, local = served.sort("pair_id"), local.sort("pair_id")
    pairs = list(zip(served["answer"], local["answer"]))
    return {"n": len(pairs), "identical": sum(a == b for a, b in pairs),
            "common_prefix_share": round(sum(len(os.path.commonprefix([a, b])) for a, b in pairs)
                                         / max(1, sum(max(len(a), len(b)) for a, b in pairs)), 4),
            "finish_reason_agree": int((served["finish_reason"] == local["finish_reason"]).sum()),
            "n_new_tokens_agree": int((served["n_new_tokens"] == local["n_new_tokens"]).sum()),
            "n_prompt_tokens_agree": int((served["n_prompt_tokens"] == local["n_prompt_tokens"]).sum()),
            "served_finish_reasons": dict(sorted(served.group_by("finish_reason").len().iter_rows()))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--merge-dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_eval.config import DatasetSpec, GenerationSpec, ModelSpec, ServerSpec
    from dpo_eval.data.pairs import load_pairs
    from dpo_eval.generation.generate import generate_both
    from dpo_eval.generation.models import load_model
    from dpo_eval.generation.openai_engine import ServedCache, generate_served
    from tests.builders import make_adapter

    work = Path(tempfile.mkdtemp(prefix="served-agreement-"))
    base = work / "stories260k"
    shutil.copytree(STORIES, base)
    (base / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    adapter = make_adapter(base, work / "adapter", zero=False, b_std=0.05)
    tuned = work / "tuned-merged"
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    merged.to(getattr(torch, args.merge_dtype)).save_pretrained(tuned)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(base / name, tuned / name)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": "Yes.", "rejected": "No."}) + "\n"
                            for p in PROMPTS[:args.prompts]))

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = (work / "serve.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("transformers")), "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"transformers serve did not start: {(work / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.25)
        spec = ModelSpec(base=str(base), adapter=str(adapter), quantization="none", compute_dtype="float32")
        server = ServerSpec(base_url=f"http://127.0.0.1:{port}/v1", served_base=str(base), served_tuned=str(tuned),
                            concurrency=2)
        pairs = load_pairs(DatasetSpec(source=str(data)))
        start = time.perf_counter()
        served, account = generate_served(spec, GenerationSpec(max_new_tokens=args.tokens, engine="openai",
                                                               server=server), pairs, cache=ServedCache(work / "cache"))
        served_s = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    local = generate_both(load_model(spec), pairs, GenerationSpec(max_new_tokens=args.tokens))
    result = {"model": "stories260k + LoRA r=4 (q_proj, v_proj; B ~ N(0, 0.05))", "server": "transformers serve",
              "tuned_served_as": f"merged in {args.merge_dtype}", "in_process": "engine hf, float32, adapter unmerged",
              "prompts": args.prompts, "max_new_tokens": args.tokens, "served_seconds": round(served_s, 1),
              "account": account,
              **{side: agreement(served.filter(pl.col("model") == side), local.filter(pl.col("model") == side))
                 for side in ("base", "tuned")}}
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

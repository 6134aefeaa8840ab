"""The pairwise LLM judge over an OpenAI-compatible API (dpo_eval.judges.pairwise, judge_api, judge_prompt).

Offline parts on plain data (verdict parsing, p_first from logprobs, cutting, templates, the key), then the
real path: `transformers serve` on 127.0.0.1 serving a copy of stories260k with a chat template the test
adds (both orders, parsing with the raw text kept, the cache, the key never written). Its verdicts are
meaningless (it tells stories, so most are invalid), so the budget stop and resume, concurrency and retries
through a fault-injecting proxy run against the scripted judge (tests/scripted_judge.py), whose verdicts are all
valid; tests/test_judge_scripted.py asserts its statistics exactly.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from dpo_eval.config import JudgeSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.judges.api import LOCAL_PLACEHOLDER_KEY, api_key, judge_id, judge_identity
from dpo_eval.judges.pairwise import SCHEMA, judge_run
from dpo_eval.judges.prompt import CUT_MARK, load_template, p_first, parse_verdict, prompt_chars, render
from tests.conftest import shared_path
from tests.scripted_judge import judge_output

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
CONTEXT_CHARS = 700  # stories260k: 512 tokens of context, about 1.6 characters per token on this text
MAX_TOKENS = 4
LONG = "Once upon a time there was a little dog who liked to run in the big green park every day. " * 6
PAIRS = [  # pair_id, split, system, prompt, chosen, rejected, tuned, base
    ("p0", "train", "", "Tell a short story.", "A cat sat.", "No.", "The dog ran home.", "Dogs."),
    ("p1", "train", "", "What did Lily find?", "She found a ball.", "A rock.", LONG, "She found a toy."),
    ("p2", "valid", "You are a helpful story teller. " * 8, "Why was Tom sad? " + LONG, "He lost his hat.",
     "Tom.", "Tom was sad because his kite broke.", "Sad."),
    ("p3", "valid", "", "Who helped Ben?", "His mom helped him.", "Nobody.", "His mom helped him.", "Nobody."),
]
STABLE = ["pair_id", "split", "comparison", "judge", "order", "shown_first", "verdict", "winner", "p_first", "raw",
          "truncated", "prompt_tokens", "completion_tokens"]


# ---------------------------------------------------------------- offline: parsing, cutting, templates, key

@pytest.mark.parametrize("raw, verdict", [
    ("[[A]]", "first"), ("[[B]]", "second"), ("[[tie]]", "tie"), ("[[ Tie ]]", "tie"),
    ("Answer B is more precise. Verdict: [[B]]", "second"), ("A", "first"), ("b.", "second"), ("**Tie**", "tie"),
    ("[[A", "first"), ("A\nbecause it is longer", "first"),
    ("[[A]] or [[B]]", "invalid"), ("", "invalid"), (None, "invalid"), ("A little girl named Lily", "invalid"),
    ('" said the mom', "invalid"), ("Both are fine", "invalid"), ("C", "invalid"),
])
def test_parse_verdict(raw, verdict):
    assert parse_verdict(raw) == verdict



def _position(token, logprob, alternatives):
    return {"token": token, "logprob": logprob, "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alternatives]}


def test_p_first_reads_the_label_position_of_the_logprobs():
    import math

    content = [_position("[[", -0.01, [("[[", -0.01)]),
               _position("A", math.log(0.6), [("A", math.log(0.6)), ("B", math.log(0.2)), (" A", math.log(0.1))]),
               _position("]]", -0.01, [("]]", -0.01)])]
    assert p_first(content, "first") == pytest.approx(0.7 / 0.9)
    assert p_first(content, "invalid") is None
    assert p_first([], "first") is None  # the server ignored logprobs
    assert p_first([_position("tie", -0.1, [("tie", -0.1)])], "tie") is None  # neither A nor B offered


def test_render_cuts_to_the_budget_flags_the_cut_and_cuts_both_orders_alike():
    tpl = load_template()
    short = render(tpl, "", "Hi?", "Yes.", "No.", context_chars=CONTEXT_CHARS, answer_share=0.35)
    assert not short.truncated and "Yes." in short.messages[-1]["content"]
    assert short.messages[0]["role"] == "system"  # the default template sets judge_system
    ab = render(tpl, "sys " * 50, "Why? " + LONG, LONG, "Short.", context_chars=CONTEXT_CHARS, answer_share=0.35)
    ba = render(tpl, "sys " * 50, "Why? " + LONG, "Short.", LONG, context_chars=CONTEXT_CHARS, answer_share=0.35)
    assert ab.truncated and ba.truncated
    assert prompt_chars(ab.messages) <= CONTEXT_CHARS and prompt_chars(ba.messages) <= CONTEXT_CHARS
    assert CUT_MARK in ab.messages[-1]["content"]
    assert prompt_chars(ab.messages) == prompt_chars(ba.messages)
    with pytest.raises(DpoEvalError, match="context_chars 300"):
        render(tpl, "", "Hi?", "Yes.", "No.", context_chars=300, answer_share=0.35)


def test_user_template_sets_the_system_message_and_the_identity(tmp_path):
    mine = tmp_path / "judge.j2"
    mine.write_text('{% set judge_system = "Be fair." %}Q: {{ prompt }}\nA: {{ answer_a }}\nB: {{ answer_b }}\n'
                    "Say [[A]], [[B]] or [[tie]].")
    tpl = load_template(mine)
    messages = render(tpl, "", "Hi?", "Yes.", "No.", context_chars=CONTEXT_CHARS, answer_share=0.35).messages
    assert messages == [{"role": "system", "content": "Be fair."},
                        {"role": "user", "content": "Q: Hi?\nA: Yes.\nB: No.\nSay [[A]], [[B]] or [[tie]]."}]
    spec = JudgeSpec(model="m", template=mine)
    assert judge_id(judge_identity(spec, tpl)) != judge_id(judge_identity(spec, load_template()))
    (tmp_path / "broken.j2").write_text("{% if %}")
    with pytest.raises(DpoEvalError, match="broken.j2: Jinja syntax error"):
        load_template(tmp_path / "broken.j2")
    (tmp_path / "unknown.j2").write_text("{{ question }}")
    with pytest.raises(DpoEvalError, match="unknown.j2: cannot render"):
        render(load_template(tmp_path / "unknown.j2"), "", "Hi?", "a", "b", context_chars=700, answer_share=0.35)


def test_judge_spec_rejects_unknown_fields_and_the_key_needs_the_env_for_a_remote_url(monkeypatch):
    with pytest.raises(ValidationError):
        JudgeSpec(model="m", concurency=4)
    monkeypatch.delenv("DPO_EVAL_TEST_UNSET_KEY", raising=False)
    remote = JudgeSpec(model="m", base_url="https://api.example.com/v1", api_key_env="DPO_EVAL_TEST_UNSET_KEY")
    with pytest.raises(DpoEvalError, match="DPO_EVAL_TEST_UNSET_KEY: the variable is unset"):
        api_key(remote)
    local = JudgeSpec(model="m", base_url="http://127.0.0.1:1/v1", api_key_env="DPO_EVAL_TEST_UNSET_KEY")
    assert api_key(local) == LOCAL_PLACEHOLDER_KEY
    monkeypatch.setenv("DPO_EVAL_TEST_UNSET_KEY", "sk-from-env")
    assert api_key(remote) == "sk-from-env"


# ---------------------------------------------------------------- the real server and a run directory

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def judge_server(tmp_path_factory):
    """`transformers serve` on a free 127.0.0.1 port serving a copy of stories260k with a chat template."""
    folder = tmp_path_factory.mktemp("judge-model") / "stories260k"
    shutil.copytree(shared_path("models/stories260k"), folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    port = _free_port()
    log = (folder.parent / "serve.log").open("w")
    # One torch thread: on a shared 2-core machine more threads contend and calls get several times slower.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                served = (folder.parent / "serve.log").read_text()
                pytest.fail(f"transformers serve exited ({proc.returncode}): {served}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("transformers serve was not healthy within 120 s")
            time.sleep(0.25)
        yield {"url": f"http://127.0.0.1:{port}/v1", "model": str(folder)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def make_run(folder: Path) -> Path:
    """A run directory with pairs.parquet, answers.parquet, features.parquet (n_tokens) and summary.json."""
    folder.mkdir(parents=True)
    cols = ["pair_id", "split", "system", "prompt", "chosen", "rejected", "tuned", "base"]
    table = pl.DataFrame([dict(zip(cols, row)) for row in PAIRS])
    table.drop("tuned", "base").write_parquet(folder / "pairs.parquet")
    answers = table.unpivot(index="pair_id", on=["tuned", "base"], variable_name="model", value_name="answer")
    answers.write_parquet(folder / "answers.parquet")
    roles = table.unpivot(index=["pair_id", "split"], on=["chosen", "rejected", "tuned", "base"],
                          variable_name="role", value_name="text")
    roles.select("pair_id", "split", "role", n_tokens=pl.col("text").str.split(" ").list.len().cast(pl.Float64)
                 ).write_parquet(folder / "features.parquet")
    (folder / "summary.json").write_text(json.dumps({"n_pairs": {"train": 2, "valid": 2}}))
    return folder


def spec_for(server: dict, cache: Path, **changes) -> JudgeSpec:
    values = {"model": server["model"], "base_url": server["url"], "context_chars": CONTEXT_CHARS,
              "max_tokens": MAX_TOKENS, "concurrency": 1, "cache_dir": cache, **changes}
    return JudgeSpec(**values)


def stable(run: Path) -> pl.DataFrame:
    """The judgments without the columns a rerun may change (latency, cached), in a fixed order."""
    return pl.read_parquet(run / "judgments.parquet").select(STABLE).sort("pair_id", "comparison", "order")


N_JUDGMENTS = 2 * 2 * len(PAIRS)
N_CALLS = N_JUDGMENTS - 2  # p3's answers equal its labels: tuned_vs_base and chosen_vs_rejected share the messages


@pytest.fixture(scope="module")
def clean_run(judge_server, tmp_path_factory) -> Path:
    """A clean run at concurrency 1 on transformers serve: the reference the CLI run must equal."""
    run = make_run(tmp_path_factory.mktemp("clean") / "run")
    block = judge_run(run, spec_for(judge_server, run.parent / "cache"))
    assert block["calls"] == N_CALLS and block["pending"] == 0
    return run


@pytest.fixture(scope="module")
def scripted_clean_run(scripted_judge, tmp_path_factory) -> Path:
    """A clean run at concurrency 1 on the scripted judge: the reference of the budget, concurrency and retry runs."""
    run = make_run(tmp_path_factory.mktemp("scripted-clean") / "run")
    block = judge_run(run, spec_for(scripted_judge, run.parent / "cache"))
    assert block["calls"] == N_CALLS and block["complete"] and block["invalid"] == 0
    return run


def run_cli(argv: list[str]) -> None:
    """`dpo-eval ARGV` in this process (its logs reach caplog); click ends a good run with exit code 0."""
    from dpo_eval.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code in (0, None)


def test_cli_judges_both_orders_caches_everything_and_never_writes_the_key(judge_server, clean_run, tmp_path,
                                                                           monkeypatch, caplog, capsys):
    key = "sk-dpoeval-" + secrets.token_hex(16)
    monkeypatch.setenv("DPO_EVAL_TEST_JUDGE_KEY", key)
    monkeypatch.setenv("DPO_EVAL_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.DEBUG)
    run = make_run(tmp_path / "run")
    argv = ["judge", str(run), "--judge", "openai", "--judge-model", judge_server["model"], "--base-url",
            judge_server["url"], "--api-key-env", "DPO_EVAL_TEST_JUDGE_KEY", "--concurrency", "1",
            "--max-tokens", str(MAX_TOKENS), "--context-chars", str(CONTEXT_CHARS)]
    run_cli(argv)
    first = judge_output(capsys.readouterr().out)
    table = pl.read_parquet(run / "judgments.parquet")
    assert dict(table.schema) == SCHEMA and table.height == N_JUDGMENTS
    # Both orders of every pair and comparison, the roles swapped between them.
    for (pair, comparison), part in table.group_by("pair_id", "comparison"):
        assert sorted(part["order"]) == ["ab", "ba"]
        assert set(part["shown_first"]) == ({"tuned", "base"} if comparison == "tuned_vs_base"
                                            else {"chosen", "rejected"})
    # The raw text is kept; the invalid count is the table's.
    assert table["raw"].str.len_chars().min() > 0
    assert first["invalid"] == int((table["verdict"] == "invalid").sum())
    assert table["p_first"].is_null().all()  # transformers serve ignores logprobs
    cut = table.group_by("pair_id", "comparison").agg(pl.col("truncated").unique())
    flags = {(pair, comparison): values for pair, comparison, values in cut.iter_rows()}  # both orders cut alike
    assert flags == {("p0", "tuned_vs_base"): [False], ("p0", "chosen_vs_rejected"): [False],
                     ("p1", "tuned_vs_base"): [True], ("p1", "chosen_vs_rejected"): [False],  # the long answer
                     ("p2", "tuned_vs_base"): [True], ("p2", "chosen_vs_rejected"): [True],  # the long prompt
                     ("p3", "tuned_vs_base"): [False], ("p3", "chosen_vs_rejected"): [False]}
    assert table["prompt_tokens"].max() <= 512 - MAX_TOKENS  # the client cut the texts to the context
    assert (first["calls"], first["cached"]) == (N_CALLS, N_JUDGMENTS - N_CALLS)
    assert first["tokens"]["prompt"] == table.filter(~pl.col("cached"))["prompt_tokens"].sum()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_pairs"] == {"train": 2, "valid": 2}  # the rest of the summary is kept
    assert set(summary["judge"]) >= {"id", "kind", "model", "template_sha", "calls", "cached", "invalid", "tokens",
                                     "splits"}
    assert set(summary["judge"]["splits"]["valid"]) == {"tuned_vs_base", "chosen_vs_rejected"}
    assert summary["judge_headline"] and "id=\"judge\"" in (run / "report.html").read_text()  # the CLI reports too
    assert stable(run).equals(stable(clean_run))
    # A second run calls only for the replies that had no verdict (never cached); the rest come from the cache.
    asked_again = int(table.filter((pl.col("verdict") == "invalid") & ~pl.col("cached")).height)
    run_cli(argv)
    second = judge_output(capsys.readouterr().out)
    assert (second["calls"], second["cached"]) == (asked_again, N_JUDGMENTS - asked_again)
    again = pl.read_parquet(run / "judgments.parquet")
    assert again.filter(pl.col("verdict") != "invalid")["cached"].all() and stable(run).equals(stable(clean_run))
    # The key is nowhere: not in the run directory, the cache, the logs or the output.
    for path in [*run.rglob("*"), *(tmp_path / "cache").rglob("*")]:
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    assert caplog.records and key not in caplog.text
    assert key not in json.dumps([first, second])


def test_budget_stop_keeps_the_judgments_made_and_a_resumed_run_completes_them(scripted_judge, scripted_clean_run,
                                                                               tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(DpoEvalError, match=r"budget of 5 calls \(--max-calls\).*5 calls this run.*continue"):
        judge_run(run, spec_for(scripted_judge, tmp_path / "cache", max_calls=5, concurrency=2))
    partial = pl.read_parquet(run / "judgments.parquet")
    kept = json.loads((run / "summary.json").read_text())["judge"]
    assert kept["calls"] == 5 and not kept["complete"] and kept["pending"] == N_CALLS - 5
    assert partial.height >= 5 and not partial["cached"].all()
    resumed = judge_run(run, spec_for(scripted_judge, tmp_path / "cache", max_calls=N_CALLS - 5))
    assert resumed["calls"] == N_CALLS - 5 and resumed["complete"]
    assert stable(run).equals(stable(scripted_clean_run))


def test_concurrency_4_gives_the_same_judgments_as_1(scripted_judge, scripted_clean_run, tmp_path):
    run = make_run(tmp_path / "run")
    block = judge_run(run, spec_for(scripted_judge, tmp_path / "cache", concurrency=4))
    assert block["calls"] == N_CALLS
    assert stable(run).equals(stable(scripted_clean_run))


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that answers 429 or 500, or stalls past the client's timeout and drops the
    connection, for set shares of requests (seeded), and forwards the rest to `upstream`."""

    def __init__(self, upstream: str, *, p429: float = 0.0, p500: float = 0.0, pstall: float = 0.0,
                 stall_s: float = 0.0, seed: int = 0):
        self.upstream, self.stall_s = upstream.rstrip("/"), stall_s
        self.cuts = (p429, p429 + p500, p429 + p500 + pstall)
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.counts = {"429": 0, "500": 0, "stall": 0, "forwarded": 0}
        self.bodies: list[dict] = []  # every request body received, as JSON
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.bodies.append(json.loads(body or b"null"))
                fault = proxy.draw()
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                    self.close_connection = True
                    return
                if fault in ("429", "500"):
                    return self.answer(int(fault), b'{"error": {"message": "injected fault"}}')
                request = urllib.request.Request(proxy.upstream + self.path, data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        self.answer(response.status, response.read())
                except urllib.error.HTTPError as exc:
                    self.answer(exc.code, exc.read())

            def answer(self, status: int, payload: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def draw(self) -> str:
        """The fate of the next request: the first ones take each fault with a nonzero share once, so every
        kind is seen; the rest draw from the seeded shares."""
        with self.lock:
            u = self.rng.random()
            kinds = [k for k, share in zip(("429", "500", "stall"), np.diff((0, *self.cuts))) if share > 0]
            seen = sum(self.counts.values())
            fault = kinds[seen] if seen < len(kinds) else "429" if u < self.cuts[0] else "500" if u < self.cuts[1] \
                else "stall" if u < self.cuts[2] else "forwarded"
            self.counts[fault] += 1
            return fault

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_retries_recover_from_429_500_and_stalls_and_change_no_judgment(scripted_judge, scripted_clean_run, tmp_path):
    run = make_run(tmp_path / "run")
    upstream = scripted_judge["url"].removesuffix("/v1")
    with FaultProxy(upstream, p429=0.15, p500=0.15, pstall=0.1, stall_s=2.0, seed=1) as proxy:
        spec = spec_for(scripted_judge, tmp_path / "cache", base_url=proxy.url + "/v1", concurrency=4,
                        timeout_s=1.0, max_retries=8)
        block = judge_run(run, spec)
    assert proxy.counts["429"] and proxy.counts["500"] and proxy.counts["stall"], proxy.counts
    assert proxy.counts["forwarded"] >= N_CALLS and block["calls"] == N_CALLS and block["complete"]
    # nothing lost, nothing changed: the same verdicts as a clean run against the server itself (the judge's id
    # names the proxy's URL, so it is left out of the comparison)
    assert stable(run).drop("judge").equals(stable(scripted_clean_run).drop("judge"))


def test_a_server_that_keeps_failing_stops_the_run_with_a_message(scripted_judge, tmp_path):
    run = make_run(tmp_path / "run")
    upstream = scripted_judge["url"].removesuffix("/v1")
    with FaultProxy(upstream, p500=1.0) as proxy:
        spec = spec_for(scripted_judge, tmp_path / "cache", base_url=proxy.url + "/v1", max_retries=1)
        with pytest.raises(DpoEvalError, match=r"answered 500 .*0 of 16 judgments are made"):
            judge_run(run, spec)
    assert proxy.counts["500"] == 2  # one call and its one retry; nothing else was sent after the failure
    assert pl.read_parquet(run / "judgments.parquet").height == 0


# ---------------------------------------------------------------- generation through the same server (--engine openai)

SERVED_PROMPTS = ["Tell a short story.", "What did Lily find?", "Why was Tom sad?", "Who helped Ben?",
                  "Once upon a time, a little bird"]
SERVED_TOKENS = 16


def served_argv(server_url: str, model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--base", model, "--dataset", str(data), "--engine", "openai", "--base-url", server_url,
            "--served-base", model, "--served-tuned", model, "--max-new-tokens", str(SERVED_TOKENS),
            "--quantization", "none", "--compute-dtype", "float32", "--concurrency", "2", "--out", str(out), *extra]


def test_engine_openai_sends_dpo_evals_rendering_caches_every_answer_and_agrees_with_the_in_process_engine(
        judge_server, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from dpo_eval.config import DatasetSpec, GenerationSpec, ModelSpec
    from dpo_eval.data.pairs import load_pairs
    from dpo_eval.generation.generate import generate_both
    from dpo_eval.generation.models import load_model

    monkeypatch.setenv("DPO_EVAL_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": "Yes.", "rejected": "No."}) + "\n"
                            for p in SERVED_PROMPTS))
    model = judge_server["model"]
    with FaultProxy(judge_server["url"].removesuffix("/v1")) as proxy:
        run_cli(served_argv(proxy.url + "/v1", model, data, tmp_path / "a.parquet"))
        first = json.loads(capsys.readouterr().out)
        # tuned and base are served under one name here: the base requests are the tuned ones, from the cache
        assert (first["requests"], first["cached"], first["sent_as_ids"]) == (5, 5, 0)
        assert first["prompt_token_mismatches"] == 0 and proxy.counts["forwarded"] == 5
        # What the server received: the chat template's text (known in advance), no BOS in it, greedy, max_tokens
        tokenizer = AutoTokenizer.from_pretrained(model)
        expected = {f"user: {p}\nassistant:" for p in SERVED_PROMPTS}
        assert {body["prompt"] for body in proxy.bodies} == expected
        assert all(body["model"] == model and body["temperature"] == 0 and body["max_tokens"] == SERVED_TOKENS
                   for body in proxy.bodies)
        answers = pl.read_parquet(tmp_path / "a.parquet")
        for text in expected:  # the ids the server builds (special tokens on) hold one BOS, then dpo-eval's text
            ids = tokenizer(text)["input_ids"]
            assert ids == [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
            assert ids.count(tokenizer.bos_token_id) == 1
        # ... and the server counted exactly dpo-eval's prompt lengths (a doubled BOS would add one)
        lengths = sorted(len(tokenizer(t)["input_ids"]) for t in expected)
        assert sorted(answers.filter(pl.col("model") == "base")["n_prompt_tokens"].to_list()) == lengths
        # A second run sends nothing: every answer comes from the cache (the URL spelled otherwise: the identity
        # holds it normalised), the same answers
        run_cli(served_argv(proxy.url.replace("http://", "HTTP://") + "/v1/", model, data, tmp_path / "b.parquet"))
        second = json.loads(capsys.readouterr().out)
        assert (second["requests"], second["cached"], proxy.counts["forwarded"]) == (0, 10, 5)
        assert pl.read_parquet(tmp_path / "b.parquet").equals(answers)
    # Agreement with the in-process engine (greedy, float32, the same rendering) on the same prompts
    loaded = load_model(ModelSpec(base=model, quantization="none", compute_dtype="float32"))
    local = generate_both(loaded, load_pairs(DatasetSpec(source=str(data))), GenerationSpec(max_new_tokens=SERVED_TOKENS))
    served = answers.filter(pl.col("model") == "base").sort("pair_id")
    local = local.filter(pl.col("model") == "base").sort("pair_id")
    assert served["pair_id"].equals(local["pair_id"]) and served["n_prompt_tokens"].equals(local["n_prompt_tokens"])
    pairs_ = list(zip(served["answer"], local["answer"]))
    identical = sum(a == b for a, b in pairs_)
    prefix = sum(len(os.path.commonprefix([a, b])) for a, b in pairs_) / sum(max(len(a), len(b)) for a, b in pairs_)
    assert served["finish_reason"].equals(local["finish_reason"]) and served["n_new_tokens"].equals(local["n_new_tokens"])
    print(f"served vs in-process greedy: {identical} of {len(pairs_)} identical, common-prefix share {prefix:.3f}; "
          f"finish {list(zip(served['finish_reason'], local['finish_reason']))}, "
          f"new tokens {list(zip(served['n_new_tokens'], local['n_new_tokens']))}")


def test_engine_openai_never_sends_a_rendered_bos_and_sends_ids_where_text_would_not_give_dpo_evals_ids():
    """A chat template that renders the BOS: the server, adding its own, would read two (shown on the tokenizer, as
    servers tokenize a completion prompt); what is sent is text only where the server's ids equal dpo-eval's."""
    from transformers import AutoTokenizer

    from dpo_eval.generation.openai_engine import wire_prompts
    from dpo_eval.generation.prompts import PromptFormatter

    tokenizer = AutoTokenizer.from_pretrained(shared_path("models/stories260k"))
    for template, cut in (("{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}", 512),
                          (CHAT_TEMPLATE, 512), (CHAT_TEMPLATE, 100)):  # the last cuts the long prompt from the left
        tokenizer.chat_template = template
        formatter = PromptFormatter(tokenizer)
        texts = [formatter.render("", [{"role": "user", "content": p}]) for p in SERVED_PROMPTS + [LONG]]
        encoded = [formatter.encode(text, cut) for text in texts]
        sent, as_ids = wire_prompts(formatter, texts, encoded)
        for raw, prompt, wire in zip(texts, encoded, sent):
            assert prompt.ids.count(tokenizer.bos_token_id) == 1
            if template.startswith("{{ bos_token }}"):
                assert tokenizer(raw)["input_ids"][:2] == [tokenizer.bos_token_id] * 2  # the raw text: a doubled BOS
            assert wire == prompt.ids if isinstance(wire, list) else tokenizer(wire)["input_ids"] == prompt.ids
        assert as_ids == sum(isinstance(wire, list) for wire in sent)
        if template == CHAT_TEMPLATE:  # the prompts not cut go as their text; a cut one as text or ids, as it re-tokenizes
            assert as_ids <= (cut == 100) and sent[0] == "user: Tell a short story.\nassistant:"
            assert [p.truncated for p in encoded] == [False] * len(SERVED_PROMPTS) + [cut == 100]
        else:  # stories260k tokenizes the text after a BOS without a leading space: no text gives those ids
            assert as_ids == len(sent)


def test_engine_openai_errors_name_the_option_to_fix(judge_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPO_EVAL_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Who helped Ben?", "chosen": "Mom.", "rejected": "No."}) + "\n")
    model = judge_server["model"]

    def fails(argv: list[str]) -> str:
        from dpo_eval.cli.main import main

        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        return capsys.readouterr().err

    argv = served_argv(judge_server["url"], model, data, tmp_path / "a.parquet", "--max-retries", "0")
    missing = [a for k, a in enumerate(argv) if a != "--served-tuned" and argv[k - 1] != "--served-tuned"]
    assert "--engine openai needs --served-tuned" in fails(missing)
    closed = f"http://127.0.0.1:{_free_port()}/v1"
    assert f"--base-url {closed}: cannot reach a server there" in fails(
        served_argv(closed, model, data, tmp_path / "a.parquet", "--max-retries", "0"))
    unknown = [("/nonexistent/tuned" if argv[k - 1] == "--served-tuned" else a) for k, a in enumerate(argv)]
    message = fails(unknown)
    assert "--served-tuned /nonexistent/tuned: the server at" in message and "does not serve that name" in message
    # A prompt template that renders the BOS: its text would reach this server with two, so it goes as ids, which
    # transformers serve refuses (it takes text only); the message says why and what to do
    message = fails(argv + ["--prompt-template", "<s>{{ prompt }}"])
    assert "refused a prompt sent as token ids (400" in message and "--prompt-template without the BOS" in message
    assert not (tmp_path / "a.parquet").exists()


def test_engine_openai_settings_leave_the_other_engines_cache_keys_alone():
    from dpo_eval.config import GenerationSpec, ServerSpec

    # the generation cache key (stages.spec_hash) reads model_dump: no `server` key unless there is a server
    assert "server" not in GenerationSpec().model_dump(mode="json")
    assert list(GenerationSpec(engine="static").model_dump(mode="json")) == [
        "max_new_tokens", "do_sample", "temperature", "top_p", "seed", "batch_size", "engine", "merge",
        "max_batch_tokens"]
    server = ServerSpec(base_url="http://127.0.0.1:8000/v1", served_base="b", served_tuned="t")
    assert GenerationSpec(engine="openai", server=server).model_dump(mode="json")["server"]["served_tuned"] == "t"
    with pytest.raises(ValidationError, match="engine openai needs a server"):
        GenerationSpec(engine="openai")
    with pytest.raises(ValidationError, match="used by engine openai only"):
        GenerationSpec(engine="hf", server=server)

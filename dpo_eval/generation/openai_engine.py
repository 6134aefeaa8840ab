"""Answers from an OpenAI-compatible inference server the user already runs (--engine openai).

vLLM, SGLang and TGI serve a base model and LoRA adapters side by side (vLLM: `vllm serve BASE --enable-lora
--lora-modules tuned=ADAPTER`); base answers come from the base's served name (--served-base), tuned answers from
the adapter's (--served-tuned). The prompt is rendered and tokenized by dpo-eval's own formatter (prompts.py) and
sent to `/v1/completions`, which applies no chat template, so the server never templates it a second time:

- as text where the server's own tokenization of that text gives dpo-eval's ids exactly. Servers tokenize a
  completion prompt with the tokenizer's special tokens (vLLM, SGLang, TGI and `transformers serve` all do), so
  the BOS a chat template renders is cut from the text and the server adds the one BOS back: no doubled BOS. A
  prompt cut from the left (too long for the context) is sent as the text of its kept ids.
- as token ids (`prompt: [int, ...]`, which vLLM and SGLang take as they are) where the text would not
  re-tokenize to the same ids; `repairs` says how many. A server that takes only text refuses them (an error).

Every reply's prompt token count (usage.prompt_tokens) is checked against dpo-eval's; a difference (another
tokenizer on the server, a BOS added twice) is reported in `repairs`, with the first pair. Greedy is temperature
0; sampling sends temperature, top_p and each prompt's seed (generate.prompt_seed). An answer cut by max_tokens is
finish_reason "length", one the model ended is "eos"; n_new_tokens is the server's completion_tokens (the EOS
counted, as the in-process engines count it).

Answers are cached by request in one SQLite file (cache folder/served/answers.sqlite), keyed by the normalised
base URL, the served name, the decoding settings and the exact prompt sent: a second run sends no request. The
server's weights cannot be hashed from here: a server restarted with other weights under the same name and URL
serves the old answers from the cache (change the served name, or clear the cache). The API key is read from
the environment and kept only inside the client.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from urllib.parse import urlparse

import polars as pl

from dpo_eval.config import GenerationSpec, ModelSpec, ServerSpec, default_cache_dir
from dpo_eval.data.pairs import prompt_representatives, prompt_turns
from dpo_eval.errors import DpoEvalError
from dpo_eval.jsonsafe import json_key
from dpo_eval.sqlite_table import open_table

log = logging.getLogger(__name__)
CODE_VERSION = "served-v1"  # bump with a change to what a cached served answer means
LOCAL_PLACEHOLDER_KEY = "dpo-eval-local-server"  # local servers take any key; the openai client needs one
FLAGS = {"base": "--served-base", "tuned": "--served-tuned"}


def check_server(generation: GenerationSpec) -> ServerSpec:
    """The server of an openai-engine generation; a DpoEvalError naming the missing options."""
    server = generation.server
    if server is None:
        raise DpoEvalError("--engine openai needs --base-url, --served-base and --served-tuned: the server and the "
                           "names it serves the base and base + adapter under")
    normalised_url(server.base_url)
    return server


def normalised_url(base_url: str) -> str:
    """The server as one string: scheme and host lower-cased, the default port dropped, no trailing slash (the
    judge's rule, dpo_eval.judges.api.normalised_url, which this layer cannot import)."""
    try:
        parts = urlparse(base_url.strip())
        host, port_number = (parts.hostname or "").lower(), parts.port
    except ValueError as exc:
        raise DpoEvalError(f"--base-url {base_url}: {exc}; give a URL like http://127.0.0.1:8000/v1") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host:
        raise DpoEvalError(f"--base-url {base_url}: not an http(s) URL with a host; give one like "
                           "http://127.0.0.1:8000/v1")
    port = f":{port_number}" if port_number and port_number != {"http": 80, "https": 443}[scheme] else ""
    return f"{scheme}://{host}{port}{parts.path.rstrip('/')}"


def _api_key(server: ServerSpec) -> str:
    key = os.environ.get(server.api_key_env)
    if key:
        return key
    host = urlparse(server.base_url).hostname or ""
    if host in ("localhost", "::1") or host.startswith("127."):
        return LOCAL_PLACEHOLDER_KEY
    raise DpoEvalError(f"--api-key-env {server.api_key_env}: the variable is unset; set it to the API key of "
                       f"{server.base_url} (the key is never written anywhere)")


def served_identity(server: ServerSpec, generation: GenerationSpec, label: str) -> dict:
    """What can change a served answer besides the prompt: where (normalised URL), which served model, decoding."""
    sampling = ({"temperature": generation.temperature, "top_p": generation.top_p, "seed": generation.seed}
                if generation.do_sample else "greedy")
    return {"engine": "openai", "base_url": normalised_url(server.base_url),
            "model": server.served_tuned if label == "tuned" else server.served_base,
            "max_tokens": generation.max_new_tokens, "sampling": sampling, "code": CODE_VERSION}


class ServedCache:
    """Served answers keyed by request (identity and prompt sent), in one SQLite file; safe across threads and
    processes."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT, n_new_tokens INTEGER, "
              "finish_reason TEXT, prompt_tokens INTEGER)")

    def __init__(self, folder=None):
        from pathlib import Path

        self.path = Path(folder or default_cache_dir() / "served") / "answers.sqlite"

    def get_many(self, keys: list[str]) -> dict[str, tuple]:
        found = {}
        with open_table(self.path, self.SCHEMA) as db:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                rows = db.execute(f"SELECT * FROM answers WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                found.update({key: tuple(values) for key, *values in rows.fetchall()})
        return found

    def put(self, key: str, reply: tuple) -> None:
        with open_table(self.path, self.SCHEMA) as db:
            db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)", (key, *reply))


def wire_prompts(formatter, texts: list[str], encoded) -> tuple[list, int]:
    """What to send for each prompt (module docstring): its text where the server's tokenization of the text (with
    special tokens) gives dpo-eval's ids, else the ids; and how many are sent as ids."""
    tokenizer = formatter.tokenizer
    bos_text = tokenizer.bos_token if formatter.bos is not None else None
    sent, as_ids = [], 0
    for text, prompt in zip(texts, encoded):
        if prompt.truncated:
            text = tokenizer.decode(prompt.ids, skip_special_tokens=False)
        while bos_text and text.startswith(bos_text):
            text = text[len(bos_text):]
        if list(tokenizer(text)["input_ids"]) == prompt.ids:
            sent.append(text)
        else:
            sent.append(list(prompt.ids))
            as_ids += 1
    return sent, as_ids


def _reply(response) -> tuple:
    """(text, n_new_tokens, finish_reason, prompt_tokens) of one completion."""
    choice = response.choices[0]
    usage = response.usage
    finish = {"length": "length", "stop": "eos"}.get(choice.finish_reason, str(choice.finish_reason))
    return (choice.text or "", getattr(usage, "completion_tokens", None), finish,
            getattr(usage, "prompt_tokens", None))


class ServedClient:
    """One OpenAI-compatible server; `complete` is safe from several threads."""

    def __init__(self, server: ServerSpec):
        from openai import OpenAI

        self.server = server
        self.client = OpenAI(base_url=server.base_url.strip(), api_key=_api_key(server),
                             max_retries=server.max_retries, timeout=server.timeout_s)
        self.requests = 0

    def complete(self, model: str, prompt, generation: GenerationSpec, seed: int) -> tuple:
        sampling = ({"temperature": generation.temperature, "top_p": generation.top_p, "seed": seed}
                    if generation.do_sample else {"temperature": 0.0})
        self.requests += 1
        return _reply(self.client.completions.create(model=model, prompt=prompt, max_tokens=generation.max_new_tokens,
                                                     n=1, **sampling))

    def served_names(self) -> list[str] | None:
        """The model names the server lists (/v1/models); None where it does not say."""
        try:
            return [model.id for model in self.client.models.list()]
        except Exception:  # noqa: BLE001 - any failure: the list is not known
            return None

    def failure(self, exc: Exception, label: str, sent_ids: bool = False) -> DpoEvalError:
        """A DpoEvalError for a request that failed after its retries, naming the option to fix; `sent_ids`: the
        failed request's prompt was token ids (wire_prompts)."""
        import openai

        server, flag = self.server, FLAGS[label]
        name = server.served_tuned if label == "tuned" else server.served_base
        if isinstance(exc, openai.APITimeoutError):
            return DpoEvalError(f"--base-url {server.base_url}: no answer within {server.timeout_s} s "
                                f"({server.max_retries} retries); raise --timeout or check the server")
        if isinstance(exc, openai.APIConnectionError):
            return DpoEvalError(f"--base-url {server.base_url}: cannot reach a server there ({server.max_retries} "
                                "retries); start the server or fix the URL")
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return DpoEvalError(f"{server.base_url} refused the key in {server.api_key_env} ({exc.status_code}): "
                                "set --api-key-env to a variable holding a valid key")
        if isinstance(exc, openai.APIStatusError):
            names = self.served_names()
            body = str(getattr(exc, "body", None) or exc.message)[:300]
            if names is not None and name not in names:
                return DpoEvalError(f"{flag} {name}: the server at {server.base_url} does not serve that name (it "
                                    f"lists {names}; it answered {exc.status_code}: {body}); give the name it serves")
            if sent_ids and 400 <= exc.status_code < 500:
                return DpoEvalError(f"{server.base_url} refused a prompt sent as token ids ({exc.status_code}: {body}); "
                                    "its text does not re-tokenize to dpo-eval's ids (a chat template that renders "
                                    "the BOS, or a prompt cut to the context): use a server that takes token ids "
                                    "(vLLM, SGLang), or a --prompt-template without the BOS")
            return DpoEvalError(f"{server.base_url} answered {exc.status_code} to a completion of {flag} {name}: "
                                f"{body}")
        return DpoEvalError(f"completion of {flag} {name} at {server.base_url} failed: {type(exc).__name__}: {exc}")


def _request_all(client: ServedClient, cache: ServedCache, label: str, work: dict[str, tuple], generation,
                 on_batch=None) -> None:
    """Send every request of `work` (key -> (prompt, seed)) with at most `concurrency` in flight, caching each
    reply as it arrives; the first failure stops new requests, lets the ones in flight finish (kept), and raises."""
    model = client.server.served_tuned if label == "tuned" else client.server.served_base
    queue, running, error, error_key = iter(work.items()), {}, None, None
    pool = ThreadPoolExecutor(max_workers=client.server.concurrency, thread_name_prefix="served")
    try:
        while True:
            while error is None and len(running) < client.server.concurrency:
                item = next(queue, None)
                if item is None:
                    break
                key, (prompt, seed) = item
                running[pool.submit(client.complete, model, prompt, generation, seed)] = key
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                key = running.pop(future)
                try:
                    cache.put(key, future.result())
                except Exception as exc:  # noqa: BLE001 - openai raises one of several types once its retries are spent
                    error, error_key = (error, error_key) if error is not None else (exc, key)
                    continue
                if on_batch is not None:
                    on_batch(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if error is not None:
        raise client.failure(error, label, isinstance(work[error_key][0], list)) from error


def generate_served(spec: ModelSpec, generation: GenerationSpec, pairs: pl.DataFrame,
                    models: tuple[str, ...] = ("tuned", "base"), on_batch=None, repairs: list[str] | None = None,
                    cache: ServedCache | None = None) -> tuple[pl.DataFrame, dict]:
    """Answers of the served models to every prompt of `pairs` (rows of answers.parquet, one per pair and model,
    each distinct prompt asked once per model), and an account: requests made, answers from the cache, prompts
    sent as ids. The prompts are rendered with the base's tokenizer (`spec.base`, its chat template or
    `spec.prompt_template`), cut to its context minus max_new_tokens."""
    from transformers import AutoConfig

    from dpo_eval.generation.generate import ANSWER_SCHEMA, prompt_seed
    from dpo_eval.generation.models import load_tokenizer
    from dpo_eval.generation.prompts import PromptFormatter

    server = check_server(generation)
    repairs = repairs if repairs is not None else []
    tokenizer = load_tokenizer(spec, repairs)
    config = AutoConfig.from_pretrained(spec.base, revision=spec.revision)
    context = int(getattr(config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    formatter = PromptFormatter(tokenizer, spec.prompt_template, repairs)
    rows, of = prompt_representatives(pairs)
    distinct = pairs[rows]
    texts = [formatter.render(row["system"], prompt_turns(row)) for row in distinct.iter_rows(named=True)]
    limit = context - generation.max_new_tokens
    if limit < 2:
        raise DpoEvalError(f"--max-new-tokens leaves {limit} prompt tokens in the model's context; lower it")
    encoded = [formatter.encode(text, limit) for text in texts]
    formatter.record_counts(limit)
    sent, as_ids = wire_prompts(formatter, texts, encoded)
    if as_ids:
        repairs.append(f"{as_ids} prompts sent to the server as token ids: their text does not re-tokenize to "
                       "dpo-eval's ids")
    seeds = [prompt_seed(generation.seed, pid) for pid in distinct["pair_id"].to_list()]
    cache = cache or ServedCache()
    client = ServedClient(server)
    frames, account = [], {"requests": 0, "cached": 0, "sent_as_ids": as_ids, "prompt_token_mismatches": 0}
    for label in models:
        identity = served_identity(server, generation, label)
        keys = [json_key([identity, prompt, seeds[k] if generation.do_sample else None])
                for k, prompt in enumerate(sent)]
        found = cache.get_many(keys)
        account["cached"] += sum(key in found for key in set(keys))
        work = {key: (sent[k], seeds[k]) for k, key in enumerate(keys) if key not in found}
        log.info("served %s (%s): %d cached, %d to request", label, identity["model"], len(keys) - len(work),
                 len(work))
        start = time.perf_counter()
        _request_all(client, cache, label, work, generation, on_batch)
        log.info("served %s: %d requests in %.1f s", label, len(work), time.perf_counter() - start)
        found.update(cache.get_many(list(work)))
        replies = [found[key] for key in keys]
        wrong = [(k, reply[3]) for k, reply in enumerate(replies)
                 if reply[3] is not None and reply[3] != len(encoded[k].ids)]
        if wrong:
            k, counted = wrong[0]
            account["prompt_token_mismatches"] += len(wrong)
            repairs.append(f"the server counted other prompt lengths than dpo-eval's for {len(wrong)} {label} prompts "
                           f"(first: pair {distinct['pair_id'][k]}, {counted} tokens where dpo-eval has "
                           f"{len(encoded[k].ids)}): it tokenizes differently (another tokenizer, a doubled BOS?)")
        frames.append(pl.DataFrame({
            "pair_id": pairs["pair_id"].to_list(), "model": [label] * pairs.height,
            "answer": [replies[k][0] for k in of], "n_prompt_tokens": [len(encoded[k].ids) for k in of],
            "n_new_tokens": [replies[k][1] for k in of], "finish_reason": [replies[k][2] for k in of],
            "truncated": [encoded[k].truncated for k in of]}, schema=ANSWER_SCHEMA))
    account["requests"] = client.requests
    return (pl.concat(frames) if frames else pl.DataFrame(schema=ANSWER_SCHEMA)), account

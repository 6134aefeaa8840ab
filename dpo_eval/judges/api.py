"""Judge calls over an OpenAI-compatible chat API: the client, the content cache, and bounded parallel calls.

Retries are the openai client's own (`max_retries`, `timeout`): it retries 408, 409, 429, 5xx, timeouts and
lost connections with exponential backoff (0.5 s doubling to 8 s, with jitter; a Retry-After header up to
60 s is honoured). `max_calls` counts calls, not their retries. A request the server refuses for good (see
`refused`: e.g. 400 for a prompt too long for it) is a failed judgment of that pair, kept with the server's
message; the other requests go on. A reply without a readable verdict is used in this run's table
(as invalid) but not cached, so a later run asks again. The API key is read from the environment
when the client is built and kept only inside it: no identity, cache row, table or log line holds it.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from dpo_eval.config import JudgeSpec, default_cache_dir
from dpo_eval.errors import DpoEvalError
from dpo_eval.jsonsafe import json_key
from dpo_eval.judges.prompt import CODE_VERSION, JudgeTemplate, p_first, parse_verdict
from dpo_eval.judges.verdicts import reader, style_identity
from dpo_eval.sqlite_table import open_table

log = logging.getLogger(__name__)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
LOCAL_PLACEHOLDER_KEY = "dpo-eval-local-server"  # local servers take any key; the openai client needs one
REFUSALS_TO_STOP = 4  # this many refusals in a row from the first call on stop the run: nothing would be judged


@dataclass(frozen=True)
class Reply:
    """What one judge call returned (or what the cache kept of it)."""

    raw: str
    p_first: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float
    cached: bool = False
    error: str | None = None  # the server refused the request (a non-retryable 4xx): no verdict, never cached


@dataclass
class Outcome:
    """The replies by request key, the calls this run made, the requests left without a reply, and why."""

    replies: dict[str, Reply] = field(default_factory=dict)
    calls: int = 0
    pending: int = 0
    stopped: str | None = None  # the budget stopped the run
    failure: str | None = None  # a call failed after its retries


def normalised_url(base_url: str | None) -> str:
    """The server a judge is reached at, as one string: scheme and host lower-cased, the scheme's default port
    dropped, no trailing slash; "" for OpenAI's own API (base_url None)."""
    if not base_url:
        return ""
    try:
        parts = urlparse(base_url.strip())
        host = (parts.hostname or "").lower()
        port_number = parts.port
    except ValueError as exc:  # urllib's words: "Port out of range 0-65535", "Port could not be cast ..."
        raise DpoEvalError(f"--base-url {base_url}: {exc}; give a URL like http://127.0.0.1:8000/v1") from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise DpoEvalError(f"--base-url {base_url}: not an http(s) URL with a host; give one like "
                           "http://127.0.0.1:8000/v1")
    default = {"http": 80, "https": 443}[parts.scheme.lower()]
    port = f":{port_number}" if port_number and port_number != default else ""
    return f"{parts.scheme.lower()}://{host}{port}{parts.path.rstrip('/')}"


def judge_identity(spec: JudgeSpec, template: JudgeTemplate) -> dict:
    """Everything that can change a verdict: model name, where it is served (normalised base_url) and the
    user's revision label, template hash, decoding and cutting settings. The key is left out."""
    return {"kind": spec.kind, "model": spec.model, "base_url": normalised_url(spec.base_url),
            "revision": spec.revision, "template_sha": template.sha, "temperature": spec.temperature,
            "max_tokens": spec.max_tokens, "logprobs": spec.logprobs, "context_chars": spec.context_chars,
            "answer_share": spec.answer_share, "code": CODE_VERSION, **style_identity(spec)}


def judge_id(identity: dict) -> str:
    """`openai:<model>:<12 hex digits of the identity's sha256>`."""
    digest = json_key(identity, 12)
    return f"{identity['kind']}:{identity['model']}:{digest}"


def request_key(judge: str, messages: list[dict]) -> str:
    """Content key of one judgment: sha256 of the judge id and the exact messages (prompt, both answers as
    cut, and their order)."""
    return json_key([judge, messages])


def is_local(base_url: str | None) -> bool:
    """True for a base_url on this machine (localhost, 127.x, ::1)."""
    host = urlparse(base_url).hostname if base_url else None
    return host is not None and (host in LOCAL_HOSTS or host.startswith("127."))


def api_key(spec: JudgeSpec) -> str:
    """The key from the environment variable `spec.api_key_env`; a placeholder for a local server."""
    key = os.environ.get(spec.api_key_env)
    if key:
        return key
    if is_local(spec.base_url):
        log.info("%s is unset: sending a placeholder key to the local server %s", spec.api_key_env, spec.base_url)
        return LOCAL_PLACEHOLDER_KEY
    raise DpoEvalError(f"--api-key-env {spec.api_key_env}: the variable is unset; set it to the API key of "
                       f"{spec.base_url or 'the OpenAI API'} (the key is never written anywhere)")


class JudgmentCache:
    """Replies keyed by request_key in one SQLite file; safe across threads and processes."""

    def __init__(self, folder: Path | None = None):
        self.path = Path(folder or default_cache_dir() / "judge") / "judgments.sqlite"

    SCHEMA = ("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, judge TEXT, raw TEXT, "
              "p_first REAL, prompt_tokens INTEGER, completion_tokens INTEGER, latency_s REAL); "
              "CREATE TABLE IF NOT EXISTS asked (key TEXT PRIMARY KEY, judge TEXT)")

    def _connect(self):
        return open_table(self.path, self.SCHEMA)

    def _rows(self, select: str, keys: list[str]) -> list[tuple]:
        """The rows of `select ... WHERE key IN (keys)`, asked 500 keys at a time (SQLite's variable limit)."""
        rows: list[tuple] = []
        with self._connect() as db:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                rows += db.execute(f"{select} WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        return rows

    def get_many(self, keys: list[str]) -> dict[str, Reply]:
        rows = self._rows("SELECT key, raw, p_first, prompt_tokens, completion_tokens, latency_s FROM replies", keys)
        return {key: Reply(*values, cached=True) for key, *values in rows}

    def mark_asked(self, key: str, judge: str) -> None:
        """Remember a request that was asked and got no verdict (not its reply: that is asked again)."""
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO asked VALUES (?, ?)", (key, judge))

    def asked(self, keys: list[str]) -> set[str]:
        """Those of `keys` asked before without a verdict."""
        return {key for (key,) in self._rows("SELECT key FROM asked", keys)}

    def put(self, key: str, judge: str, reply: Reply) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (key, judge, reply.raw, reply.p_first, reply.prompt_tokens, reply.completion_tokens,
                        reply.latency_s))


class ChatJudge:
    """One judge model behind an OpenAI-compatible endpoint; `call` is safe from several threads."""

    def __init__(self, spec: JudgeSpec):
        from openai import OpenAI

        self.spec = spec
        base_url = spec.base_url.strip() if spec.base_url else None  # as the identity reads it
        self.client = OpenAI(base_url=base_url, api_key=api_key(spec), max_retries=spec.max_retries,
                             timeout=spec.timeout_s)

    def call(self, messages: list[dict]) -> Reply:
        """One chat completion at the spec's decoding settings; the reply text, p_first and usage."""
        extra = {"logprobs": True, "top_logprobs": 5} if self.spec.logprobs else {}
        start = time.perf_counter()
        response = self.client.chat.completions.create(
            model=self.spec.model, messages=messages, temperature=self.spec.temperature,
            max_tokens=self.spec.max_tokens, n=1, **extra)
        latency = time.perf_counter() - start
        choice = response.choices[0]
        raw = choice.message.content or ""
        content = getattr(choice.logprobs, "content", None) or []
        tokens = [position.model_dump() for position in content]
        usage = response.usage
        reading = reader(self.spec)(raw)  # reasoned: an A or B in the justification is no verdict's token
        first = p_first(tokens, reading.verdict) if self.spec.judge_style == "verdict" else None
        return Reply(raw, first, getattr(usage, "prompt_tokens", None),
                     getattr(usage, "completion_tokens", None), latency)


def describe_failure(exc: Exception, spec: JudgeSpec) -> str:
    """One line for a call that failed after its retries (never holding the key)."""
    import openai

    where = spec.base_url or "the OpenAI API"
    if isinstance(exc, openai.AuthenticationError):
        return f"{where} refused the key in {spec.api_key_env} (401): set the variable to a valid key"
    if isinstance(exc, openai.APITimeoutError):
        return f"{where} did not answer within {spec.timeout_s} s, {spec.max_retries} retries included"
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot reach {where} ({spec.max_retries} retries): no server answers at that URL"
    if isinstance(exc, openai.APIStatusError):
        body = str(getattr(exc, "body", None) or exc.message)[:300]
        return f"{where} answered {exc.status_code} for model {spec.model!r}: {body}"
    return f"judge call to {where} failed: {type(exc).__name__}: {exc}"


def refused(exc: Exception) -> bool:
    """A request the server will refuse however often it is sent: a 4xx other than 401/403 (the key), 404 (no such
    model or route: every request would get it), 408 and 409 (retried by the client) and 429 (rate limits): e.g.
    400 for a prompt longer than its context."""
    import openai

    return (isinstance(exc, openai.APIStatusError) and 400 <= exc.status_code < 500
            and exc.status_code not in (401, 403, 404, 408, 409, 429))  # 404: a wrong model or path, for every request


def keep(cache: "JudgmentCache", key: str, judge_name: str, reply: Reply, read=None) -> None:
    """Cache a reply that holds a verdict (read by `read`, raw -> verdicts.Reading; None: parse_verdict); an
    unreadable one (invalid) or a refusal is asked again next run, after the requests never asked
    (JudgmentCache.asked), so a --max-calls budget is not spent on them first."""
    verdict = read(reply.raw).verdict if read is not None else parse_verdict(reply.raw)
    if reply.error is None and verdict != "invalid":
        cache.put(key, judge_name, reply)
    else:
        cache.mark_asked(key, judge_name)


def request_record(row: dict, order: str, first: int, second: int, rendered, judge: str, **extra) -> dict:
    """One judgment to make, as both judges build it: the comparison row's metadata, which role is shown first, the
    rendered messages, whether a text was cut, and the content key."""
    return {"pair_id": row["pair_id"], "split": row["split"], "comparison": row["comparison"], "order": order,
            "shown_first": row["roles"][first], "shown_second": row["roles"][second], "messages": rendered.messages,
            "truncated": rendered.truncated,
            "has_reference": bool(row.get("reference") or row.get("reference_in_prompt")),
            **({"turn": row["turn"]} if "turn" in row else {}), **extra,
            "key": request_key(judge, rendered.messages)}


def plan_calls(keys: list[str], cache: "JudgmentCache", max_calls: int | None, unit: str = "calls",
               kind: type = Outcome):
    """The budget and cache part every judge shares: (outcome holding the cached replies, the keys to make now).
    Keys never asked go before keys asked before without a verdict; the budget cuts the rest, and the outcome says
    so (stopped, pending)."""
    outcome = kind(replies=cache.get_many(keys))
    todo = [key for key in keys if key not in outcome.replies]
    again = cache.asked(todo)
    todo = [key for key in todo if key not in again] + [key for key in todo if key in again]  # never asked first
    allowed = todo if max_calls is None else todo[:max_calls]
    outcome.pending = len(todo) - len(allowed)
    if outcome.pending:
        outcome.stopped = (f"the budget of {max_calls} {unit} (--max-calls) does not cover the "
                           f"{len(todo)} judgments still to make")
    return outcome, allowed


def run_calls(judge: ChatJudge, requests: dict[str, list[dict]], cache: JudgmentCache, judge_name: str, *,
              max_calls: int | None, concurrency: int) -> Outcome:
    """Replies to every request (key -> messages): cached ones read, the rest called with at most
    `concurrency` in flight and at most `max_calls` calls; each reply with a verdict is cached as it arrives,
    so a stop (the budget, a call that failed after its retries, an interrupt) keeps everything made so far,
    replies that finish while the pool shuts down included. A refused request (`refused`) becomes a Reply with
    `error` set, and the run goes on."""
    outcome, allowed = plan_calls(list(requests), cache, max_calls)
    log.info("judge %s: %d cached, %d to call now, %d over budget", judge_name, len(outcome.replies),
             len(allowed), outcome.pending)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge")
    queue, running, submitting = iter(allowed), {}, True

    refusals = []

    def take(future, key) -> None:
        nonlocal submitting
        try:
            reply = future.result()
        except Exception as exc:  # openai raises one of several types once its retries are spent
            if not refused(exc):
                outcome.failure = outcome.failure or describe_failure(exc, judge.spec)
                submitting = False  # the calls in flight finish and are kept
                return
            reply = Reply("", None, None, None, 0.0, error=describe_failure(exc, judge.spec))
            refusals.append(reply.error)
            if len(refusals) >= REFUSALS_TO_STOP and len(refusals) == outcome.calls + 1:
                # every call so far refused: the server refuses this judge, not these prompts
                outcome.failure = outcome.failure or (f"the first {len(refusals)} requests were all refused "
                                                      f"({reply.error})")
                submitting = False
        keep(cache, key, judge_name, reply, reader(judge.spec))
        outcome.replies[key] = reply
        outcome.calls += 1

    try:
        while True:
            while submitting and len(running) < concurrency:
                key = next(queue, None)
                if key is None:
                    submitting = False
                else:
                    running[pool.submit(judge.call, requests[key])] = key
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                take(future, running.pop(future))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: the calls in flight finish here
        for future, key in list(running.items()):  # ... and their paid replies are kept
            if future.done() and not future.cancelled():
                take(future, key)
            running.pop(future, None)
    outcome.pending = sum(key not in outcome.replies for key in requests)
    return outcome

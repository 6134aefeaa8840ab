"""A scripted OpenAI-compatible judge: a real HTTP server on 127.0.0.1 (http.server, in a thread) that answers
`POST /v1/chat/completions` by a rule the test knows, so every judge statistic can be asserted exactly through
`dpo-eval judge` and the flows (stories260k behind `transformers serve` answers at chance).

A rule takes the two answers as shown (A first, B second) and the whole user message, and returns the reply text,
or an int (an HTTP status to answer with an error body). The answers are read back from the project's default
judge template ("[Answer A]\n...\n\n[Answer B]\n...\n\nWhich answer is better?").
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

ANSWERS = re.compile(r"\[Answer A\]\n(?P<a>.*)\n\n\[Answer B\]\n(?P<b>.*)\n\nWhich answer is better\?", re.S)
Rule = Callable[[str, str, str], "str | int"]


def marker_rule(marker: str = "GOOD") -> Rule:
    """[[A]] when only answer A holds `marker`, [[B]] when only B does, else [[tie]]: a judge that is right
    wherever the test planted the marker, and blind to position."""
    def rule(a: str, b: str, user: str) -> str:
        if (marker in a) != (marker in b):
            return "[[A]]" if marker in a else "[[B]]"
        return "[[tie]]"
    return rule


def always(text: str) -> Rule:
    """The same reply to every request: "[[A]]" is a judge that always picks the first answer, prose is invalid."""
    return lambda a, b, user: text


def longer_rule() -> Rule:
    """[[A]] when answer A is longer (characters), [[B]] when B is, [[tie]] when equal."""
    return lambda a, b, user: "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[tie]]"


def reasoned(rule: Rule) -> Rule:
    """`rule`'s verdict after a one-line rationale the test can find again (rationale_of), as a reasoned judge replies;
    a three-level tie ([[tie]]) is written [[C]], as the reasoned template asks."""
    def wrapped(a: str, b: str, user: str) -> "str | int":
        verdict = rule(a, b, user)
        if isinstance(verdict, int):
            return verdict
        return f"{rationale_of(a, b)}\n\n{verdict.replace('[[tie]]', '[[C]]')}"
    return wrapped


def rationale_of(a: str, b: str) -> str:
    """The rationale `reasoned` writes for answers a (shown first) and b."""
    return f"Rationale: answer A opens with {a.split()[0] if a.split() else '-'!r}, answer B with " \
           f"{b.split()[0] if b.split() else '-'!r}."


def five_level_rule(marker: str = "GOOD", strong: str = "STRONG") -> Rule:
    """Five-level verdicts: the answer holding `marker` (alone) wins, strongly ([[A>>B]], [[B>>A]]) when it also holds
    `strong`, else plainly ([[A>B]], [[B>A]]); [[A=B]] when both or neither hold the marker."""
    def rule(a: str, b: str, user: str) -> str:
        if (marker in a) == (marker in b):
            return "[[A=B]]"
        win, lose = ("A", "B") if marker in a else ("B", "A")
        return f"[[{win}>>{lose}]]" if strong in (a if win == "A" else b) else f"[[{win}>{lose}]]"
    return rule


def flaky_rule(rule: Rule, marker: str = "FLAKY") -> Rule:
    """`rule`, except that a request whose answers hold `marker` gets the other verdict ([[A]] <-> [[B]], a tie
    becomes [[A]]) each second time the same two answers are asked (the 2nd, 4th, ... asking): a judge whose verdict
    changes across repeats on a known subset of judgments and whose majority over 3 repeats is `rule`'s."""
    counts: dict[tuple[str, str], int] = {}
    lock = threading.Lock()
    flip = {"[[A]]": "[[B]]", "[[B]]": "[[A]]", "[[tie]]": "[[A]]"}

    def counted(a: str, b: str, user: str) -> "str | int":
        reply = rule(a, b, user)
        if marker not in a + b:
            return reply
        with lock:
            counts[(a, b)] = counts.get((a, b), 0) + 1
            asked = counts[(a, b)]
        return flip.get(reply, reply) if asked % 2 == 0 else reply
    return counted


class ScriptedJudge:
    """`with ScriptedJudge(rule) as judge:` serves at judge.url (…/v1); judge.requests counts the completions asked
    for, judge.seen keeps (a, b) of each, `delay_s` holds every reply that long, and `on_request(n)` is called
    with the request's number (1, 2, ...) as it arrives."""

    def __init__(self, rule: Rule, delay_s: float = 0.0, model: str = "scripted-judge",
                 on_request: Callable[[int], None] | None = None):
        self.rule, self.delay_s, self.model, self.on_request = rule, delay_s, model, on_request
        self.requests = 0
        self.seen: list[tuple[str, str]] = []
        self.messages: list[list[dict]] = []  # each request's messages, as sent
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the test reads counts, not logs
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                user = next((m["content"] for m in reversed(body.get("messages", [])) if m["role"] == "user"), "")
                found = ANSWERS.search(user)
                a, b = (found.group("a"), found.group("b")) if found else ("", "")
                with owner._lock:
                    owner.requests += 1
                    owner.seen.append((a, b))
                    owner.messages.append(body.get("messages", []))
                    number = owner.requests
                if owner.on_request is not None:
                    owner.on_request(number)
                if owner.delay_s:
                    time.sleep(owner.delay_s)
                reply = owner.rule(a, b, user)
                if isinstance(reply, int):
                    return self._send(reply, {"error": {"message": f"scripted refusal ({reply}): prompt of "
                                                                   f"{len(user)} characters", "type": "invalid_request"}})
                self._send(200, {
                    "id": f"scripted-{owner.requests}", "object": "chat.completion", "created": 0,
                    "model": body.get("model", owner.model),
                    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                 "message": {"role": "assistant", "content": reply}}],
                    "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": max(1, len(reply) // 4),
                              "total_tokens": len(user) // 4 + max(1, len(reply) // 4)}})

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "ScriptedJudge":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def judge_output(out: str) -> dict:
    """`dpo-eval judge`'s printed judge block (a JSON object), checked to be followed by the run's four answers."""
    block, end = json.JSONDecoder().raw_decode(out)
    tail = out[end:].strip().splitlines()
    assert [line.split("?")[0] for line in tail[:4]] == ["Did the alignment take", "Is the tuned model better than "
                                                         "its base", "Did it forget", "Could the gain be gaming"], tail
    return block

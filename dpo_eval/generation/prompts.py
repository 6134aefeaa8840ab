"""Render and tokenize prompts: chat template (or a plain format), exactly one BOS, left truncation.

Generation and the log-probability passes share this, so a prompt is formatted the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
import jinja2.meta

from dpo_eval.data.formats import transcript
from dpo_eval.errors import DpoEvalError

PLAIN_TEMPLATE = "{% if system %}{{ system }}\n\n{% endif %}{{ prompt }}\n\n"


def compile_prompt_template(text: str) -> jinja2.Template:
    """`text` as a Jinja template of `system` and `prompt`; a DpoEvalError naming --prompt-template when it
    does not parse, uses a variable it is never given, ignores the prompt, or fails on a probe prompt."""
    env = jinja2.Environment()
    try:
        parsed = env.parse(text)
        template = env.from_string(parsed)  # compiling also finds unknown filters and tests
    except jinja2.TemplateSyntaxError as exc:
        raise DpoEvalError(f"--prompt-template: not a valid Jinja template (line {exc.lineno}: {exc.message}); "
                           "it takes {{ system }} and {{ prompt }}, e.g. " + repr(PLAIN_TEMPLATE)) from exc
    names = jinja2.meta.find_undeclared_variables(parsed) - set(env.globals)
    unknown = sorted(names - {"system", "prompt"})
    if unknown:
        raise DpoEvalError(f"--prompt-template uses {unknown}, but a prompt template is given only "
                           "{{ system }} and {{ prompt }}")
    if "prompt" not in names:
        raise DpoEvalError("--prompt-template never uses {{ prompt }}: every model would see the same text")
    try:
        template.render(system="probe system", prompt="probe prompt")
    except Exception as exc:  # any runtime failure of the user's template (a bad call, a type error)
        raise DpoEvalError(f"--prompt-template fails to render ({type(exc).__name__}: {exc})") from exc
    return template


@dataclass
class EncodedPrompt:
    ids: list[int]
    truncated: bool


class PromptFormatter:
    """Turns pairs rows into token ids; records each repair it makes once, with counts."""

    def __init__(self, tokenizer, prompt_template: str | None = None, repairs: list[str] | None = None):
        self.tokenizer = tokenizer
        self.repairs = repairs if repairs is not None else []
        self.template = compile_prompt_template(prompt_template) if prompt_template else None
        self.use_chat = self.template is None and bool(getattr(tokenizer, "chat_template", None))
        if self.template is None and not self.use_chat:
            self.template = jinja2.Template(PLAIN_TEMPLATE)
            self._note("tokenizer has no chat template: plain prompt format "
                       f"{PLAIN_TEMPLATE!r} (override with --prompt-template)")
        self.fold_system = False
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos = bos if bos is not None and probe[:1] == [bos] else None
        self.counts = {"added_bos": 0, "removed_bos": 0, "template_bos": 0, "truncated": 0}

    def _note(self, message: str) -> None:
        if message not in self.repairs:
            self.repairs.append(message)

    def render(self, system: str, messages: list[dict]) -> str:
        """The prompt text: the chat template with a generation prompt, or the plain template."""
        if not self.use_chat:
            prompt = messages[-1]["content"] if len(messages) == 1 else transcript((m["role"], m["content"]) for m in messages)
            return self.template.render(system=system or "", prompt=prompt)
        if system and self.fold_system:
            return self._apply_chat(_fold(system, messages))
        chat = ([{"role": "system", "content": system}] if system else []) + messages
        try:
            return self._apply_chat(chat)
        except DpoEvalError as error:
            if not system:
                raise
            failure = error
        # A template that fails with a system turn and works without one rejects the system role
        # (Mistral-Instruct's): fold it. One that fails either way is broken: report its own failure.
        try:
            text = self._apply_chat(_fold(system, messages))
        except DpoEvalError:
            raise failure from failure.__cause__
        self.fold_system = True
        self._note("chat template rejects the system role: system prompt folded into the first user turn")
        return text

    def _apply_chat(self, chat: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates signal errors with any type (raise_exception, TypeError, ...)
            raise self._template_error(exc) from exc

    def _template_error(self, exc: Exception) -> DpoEvalError:
        name = getattr(self.tokenizer, "name_or_path", "") or "the tokenizer"
        return DpoEvalError(f"the chat template of {name} fails ({type(exc).__name__}: {exc}); fix the "
                            "template in its tokenizer_config.json / chat_template.jinja, or pass --prompt-template")

    def encode(self, text: str, max_tokens: int) -> EncodedPrompt:
        """Token ids with exactly one leading BOS (when the model uses one), cut from the left to fit."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.bos is not None:
            leading = 0
            while leading < len(ids) and ids[leading] == self.bos:
                leading += 1
            if leading == 0 and self.use_chat:
                self.counts["added_bos"] += 1
            elif leading == 1 and self.use_chat:
                self.counts["template_bos"] += 1
            elif leading > 1:
                self.counts["removed_bos"] += 1
            ids = [self.bos] + ids[leading:]
        truncated = len(ids) > max_tokens
        if truncated:
            keep = max_tokens - (1 if self.bos is not None else 0)
            ids = ([self.bos] if self.bos is not None else []) + ids[len(ids) - keep:]
            self.counts["truncated"] += 1
        return EncodedPrompt(ids, truncated)

    def record_counts(self, max_tokens: int) -> None:
        """Put the per-prompt repairs into `repairs` (once, with their counts)."""
        if self.counts["added_bos"]:
            self._note("BOS added to chat-template prompts that lacked it")
        if self.counts["template_bos"]:
            self._note("chat template renders the BOS itself: prompts tokenized without special tokens, "
                       "so there is no second BOS")
        if self.counts["removed_bos"]:
            self._note("duplicate BOS removed from prompts that had two")
        if self.counts["truncated"]:
            self._note(f"prompts longer than {max_tokens} tokens (context minus max_new_tokens) truncated "
                       "from the left and flagged (answers.parquet: truncated)")


def training_prompt(formatter: PromptFormatter, system: str, turns: list[dict]) -> str:
    """The prompt text as DPO training sees it: rendered as for generation, without a leading BOS text
    (trl tokenizes prompts with special tokens, so a rendered BOS would make two)."""
    text = formatter.render(system, turns)
    bos = formatter.tokenizer.bos_token or ""
    return text[len(bos):] if bos and text.startswith(bos) else text


def _fold(system: str, messages: list[dict]) -> list[dict]:
    out = [dict(m) for m in messages]
    for m in out:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            return out
    return [{"role": "user", "content": system}] + out

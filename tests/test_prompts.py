"""Prompt templates and chat templates: a broken one is reported as what it is."""

from __future__ import annotations

import jinja2
import pytest

from dpo_eval.errors import DpoEvalError
from dpo_eval.generation.prompts import PLAIN_TEMPLATE, PromptFormatter, compile_prompt_template
from tests.builders import MISTRAL_LIKE_TEMPLATE

USER = [{"role": "user", "content": "Tell me a story."}]
# A template with a bug of its own: it adds a number to every message's text, system or not.
BROKEN_TEMPLATE = "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}"


@pytest.fixture
def tokenizer(stories260k):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories260k)


def test_a_chat_template_that_fails_for_another_reason_is_reported_as_that_failure(tokenizer):
    tokenizer.chat_template = BROKEN_TEMPLATE
    formatter = PromptFormatter(tokenizer)
    with pytest.raises(DpoEvalError, match="chat template .* fails \\(TypeError") as raised:
        formatter.render("Be brief.", USER)
    assert "system role" not in str(raised.value)
    assert not formatter.fold_system and not any("system role" in r for r in formatter.repairs)
    with pytest.raises(DpoEvalError, match="TypeError"):
        formatter.render("", USER)


def test_a_chat_template_that_rejects_the_system_role_gets_it_folded(tokenizer):
    tokenizer.chat_template = MISTRAL_LIKE_TEMPLATE
    formatter = PromptFormatter(tokenizer)
    text = formatter.render("Be brief.", USER)
    assert "[INST] Be brief.\n\nTell me a story. [/INST]" in text
    assert any("rejects the system role" in r for r in formatter.repairs)


@pytest.mark.parametrize("template, message", [
    ("{% if system %}{{ prompt }}", "not a valid Jinja template \\(line 1"),
    ("{{ prompt | no_such_filter }}", "not a valid Jinja template"),
    ("{{ promt }}", "uses \\['promt'\\]"),
    ("{{ system }}", "never uses \\{\\{ prompt \\}\\}"),
    ("{{ prompt.no_such_method() }}", "fails to render"),
])
def test_a_malformed_prompt_template_names_the_option(template, message):
    with pytest.raises(DpoEvalError, match="--prompt-template") as raised:
        compile_prompt_template(template)
    assert raised.match(message)


def test_a_good_prompt_template_renders(tokenizer):
    # the same text as a plain jinja2.Template, so cached answers of an unchanged template stay valid
    assert compile_prompt_template(PLAIN_TEMPLATE).render(system="S", prompt="Hi") == \
        jinja2.Template(PLAIN_TEMPLATE).render(system="S", prompt="Hi")
    formatter = PromptFormatter(tokenizer, "Q: {{ prompt }}\nA:")
    assert formatter.render("", USER) == "Q: Tell me a story.\nA:"

"""The project's own judge templates beyond the verdict-only one: reasoned verdicts, five-level verdicts and
reference-guided judging (issue 23 §2), written in the spirit of MT-Bench's and Arena-Hard's judge prompts.

Each template renders the user message from `system`, `prompt`, `answer_a`, `answer_b` and `reference` (the pair's
reference answer, "" where it has none). With a reference the judge is told to check both answers against it
before anything else (MT-Bench's reference-guided grading, in the project's own words), and the reference sits
between the prompt and the answers; without one the same template shows no reference. The reasoned style asks for a
few sentences of justification and then the verdict alone on the last line; the verdict style asks for the verdict
only. `project_template` picks the source; a run whose settings are the old ones (verdict only, three levels, no
reference anywhere) keeps prompt.DEFAULT_TEMPLATE itself, so its judge identity and cached judgments stay.
"""

from __future__ import annotations

from dpo_eval.errors import DpoEvalError

from dpo_eval.judges.prompt import DEFAULT_TEMPLATE, JudgeTemplate, load_template

ROLE = ("You are an impartial judge. You compare two answers to the same user prompt and decide which one is more "
        "helpful, correct and appropriate. Ignore the order in which they are shown and their length.")
ROLE_WITH_REFERENCE = ("You are an impartial judge. You compare two answers to the same user prompt, and you are given "
                       "a reference answer known to be correct. Check each answer against the reference first: its "
                       "mistakes and omissions weigh more than its style. Ignore the order in which the answers are "
                       "shown and their length.")
CONTEXT = """\
{% if reference %}{% set judge_system = "ROLE_WITH_REFERENCE" %}{% else %}{% set judge_system = "ROLE" %}{% endif %}
{% if system %}[System prompt given to the assistant]
{{ system }}

{% endif %}[User prompt]
{{ prompt }}

{% if reference %}[Reference answer]
{{ reference }}

{% endif %}[Answer A]
{{ answer_a }}

[Answer B]
{{ answer_b }}

Which answer is better? """
LABELS = {3: "[[A]] if answer A is better, [[B]] if answer B is better, or [[C]] for a tie",
          5: "[[A>>B]] if answer A is much better, [[A>B]] if answer A is better, [[A=B]] if they are about equally "
             "good, [[B>A]] if answer B is better, or [[B>>A]] if answer B is much better"}
REASONED = ("First explain your judgment in a few sentences: {% if reference %}compare each answer with the reference "
            "answer and name its mistakes, {% endif %}say what each answer does well and where it fails the user. Do "
            "not let the order of the answers or their length sway you. Then write your verdict alone on the last "
            "line, exactly one of: LABELS.")
VERDICT_ONLY = {3: "{% if reference %}Judge them against the reference answer. {% endif %}Reply with the verdict "
                   "only: [[A]], [[B]] or [[tie]].",
                5: "{% if reference %}Judge them against the reference answer. {% endif %}Reply with the verdict only, "
                   "exactly one of: LABELS."}


def project_source(style: str, levels: int, with_reference: bool) -> str:
    """The project's template source for a judge style (verdict, reasoned), verdict levels (3, 5) and whether any
    pair of the run has a reference; DEFAULT_TEMPLATE for verdict, 3 levels, no reference."""
    if style == "verdict" and levels == 3 and not with_reference:
        return DEFAULT_TEMPLATE
    ask = REASONED if style == "reasoned" else VERDICT_ONLY[levels]
    head = CONTEXT.replace('"ROLE_WITH_REFERENCE"', f'"{ROLE_WITH_REFERENCE}"').replace('"ROLE"', f'"{ROLE}"')
    return head + ask.replace("LABELS", LABELS[levels])


def judge_template(spec, with_reference: bool) -> JudgeTemplate:
    """The user's template (spec.template) or the project's one for spec's style and levels (see project_source)."""
    if spec.template is not None:
        template = load_template(spec.template)
        if with_reference and spec.references is not None and not uses_reference(template):
            raise DpoEvalError(f"--template {spec.template} never shows `reference`, but --references "
                               f"{spec.references} gives reference answers: add {{{{ reference }}}} to the template "
                               "(empty where a pair has none), or drop --references")
        return template
    source = project_source(spec.judge_style, spec.verdict_levels, with_reference)
    if source == DEFAULT_TEMPLATE:
        return load_template()
    name = f"default ({spec.judge_style}, {spec.verdict_levels} levels{', reference-guided' if with_reference else ''})"
    return load_template(default=source, name=name)


def uses_reference(template: JudgeTemplate) -> bool:
    """Whether the template's source reads the `reference` variable (so a reference answer is shown)."""
    import jinja2
    from jinja2 import meta

    return "reference" in meta.find_undeclared_variables(jinja2.Environment().parse(template.source))

"""The `dpo-eval` command: a typer app over dpo_eval (core commands) and flows/ (Prefect commands).

It sits outside dpo_eval because its flow commands import flows/, and the core never does.
`dpo_eval_cli.app` registers every command in one place; `python -m dpo_eval` and the `dpo-eval`
console script both run `dpo_eval_cli.app.main`.
"""

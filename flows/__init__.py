"""Prefect flows (installed as dpo_eval.flows): thin bodies that wire tasks together.
May import: dpo_eval.tasks and the core; never dpo_eval.cli."""

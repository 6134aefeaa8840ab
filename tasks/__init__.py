"""Prefect tasks (installed as dpo_eval.tasks): thin wrappers over the core with retries and cache policies.
May import: the core; never dpo_eval.flows or dpo_eval.cli."""

"""The `dpo-eval` command: the only core part that may import dpo_eval.flows (and so Prefect).
May import: anything.
"""

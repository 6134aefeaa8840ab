"""The Prefect-free commands of `dpo-eval` (pairs, generate, analyze, diagnose, trend, judge, train-reward)
and the option helpers that take defaults and help from the pydantic specs.

The app that registers every command, and the commands that start flows, live in the orchestration
layer (flows/cli.py, flows/commands.py): nothing here imports flows/, tasks/ or Prefect.
"""

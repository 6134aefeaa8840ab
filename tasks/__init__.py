"""Prefect tasks: thin wrappers over dpo_eval with retries and cache policies."""

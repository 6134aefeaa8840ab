"""Load the base and adapter once; render prompts; generate with an engine; log-probabilities.
May import: the foundation and dpo_eval.data.
"""

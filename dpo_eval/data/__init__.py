"""Read any preference format into pairs, split them, mix data sets; the demo's own pairs.
May import: the foundation modules of dpo_eval (errors, config, identity, ...) only.
"""

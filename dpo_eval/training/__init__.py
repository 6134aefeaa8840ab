"""QLoRA DPO training with trl, and reward-model training, writing checkpoint metadata.
May import: the foundation, data, generation, judges, dpo_eval.preflight.
"""

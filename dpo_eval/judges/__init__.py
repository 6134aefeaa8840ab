"""Reward models and pairwise LLM judges (API and local), their calibration and statistics.
May import: the foundation, data, generation, scoring, stats and dpo_eval.stages; never report.
"""

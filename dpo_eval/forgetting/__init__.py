"""lm-evaluation-harness on base and tuned from one load; McNemar per task.
May import: the foundation, data, generation, stats.
"""

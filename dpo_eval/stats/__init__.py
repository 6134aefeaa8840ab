"""The paired tests of the study: deltas, Wilcoxon, BH, effect sizes, CIs, sign agreement.
May import: the foundation and dpo_eval.scoring (the feature list).
"""

from dpo_eval.scoring.features import FAMILIES, FAMILY_OF
from dpo_eval.scoring.scorer import feature_families


def test_static_families_match_textdescriptives():
    assert FAMILY_OF == feature_families()
    assert sum(len(v) for v in FAMILIES.values()) == 69

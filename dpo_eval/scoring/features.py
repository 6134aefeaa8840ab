"""The TextDescriptives features (en_core_web_sm) by family, for analysis and plots without spaCy.

tests/test_features.py checks this against what textdescriptives itself extracts.
"""

FAMILIES: dict[str, tuple[str, ...]] = {
    "descriptive_stats": (
        "token_length_mean", "token_length_median", "token_length_std", "sentence_length_mean",
        "sentence_length_median", "sentence_length_std", "syllables_per_token_mean",
        "syllables_per_token_median", "syllables_per_token_std", "n_tokens", "n_unique_tokens",
        "proportion_unique_tokens", "n_characters", "n_sentences",
    ),
    "readability": (
        "flesch_reading_ease", "flesch_kincaid_grade", "smog", "gunning_fog",
        "automated_readability_index", "coleman_liau_index", "lix", "rix",
    ),
    "dependency_distance": (
        "dependency_distance_mean", "dependency_distance_std",
        "prop_adjacent_dependency_relation_mean", "prop_adjacent_dependency_relation_std",
    ),
    "pos_proportions": (
        "pos_prop_ADJ", "pos_prop_ADP", "pos_prop_ADV", "pos_prop_AUX", "pos_prop_CCONJ",
        "pos_prop_DET", "pos_prop_INTJ", "pos_prop_NOUN", "pos_prop_NUM", "pos_prop_PART",
        "pos_prop_PRON", "pos_prop_PROPN", "pos_prop_PUNCT", "pos_prop_SCONJ", "pos_prop_SYM",
        "pos_prop_VERB", "pos_prop_X",
    ),
    "coherence": (
        "first_order_coherence", "second_order_coherence",
    ),
    "information_theory": (
        "entropy", "perplexity", "per_word_perplexity",
    ),
    "quality": (
        "passed_quality_check", "n_stop_words", "alpha_ratio", "mean_word_length", "doc_length",
        "symbol_to_word_ratio_#", "proportion_ellipsis", "proportion_bullet_points",
        "contains_lorem ipsum", "duplicate_line_chr_fraction", "duplicate_paragraph_chr_fraction",
        "duplicate_ngram_chr_fraction_5", "duplicate_ngram_chr_fraction_6",
        "duplicate_ngram_chr_fraction_7", "duplicate_ngram_chr_fraction_8",
        "duplicate_ngram_chr_fraction_9", "duplicate_ngram_chr_fraction_10",
        "top_ngram_chr_fraction_2", "top_ngram_chr_fraction_3", "top_ngram_chr_fraction_4",
        "oov_ratio",
    ),
}
FAMILY_OF: dict[str, str] = {name: family for family, names in FAMILIES.items() for name in names}
LENGTH_FEATURE = "n_tokens"

# Features that judges add beside the TextDescriptives ones (not scored by spaCy).
JUDGE_FAMILIES: dict[str, tuple[str, ...]] = {"reward_model": ("reward_model",)}
FEATURE_FAMILY: dict[str, str] = FAMILY_OF | {n: f for f, names in JUDGE_FAMILIES.items() for n in names}

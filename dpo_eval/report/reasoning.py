"""The report's words on reasoned, five-level and reference-guided verdicts (issue 23 §2): what the judge was asked,
the weighted win rate beside the plain one, how many verdicts had a reference answer, and the judge's
justifications beside the judged examples."""

from __future__ import annotations

import polars as pl

from dpo_eval.jsonsafe import finite

RATIONALE_CHARS = 400  # characters of each justification shown beside an example


def _f(x) -> str:
    return f"{x:.2f}" if finite(x) else "n/a"


def reasoning_sentences(block: dict, judgments: pl.DataFrame) -> list[str]:
    """Paragraphs for the judge section: the style, the weighted win rate per split and the references."""
    said = []
    if block.get("judge_style") == "reasoned":
        said.append(f"The judge was asked to justify each verdict before giving it (judge style reasoned, replies "
                    f"of at most {block.get('max_tokens')} tokens); its justifications are kept per judgment "
                    "(judgments.parquet `rationale`) and shown beside the examples below. A reply whose last line "
                    "holds no verdict is invalid.")
    if block.get("verdict_levels") == 5:
        for split, blocks in (block.get("splits") or {}).items():
            tb = blocks.get("tuned_vs_base") or {}
            if "weighted_win_rate" not in tb:
                continue
            said.append(f"Five-level verdicts on {split}: the win rate {_f(tb.get('win_rate'))} counts each verdict "
                        f"once whatever its strength; weighted win rate {_f(tb['weighted_win_rate'])} "
                        f"[{_f(tb.get('weighted_ci_low'))}, {_f(tb.get('weighted_ci_high'))}] over "
                        f"{tb.get('weighted_games')} per-order verdicts, {tb.get('strong_verdicts')} of them strong "
                        f"({tb.get('weighting')}).")
    refs = block.get("references") or {}
    if refs.get("judgments"):
        said.append(f"Reference-guided: {refs['judgments']} of {refs.get('of')} verdicts ({refs.get('pairs')} pairs) "
                    f"were made with a reference answer in front of the judge (from {refs.get('source')}); the "
                    "others without one (judgments.parquet `has_reference`).")
    return said


def _cut(text, limit: int = RATIONALE_CHARS) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit].rstrip() + " [...]"


def with_rationales(headers: list[str], rows: list[list], judgments: pl.DataFrame) -> tuple[list[str], list[list]]:
    """The examples table with a column of the judge's justifications (A first | B first) where any judgment has one
    (rows hold comparison first and pair_id third); unchanged otherwise."""
    if "rationale" not in judgments.columns or judgments["rationale"].drop_nulls().len() == 0:
        return headers, rows
    said = {(r["pair_id"], r["comparison"], r["order"]): r["rationale"] for r in
            judgments.select("pair_id", "comparison", "order", "rationale").iter_rows(named=True)}
    cells = [" | ".join(f"{'A' if o == 'ab' else 'B'} first: {_cut(said.get((row[2], row[0], o))) or '(none)'}"
                        for o in ("ab", "ba")) for row in rows]
    return headers + ["judge's justification (A first | B first)"], [row + [cell] for row, cell in zip(rows, cells)]

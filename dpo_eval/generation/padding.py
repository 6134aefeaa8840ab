"""Left padding for batched generation: torch only, so GPU benchmarks import it without the data stack."""

from __future__ import annotations


def left_padded(prompts: list[list[int]], pad: int):
    """(input_ids, attention_mask) of prompts padded on the left to the longest, for generation."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask

"""Left padding for batched generation: torch only, so GPU benchmarks import it without the data stack."""

from __future__ import annotations


def left_padded(prompts: list[list[int]], pad: int, width: int | None = None):
    """(input_ids, attention_mask) of prompts padded on the left to the longest (or to `width`), for generation."""
    import torch

    width = width or max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def right_padded(rows: list[tuple[list[int], int]], pad: int):
    """(input_ids, attention_mask, answer_mask) of right-padded (ids, n_prompt_tokens) rows; the answer
    mask marks the answer tokens, so `answer[:, 1:]` marks the logits positions that predict them."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    answer = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
        answer[i, n_prompt:len(ids)] = True
    return input_ids, mask, answer

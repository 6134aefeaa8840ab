"""How many prompts one generate() call takes: planned from free GPU memory and the model's shape.

The rule (used when the user sets no --batch-size): on a GPU, after the model is loaded,

    batch = floor(headroom x (free memory - weights still to load) / bytes per sequence), 1 <= batch <= 256

where one sequence of the batch costs its KV cache for the longest prompt plus max_new_tokens,
`layers x kv_heads x head_dim x 2 (K and V) x dtype bytes` per token, plus the prefill's working
memory for that prompt (hidden states and the MLP's intermediate activations, a few at a time) and its
float32 logits over the vocabulary. headroom (0.8) leaves room for the allocator's fragmentation and
kernels' workspaces. On the CPU it is 16, as before. The out-of-memory halving stays the safety net.
"""

from __future__ import annotations

from dataclasses import dataclass

CPU_BATCH = 16
MAX_BATCH = 256
HEADROOM = 0.8


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int


def model_shape(config, dtype_bytes: int) -> ModelShape:
    """The shape of a transformers causal LM config (its text part for a multimodal one)."""
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    hidden = config.hidden_size
    return ModelShape(layers=config.num_hidden_layers, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                      head_dim=getattr(config, "head_dim", None) or hidden // heads, hidden=hidden,
                      intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
                      vocab=config.vocab_size, dtype_bytes=dtype_bytes)


def kv_bytes_per_token(shape: ModelShape) -> int:
    """KV cache bytes of one token: layers x kv heads x head dim x 2 (K and V) x dtype bytes."""
    return shape.layers * shape.kv_heads * shape.head_dim * 2 * shape.dtype_bytes


def sequence_bytes(shape: ModelShape, longest_prompt: int, max_new_tokens: int) -> int:
    """Memory one sequence of a batch needs: its KV cache at full length, the prefill's working memory
    (4 hidden-sized and 2 intermediate-sized activations per prompt token) and 2 float32 logit rows."""
    kv = kv_bytes_per_token(shape) * (longest_prompt + max_new_tokens)
    prefill = longest_prompt * (4 * shape.hidden + 2 * shape.intermediate) * shape.dtype_bytes
    return kv + prefill + 2 * shape.vocab * 4


def plan_batch_size(free_bytes: int, per_sequence: int, *, weights_bytes: int = 0, headroom: float = HEADROOM,
                    max_batch: int = MAX_BATCH) -> int:
    """The largest batch whose sequences fit `headroom` of the free memory left after `weights_bytes`
    (weights not yet loaded; 0 when `free_bytes` was measured after loading), between 1 and `max_batch`.
    Monotone in `free_bytes`; batch x per_sequence never exceeds the budget unless the answer is 1."""
    budget = max(0.0, (free_bytes - weights_bytes) * headroom)
    return max(1, min(max_batch, int(budget // max(1, per_sequence))))


def halved(batch: int, halvings: int) -> int:
    """`batch` halved `halvings` times (one per retry after an out-of-memory error), at least 1."""
    return max(1, batch >> max(0, halvings))


def resolve_batch_size(model, prompts: list[list[int]], batch_size: int | None, max_new_tokens: int) -> int:
    """The user's batch size; else on a GPU the plan from its free memory now, else CPU_BATCH."""
    if batch_size is not None:
        return batch_size
    import torch

    embeddings = model.get_input_embeddings().weight  # in the compute dtype, also in a 4-bit model
    if embeddings.device.type != "cuda" or not prompts:
        return CPU_BATCH
    free, _ = torch.cuda.mem_get_info(embeddings.device)
    shape = model_shape(model.config, embeddings.dtype.itemsize)
    return plan_batch_size(free, sequence_bytes(shape, max(len(p) for p in prompts), max_new_tokens))

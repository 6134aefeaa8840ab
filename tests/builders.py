"""Tiny real models and adapters that tests build: no downloads, no mocks."""

from __future__ import annotations

import shutil
from pathlib import Path

# Mistral-Instruct's template raises on a system role; this one does the same, in its shape.
MISTRAL_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def tiny_mistral(folder: Path, stories: Path, hidden: int = 96, seed: int = 0) -> Path:
    """A randomly initialised Mistral-shaped model with stories260k's tokenizer, a system-rejecting
    chat template and right padding (both for the loader to repair)."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    model = MistralForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(stories)
    tokenizer.chat_template = MISTRAL_LIKE_TEMPLATE
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(folder)
    return folder


def make_adapter(base: Path, folder: Path, zero: bool = True, seed: int = 0, r: int = 4,
                 targets: tuple[str, ...] = ("q_proj", "v_proj"), b_std: float = 0.5) -> Path:
    """A LoRA adapter for `base`: peft's default init (B = 0) or random non-zero A and B (B ~ N(0, b_std))."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type="CAUSAL_LM",
                        init_lora_weights=True if zero else False)
    peft_model = get_peft_model(model, config)
    if not zero:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, b_std)
    peft_model.save_pretrained(folder)
    return folder


def copy_model(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder

"""Small helpers shared by everything that prompts a model."""

from __future__ import annotations

import torch


def chat_input_ids(tokenizer, prompt: str, system: str | None = None) -> torch.Tensor:
    """Token ids (1, T) of a single-turn chat prompt, with the generation prompt appended."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        return encoded if torch.is_tensor(encoded) else encoded["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids

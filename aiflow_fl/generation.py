"""Small helpers shared by everything that prompts a model."""

from __future__ import annotations

import torch


def chat_template_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, with the generation prompt
    appended (the caller decides what a tokenizer without a template gets)."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded  # a BatchEncoding in newer transformers
    return [int(i) for i in (ids[0] if ids and isinstance(ids[0], list) else ids)]


def chat_input_ids(tokenizer, prompt: str, system: str | None = None) -> torch.Tensor:
    """Token ids (1, T) of a single-turn chat prompt, with the generation prompt appended."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return torch.tensor([chat_template_ids(tokenizer, messages)], dtype=torch.long)
    return tokenizer(prompt, return_tensors="pt").input_ids

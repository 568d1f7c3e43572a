"""Smoke benchmark: load the embedded default, ask one question greedily, time it.

Figures: ``model``, ``layers``, ``answer_ok`` (the answer mentions Paris), ``tokens_per_s`` (greedy
decoding with the KV cache, first token included), ``load_s`` (from the safetensors cache; the very
first call also dequantizes the GGUF, ~20 s).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from aiflow_fl.generation import chat_input_ids
from aiflow_fl.models import DEFAULT_MODEL, load_backbone

QUESTION = "What is the capital of France?"


def run(quick: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    loaded = load_backbone(DEFAULT_MODEL)
    model, tok = loaded.model, loaded.tokenizer
    ids = chat_input_ids(tok, QUESTION)
    max_new = 24 if quick else 64
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False)
    elapsed = time.perf_counter() - start
    new_tokens = out.shape[1] - ids.shape[1]
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    result = {
        "model": DEFAULT_MODEL,
        "layers": model.config.num_hidden_layers,
        "answer_ok": "paris" in answer.lower(),
        "tokens_per_s": round(new_tokens / elapsed, 2),
        "load_s": round(loaded.load_s, 2),
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
    }
    table = Table(title="smoke: embedded default model")
    table.add_column("figure")
    table.add_column("value")
    for key, value in result.items():
        table.add_row(key, str(value))
    table.add_row("answer", answer.strip())
    Console().print(table)
    return result

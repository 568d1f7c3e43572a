"""Shared fixtures: tiny random Llama/Qwen2 models driven by the real SmolLM2 tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tokenizer():
    from aiflow_fl.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(params=["llama", "qwen2"])
def tiny(request):
    from aiflow_fl.models import tiny_model

    return tiny_model(request.param, num_layers=4)

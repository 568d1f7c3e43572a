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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved with the real tokenizer: a model folder that Flower client processes
    (Ray actors, SuperNodes' app processes) load by path through ``model.name``."""
    from aiflow_fl.models import tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", num_layers=4).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of many small ops: two threads run them several times slower
    here (thread hand-off costs more than the op); use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

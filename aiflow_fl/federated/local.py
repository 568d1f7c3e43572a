"""The local training loop of a device and held-out evaluation: small functions with clear hooks.

``train_local`` runs ``steps`` optimizer steps of next-token cross-entropy on the batches it is given.
What varies between setups is injected, not hard-coded, so privacy (DP-SGD with Opacus) and continual
learning (data stages, replay) plug in without touching the loop:

* :class:`TrainingHooks.make_optimizer` — builds the optimizer over the trainable (LoRA) parameters;
* :class:`TrainingHooks.prepare` — may wrap model/optimizer/batches (e.g. an Opacus PrivacyEngine);
* :class:`TrainingHooks.round_data` — picks the chunks this round trains on (e.g. a continual stage
  plus a replay buffer); the default is the device's whole training partition;
* :class:`TrainingHooks.after_round` — sees the finished round (e.g. reads ε from the accountant into
  the metrics); persistent objects belong in the client's ``context.state``.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from aiflow_fl.data.sources import TokenChunks


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def default_optimizer(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


@dataclass
class TrainingHooks:
    """Points where privacy and continual learning plug into local training (see module doc)."""

    make_optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer] = default_optimizer
    prepare: Callable[[nn.Module, torch.optim.Optimizer, Iterable[torch.Tensor]],
                      tuple[nn.Module, torch.optim.Optimizer, Iterable[torch.Tensor]]] | None = None
    round_data: Callable[[TokenChunks, int], TokenChunks] | None = None  # (partition, server round) -> chunks
    after_round: Callable[["TrainResult"], dict[str, float]] | None = None  # extra metrics


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """Flat float metrics for a Flower MetricRecord."""
        out = {
            "train-loss": float(np.mean(self.losses)) if self.losses else float("nan"),
            "train-loss-first": self.losses[0] if self.losses else float("nan"),
            "train-loss-last": self.losses[-1] if self.losses else float("nan"),
            "train-steps": float(self.steps),
            "train-tokens": float(self.tokens),
            "train-time-s": self.seconds,
            "tokens-per-s": self.tokens_per_s,
            "peak-rss-mb": self.peak_rss_mb,
        }
        out.update(self.extra)
        return out


def round_batches(num_chunks: int, batch_size: int, steps: int, cursor: int, seed: int) -> tuple[list[list[int]], int]:
    """Row indices of ``steps`` batches, continuing an epoch-wise shuffled stream at ``cursor``.

    The stream is a fixed sequence of permutations (epoch e shuffled with ``seed + e``), so a device
    that keeps ``cursor`` across rounds walks through all its data before repeating any of it.
    """
    batch_size = max(1, min(batch_size, num_chunks))
    batches = []
    for _ in range(steps):
        rows = []
        while len(rows) < batch_size:
            epoch, offset = divmod(cursor, num_chunks)
            perm = np.random.default_rng(seed + epoch).permutation(num_chunks)
            take = min(batch_size - len(rows), num_chunks - offset)
            rows += perm[offset:offset + take].tolist()
            cursor += take
        batches.append(rows)
    return batches, cursor


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (transformers shifts the labels)."""
    return model(input_ids=input_ids, labels=input_ids).loss


def train_local(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float = 1.0,
) -> TrainResult:
    """One optimizer step per batch of token ids (B, T); returns per-step losses and throughput."""
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses, tokens = [], 0
    start = time.perf_counter()
    for ids in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model, ids)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"local training loss became {loss.item()} at step {len(losses)}")
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        tokens += ids.numel()
    model.eval()
    return TrainResult(steps=len(losses), tokens=tokens, seconds=time.perf_counter() - start,
                       losses=losses, peak_rss_mb=peak_rss_mb())


@torch.no_grad()
def evaluate_chunks(model: nn.Module, chunks: TokenChunks, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Per held-out chunk: summed next-token NLL (``nll``), correct top-1 predictions (``correct``) and
    predicted tokens (``tokens``) — what :func:`aiflow_fl.stats.paired_bootstrap_delta` resamples."""
    model.eval()
    nll, correct, tokens = [], [], []
    for start in range(0, len(chunks), batch_size):
        ids = chunks.input_ids[start:start + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, T-1)
        nll.append(losses.sum(1).double())
        correct.append((logits.argmax(-1) == target).sum(1))
        tokens.append(torch.full((ids.shape[0],), target.shape[1]))
    if not nll:
        return {"nll": np.zeros(0), "correct": np.zeros(0), "tokens": np.zeros(0)}
    return {"nll": torch.cat(nll).numpy(), "correct": torch.cat(correct).numpy().astype(np.float64),
            "tokens": torch.cat(tokens).numpy().astype(np.float64)}


def summarize_chunks(per_chunk: dict[str, np.ndarray]) -> dict[str, float]:
    """Held-out mean next-token loss (per token), perplexity and top-1 accuracy from per-chunk sums."""
    count = float(per_chunk["tokens"].sum())
    if count == 0:
        return {"eval-loss": float("nan"), "eval-accuracy": float("nan"), "eval-tokens": 0.0, "eval-ppl": float("nan")}
    loss = float(per_chunk["nll"].sum()) / count
    return {"eval-loss": loss, "eval-accuracy": float(per_chunk["correct"].sum()) / count, "eval-tokens": count,
            "eval-ppl": math.exp(min(loss, 50.0))}


def evaluate(model: nn.Module, chunks: TokenChunks, batch_size: int = 8) -> dict[str, float]:
    """Held-out mean next-token loss (per token), perplexity and top-1 next-token accuracy."""
    return summarize_chunks(evaluate_chunks(model, chunks, batch_size))


def optimizer_state_arrays(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, np.ndarray]:
    """AdamW moments and step count per named parameter, to keep in ``context.state`` across rounds."""
    out: dict[str, np.ndarray] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    out[f"{names[id(p)]}::{key}"] = value.detach().cpu().numpy().copy()
    return out


def restore_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str], arrays: dict[str, np.ndarray]) -> int:
    """Put saved moments back for every parameter whose name and shape match; returns how many."""
    restored = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            entries = {k.split("::", 1)[1]: v for k, v in arrays.items() if k.split("::", 1)[0] == name}
            if not entries or any(k != "step" and v.shape != tuple(p.shape) for k, v in entries.items()):
                continue
            optimizer.state[p] = {k: torch.from_numpy(v.copy()) for k, v in entries.items()}
            restored += 1
    return restored


def batch_tensors(chunks: TokenChunks, index_batches: list[list[int]]) -> Iterator[torch.Tensor]:
    for rows in index_batches:
        yield chunks.input_ids[torch.as_tensor(rows, dtype=torch.long)]

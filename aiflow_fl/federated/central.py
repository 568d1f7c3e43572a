"""Central evaluation on the server: every member of the federation, with the global update folded in.

The server's model after a round is ``W0 + merged`` where ``merged`` is the strategy's cumulative
update (base + adapter, as factors keyed by family-wide keys). Each distinct member in
``federation.members`` (the family's :class:`~aiflow_fl.family.member.Member`, via
``member_from_config``) gets the keys it has folded into its frozen weights with ``Member.fold`` (a
shallow member simply skips deeper layers' keys) and is evaluated on the held-out chunks of every domain
(:func:`aiflow_fl.data.central_heldout`). Reported: per-member loss/accuracy and their mean.
"""

from __future__ import annotations

import torch

from aiflow_fl.aggregation.update import AdapterUpdate
from aiflow_fl.config import AiflowConfig
from aiflow_fl.data import TokenChunks, central_heldout, load_chunks
from aiflow_fl.family.member import member_from_config
from aiflow_fl.federated.local import evaluate_chunks, summarize_chunks


class CentralEvaluator:
    """Evaluates the federation's members on the central held-out set (data loaded once)."""

    def __init__(self, cfg: AiflowConfig) -> None:
        self.cfg = cfg
        self.members = list(dict.fromkeys(cfg.federation.members or ["full"]))
        self._heldout: TokenChunks | None = None
        self.per_chunk: dict[str, dict] = {}  # member -> {"nll", "correct", "tokens"} of the last call
        self.vocab_size = 0

    def heldout(self, tokenizer) -> TokenChunks:
        if self._heldout is None:
            d = self.cfg.data
            chunks = load_chunks(d.source, tokenizer, d.seq_len)
            self._heldout = central_heldout(chunks, d.heldout_fraction, d.max_heldout_examples, self.cfg.run.seed)
        return self._heldout

    @torch.no_grad()
    def __call__(self, merged: AdapterUpdate | None) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in self.members:
            member = member_from_config(self.cfg, name)
            if merged is not None:
                member.fold(merged)  # keys of deeper layers than the member's are skipped
            self.vocab_size = member.vocab_size
            self.per_chunk[name] = evaluate_chunks(member.model, self.heldout(member.tokenizer), self.cfg.train.eval_batch_size)
            metrics = summarize_chunks(self.per_chunk[name])
            out[f"eval-loss/{name}"] = metrics["eval-loss"]
            out[f"eval-accuracy/{name}"] = metrics["eval-accuracy"]
        out["eval-loss"] = sum(out[f"eval-loss/{n}"] for n in self.members) / len(self.members)
        out["eval-accuracy"] = sum(out[f"eval-accuracy/{n}"] for n in self.members) / len(self.members)
        return out


def worse_than_uniform(metrics: dict[str, float], vocab_size: int) -> dict[str, float]:
    """Members whose held-out loss is above ln(V), the loss of guessing uniformly over the vocabulary
    (raw early exits of a backbone, with no trained branch, start there: ~20 nats for SmolLM2)."""
    import math

    bound = math.log(max(2, vocab_size))
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval-loss/") and v > bound}

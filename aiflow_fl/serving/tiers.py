"""Serving tiers: the local tier that runs one family :class:`~aiflow_fl.family.member.Member`.

A member's first ``shared_layers`` decoder layers are the backbone's own (identical weights in every
member of a family); an EESB member then runs one private *branch* layer (paper §III-B2), then the
shared final norm and LM head. Because the shared layers are identical, a larger member can start at
layer ``exit_layer`` of a smaller one from its hidden states, and the smaller member's KV cache *is*
the cache of those layers: nothing is recomputed (familial reuse, paper §III-C; LayerSkip's
self-speculation).

:class:`LocalTier` wraps the Member (it defines no member type of its own): it runs the layers
``[entry, exit_layer)`` on new positions — from token ids when ``entry == 0``, else from the hidden
states a lower tier produced at layer ``entry`` (one of ``member.resume_layers``) — then the branch,
norm and head, keeping one KV cache across rounds that can be cropped on rejection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from aiflow_fl.errors import AiflowError
from aiflow_fl.family.member import Member
from aiflow_fl.layers import decoder_of, embed, head, positions, run_layers
from aiflow_fl.serving.acceptance import probs_from_logits


def draft_vocabulary(vocab_size: int, size: int, always: list[int]) -> torch.Tensor | None:
    """Ids of a reduced draft head: the first ``size`` ids (byte-level BPE ids are in merge order,
    i.e. roughly by frequency) plus ``always`` (end-of-turn and other special ids). None = full.

    The draft then only proposes these tokens; verification stays exact (greedy: a token outside
    is simply a mismatch the verifier corrects; sampling: ``q = 0`` outside, the residual covers it).
    """
    if size <= 0 or size >= vocab_size:
        return None
    ids = torch.cat([torch.arange(size), torch.tensor(sorted(set(always)), dtype=torch.long)])
    return torch.unique(ids)


@dataclass
class TierOutput:
    """What a tier computed for a run of new positions."""

    hidden: torch.Tensor | None  # (n, H) exit hidden states (before the branch): where the next tier resumes
    preds: torch.Tensor  # greedy: (n,) argmax token ids; sampling: (n, V) next-token probabilities
    confidence: torch.Tensor | None = None  # greedy: (n,) probability of the argmax (for draft gating)
    features: torch.Tensor | None = None  # (n, H) last hidden states after the final norm (a draft head's input)


def predictions(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """What verification needs from (n, V) logits: argmax ids (temperature 0) or probabilities."""
    return logits.argmax(-1) if temperature <= 0 else probs_from_logits(logits, temperature)


@dataclass
class LocalTier:
    """A family Member running in this process from layer ``entry`` (module docstring)."""

    member: Member
    entry: int = 0  # 0: from token ids; else resumes from a lower tier's hidden states at this layer
    vocab: torch.Tensor | None = None  # reduced head (draft only)
    draft: bool = False  # the drafting tier: also reports its confidence (greedy)
    cache: DynamicCache = field(init=False)
    branch_cache: DynamicCache | None = field(init=False)
    _head_weight: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.entry not in self.member.resume_layers:
            raise AiflowError(
                f"Tier '{self.member.name}' cannot resume at layer {self.entry}: only its layers "
                f"0..{self.member.shared_layers - 1} are the backbone's shared layers, so it can start at 0..{self.member.shared_layers}."
            )
        if self.vocab is not None:
            self._head_weight = self.member.model.lm_head.weight[self.vocab].detach().clone()
        self.reset()

    @property
    def name(self) -> str:
        return self.member.name

    def reset(self) -> None:
        config = self.member.model.config
        self.cache = DynamicCache(config=config)
        self.branch_cache = DynamicCache(config=config) if self.member.branch else None

    @torch.inference_mode()
    def process(
        self,
        start: int,
        tokens: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        temperature: float = 0.0,
        want_hidden: bool = True,
        want_features: bool = False,
    ) -> TierOutput:
        """Run positions ``start..start+n-1`` given as ``tokens`` (n,) or ``hidden`` (n, H).

        Everything this tier cached at positions ≥ ``start`` is forgotten first, so a rollback
        needs no separate message: the next call simply starts at the rollback point.
        """
        self.crop(start)
        model, stop = self.member.model, self.member.exit_layer
        if (tokens is None) == (hidden is None):
            raise AiflowError("LocalTier.process needs exactly one of tokens or hidden states.")
        if tokens is not None and self.entry != 0:
            raise AiflowError(f"Tier '{self.name}' resumes at layer {self.entry} and needs hidden states, not tokens.")
        x = embed(model, tokens.view(1, -1)) if tokens is not None else hidden.view(1, -1, self.member.hidden_size)
        pos = positions(start, x.shape[1])
        exit_hidden = run_layers(model, x, self.entry, stop, pos, self.cache) if stop > self.entry else x
        out = exit_hidden
        if self.member.branch:
            out = run_layers(model, out, stop, stop + 1, pos, self.branch_cache)
        normed = decoder_of(model).norm(out)
        if self._head_weight is None:
            logits = model.lm_head(normed)[0]
        else:
            small = torch.nn.functional.linear(normed, self._head_weight)[0]
            logits = torch.full((small.shape[0], model.config.vocab_size), float("-inf"))
            logits[:, self.vocab] = small
        confidence = torch.softmax(logits.float(), -1).amax(-1) if temperature <= 0 and self.draft else None
        return TierOutput(exit_hidden[0] if want_hidden else None, predictions(logits, temperature), confidence,
                          normed[0] if want_features else None)

    def crop(self, length: int) -> None:
        """Forget every position ≥ ``length`` (after a rejection)."""
        for cache in (self.cache, self.branch_cache):
            if cache is None:
                continue
            for layer in cache.layers:
                if layer.is_initialized and layer.keys.shape[-2] > length:
                    layer.crop(-(layer.keys.shape[-2] - length))

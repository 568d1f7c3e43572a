"""Assembling in-process chains from family members (:class:`aiflow_fl.family.member.Member`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from aiflow_fl.errors import AiflowError
from aiflow_fl.family.member import Member
from aiflow_fl.serving.chain import Chain
from aiflow_fl.serving.link import Link
from aiflow_fl.serving.tiers import LocalTier, draft_vocabulary


class LayerSpan(Protocol):
    """What resuming needs to know of a verifier: a local Member or a RemoteTier (from its /health)."""

    exit_layer: int
    shared_layers: int


def eos_ids(model, tokenizer=None) -> list[int]:
    """Every id that ends generation for ``model`` (its generation config, plus the tokenizer's)."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def resume_layer(low: LayerSpan, high: LayerSpan) -> int:
    """Where ``high`` can resume from ``low``'s exit hidden states: ``low``'s exit when both run it
    with the backbone's own layers (familial reuse), else 0 (start again from token ids)."""
    shares = low.shared_layers == low.exit_layer and high.shared_layers >= low.exit_layer
    return low.exit_layer if shares and high.exit_layer >= low.exit_layer else 0


def verifier_entries(spans: Sequence[LayerSpan], reuse: bool, cost_aware: bool) -> list[int]:
    """The layer each verifier (``spans[1:]``, above the device ``spans[0]``) starts at: resuming from
    the tier below when ``reuse`` (:func:`resume_layer`), else 0. A cost-aware chain's last tier always
    reads token ids, so it can decode alone when drafting does not pay."""
    entries = [resume_layer(low, high) if reuse else 0 for low, high in zip(spans, spans[1:])]
    if cost_aware and entries:
        entries[-1] = 0
    return entries


def local_chain(
    members: list[Member],
    reuse: bool = True,
    draft_vocab: int = 0,
    links: list[Link] | None = None,
    eos_token_ids: list[int] | None = None,
    **chain_options,
) -> Chain:
    """A chain whose tiers run in this process: ``members`` = [device, edge(, cloud)], growing.

    ``reuse``: each verifier resumes from the tier below's exit hidden states (familial reuse)
    instead of re-running the shared layers from token ids. ``draft_vocab`` > 0 gives the device a
    reduced head over that many most frequent ids (verification stays exact). With
    ``cost_aware`` the last tier always reads token ids, so the chain can fall back to it alone.
    """
    if not 1 <= len(members) <= 3:
        raise AiflowError(f"A chain has 1 to 3 members (device[, edge[, cloud]]); got {len(members)}.")
    eos = eos_token_ids if eos_token_ids is not None else eos_ids(members[-1].model)
    vocab = draft_vocabulary(members[0].model.config.vocab_size, draft_vocab, eos)
    tiers = [LocalTier(members[0], 0, vocab, draft=True)]
    entries = verifier_entries(members, reuse, bool(chain_options.get("cost_aware")))
    tiers += [LocalTier(m, entry) for m, entry in zip(members[1:], entries)]
    return Chain(tiers, links=links, eos_token_ids=eos, **chain_options)


def head_chain(head, verifier: Member, links: list[Link] | None = None, eos_token_ids: list[int] | None = None,
               **chain_options) -> Chain:
    """A 2-tier chain: a feature-level draft head (serving.draft_head) drafting for ``verifier``, which
    runs from token ids and returns its last hidden states with each verdict. The head must have been
    built for this verifier's backbone shape (hidden size, vocabulary): checked here, before generating."""
    from aiflow_fl.serving.draft_head import DraftHeadTier, backbone_shape

    ours, theirs = backbone_shape(head.backbone), backbone_shape(verifier.model)
    wrong = [f"{k} {ours[k]} (verifier: {theirs[k]})" for k in ("hidden_size", "vocab_size") if ours[k] != theirs[k]]
    if wrong:
        raise AiflowError(f"The draft head was built for another backbone than verifier '{verifier.name}': " + ", ".join(wrong) + ".")
    eos = eos_token_ids if eos_token_ids is not None else eos_ids(verifier.model)
    return Chain([DraftHeadTier(head), LocalTier(verifier, 0)], links=links, eos_token_ids=eos, **chain_options)

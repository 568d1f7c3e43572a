"""Split inference across family members (paper §III-A2, §III-C): no recomputation of shared layers.

Members share the backbone's first layers with identical weights, so the hidden states after layer
``k`` and the keys/values of layers ``< k`` are the same in every member that contains them. A small
member (on a device) runs the embedding and layers ``[0, k)``; it sends :class:`SplitState` (hidden
states at layer ``k`` + the KV cache of layers ``< k``); a larger member (edge/cloud) resumes at layer
``k`` and runs only layers ``[k, L)`` and its head. Its cache then holds every layer, so decoding
continues normally (``member(next_ids, cache=cache)`` or ``generate``), or with further
splits: each later :class:`SplitState` carries only the new positions, and :func:`resume` appends them
to the receiver's cache.

Built on :mod:`aiflow_fl.layers` (``embed`` / ``run_layers`` / ``head``), the model's own modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from aiflow_fl.errors import AiflowError
from aiflow_fl.family.spec import MemberSpec
from aiflow_fl.layers import embed, head, positions, run_layers


@dataclass
class SplitState:
    """What crosses the link: hidden states at layer ``exit`` and the KV cache of layers ``< exit``."""

    hidden: torch.Tensor  # (B, T, H): output of layer exit-1 (the embeddings when exit = 0)
    exit: int
    # per layer < exit, the keys/values of the new positions only: (B, kv heads, T, head dim)
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    start: int  # position of hidden's first token

    def num_bytes(self) -> int:
        tensors = [self.hidden] + [t for kv in self.keys_values for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)


def _check_shared(spec: MemberSpec | None, exit_layer: int, num_layers: int, role: str) -> None:
    if spec is None:
        return
    shared = spec.shared_layers(num_layers)
    if exit_layer > shared:
        raise AiflowError(
            f"Split at layer {exit_layer} is outside the allowed range 0..{shared} for the {role} member "
            f"'{spec.name}': only its first {shared} layers are the backbone's shared layers."
        )


def run_prefix(
    member: PreTrainedModel,
    input_ids: torch.Tensor,
    exit_layer: int,
    cache: DynamicCache | None = None,
    spec: MemberSpec | None = None,
) -> SplitState:
    """Embed ``input_ids`` and run layers ``[0, exit_layer)`` of ``member``; ``cache`` (extended in
    place) may already hold earlier positions of these layers."""
    layers = member.config.num_hidden_layers
    if not 0 <= exit_layer <= layers:
        raise AiflowError(f"Split layer {exit_layer} is outside the allowed range 0..{layers} of this member.")
    _check_shared(spec, exit_layer, layers, "sending")
    cache = DynamicCache(config=member.config) if cache is None else cache
    start = cache.get_seq_length() if exit_layer > 0 else 0
    pos = positions(start, input_ids.shape[1], input_ids.device)
    hidden = embed(member, input_ids)
    if exit_layer > 0:
        hidden = run_layers(member, hidden, 0, exit_layer, pos, cache)
    kv = [(cache.layers[i].keys[:, :, start:], cache.layers[i].values[:, :, start:]) for i in range(exit_layer)]
    return SplitState(hidden=hidden, exit=exit_layer, keys_values=kv, start=start)


def resume(
    member: PreTrainedModel,
    state: SplitState,
    cache: DynamicCache | None = None,
    spec: MemberSpec | None = None,
) -> tuple[torch.Tensor, DynamicCache]:
    """Run layers ``[state.exit, L)`` and the head of ``member`` from ``state``: (logits, cache).

    Layers ``< state.exit`` are never run here; their keys/values come from ``state``. ``cache`` is
    the receiver's cache from earlier calls (None on the first, which must start at position 0).
    """
    layers = member.config.num_hidden_layers
    if state.exit >= layers:
        raise AiflowError(
            f"Cannot resume at layer {state.exit}: the receiving member has {layers} layers, so the split must "
            f"be in 0..{layers - 1}."
        )
    _check_shared(spec, state.exit, layers, "receiving")
    cache = DynamicCache(config=member.config) if cache is None else cache
    have = cache.get_seq_length(layers - 1)
    if have != state.start:
        raise AiflowError(
            f"The split state starts at position {state.start} but the receiving member's cache holds {have} "
            "positions; resume every split of a sequence in order, with the same receiver cache."
        )
    for i, (keys, values) in enumerate(state.keys_values):
        cache.layers[i].update(keys, values)
    pos = positions(state.start, state.hidden.shape[1], state.hidden.device)
    hidden = run_layers(member, state.hidden, state.exit, layers, pos, cache)
    return head(member, hidden), cache

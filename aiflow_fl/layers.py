"""Running a slice of a decoder's layers: the primitive behind split inference and familial reuse.

A Llama/Qwen2 ``*ForCausalLM`` is ``embed -> layers[0..L) -> norm -> lm_head``. Family members share
their first layers, so a member can stop after layer k and another (larger) member can resume at
layer k from the transmitted hidden states, with the KV cache of the layers each one ran. These
functions expose exactly those three steps with the model's own modules, so the numbers are the
model's own (a test compares them with one full ``forward``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask


def decoder_of(model: PreTrainedModel) -> nn.Module:
    """The ``*Model`` inside a ``*ForCausalLM`` (has embed_tokens, layers, norm, rotary_emb)."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model


def positions(start: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """Position ids ``[[start, ..., start + length - 1]]``."""
    return torch.arange(start, start + length, device=device).unsqueeze(0)


def embed(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    return decoder_of(model).embed_tokens(input_ids)


def run_layers(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    start: int,
    stop: int,
    position_ids: torch.Tensor,
    cache: Cache | None = None,
    attention_mask: torch.Tensor | None = None,
    layers: nn.ModuleList | None = None,
) -> torch.Tensor:
    """Run decoder layers ``[start, stop)`` on ``hidden`` (B, T, H) at ``position_ids``.

    ``cache`` holds the keys/values of earlier positions for these layers (it is extended in
    place). ``layers`` may replace the model's own layer list (a member whose last layer is a
    branch passes its own list); the layers' ``layer_idx`` decides which cache slot each uses.
    """
    decoder = decoder_of(model)
    layer_list = decoder.layers if layers is None else layers
    mask = create_causal_mask(
        config=decoder.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids,
        layer_idx=layer_list[start].self_attn.layer_idx if cache is not None and stop > start else None,
    )
    rope = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in layer_list[start:stop]:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=rope,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
    return hidden


def head(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head: hidden states (B, T, H) -> logits (B, T, V)."""
    return model.lm_head(decoder_of(model).norm(hidden))


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch has oneDNN's linear with a pre-reordered weight (CPU builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Linear):
    """A frozen linear with the GEMM kernel chosen by the number of rows (same weight, same result up
    to float summation order, ~1e-5 here). ``F.linear`` re-packs the weight inside every GEMM call;
    oneDNN's linear reads a copy of the weight pre-reordered into its blocked layout, which pays for
    products of several rows. Measured on one thread of this CPU, µs per product:

    * decoder MLP weights (1536 × 576): 1 row 257 vs 276 packed, 3 rows 297 vs 316, 5 rows 429 vs 296,
      8 rows 574 vs 344, 20 rows 681 vs 482; 576 × 576 and 192 × 576 weights gain nothing at any row
      count (so :func:`pack_linears` packs large weights only, from ``min_rows`` = 5 rows);
    * SmolLM2's LM head (49152 × 576), ms: 1 row 7.7 vs 5.35 as ``x @ (Wᵀ contiguous)`` (memory-bound:
      one contiguous pass), 2 rows 6.7 vs 6.6 packed, 5 rows 15.4 vs 7.6, 8 rows 22.6 vs 9.3, 20 rows
      22.0 vs 14.7 (two threads: 2 rows 3.8 vs 2.9, 8 rows 8.9 vs 3.9): :class:`RowAdaptiveHead`.

    Inference only: a product that wants a gradient takes nn.Linear's path. The packed and transposed
    copies are caches keyed on the weight's storage and version, refreshed when either changes: an
    in-place op or a new tensor (peft's ``merge(safe_merge=True)``) is seen; a write through ``.data``
    in place (peft's unsafe merge) bypasses the version counter and is not.
    """

    def __init__(self, linear: nn.Linear, min_rows: int = 5, transposed_row: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: merges and tied embeddings see one tensor
        self.bias = linear.bias
        self.min_rows = min_rows  # from this many rows: oneDNN's packed product
        self.transposed_row = transposed_row  # one row: x @ Wᵀ (contiguous copy)
        self._copies: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        # copies and pickles leave the caches behind (oneDNN's packed tensor has no storage to copy;
        # Member.fresh_copy deep-copies modules); they are rebuilt on the next product
        state = dict(self.__dict__)
        state["_copies"] = {}
        return state

    def _copy(self, kind: str) -> torch.Tensor:
        key = (self.weight.data_ptr(), self.weight._version)
        held = self._copies.get(kind)
        if held is None or held[0] != key:
            with torch.no_grad():
                weight = self.weight.detach()
                copy = weight.t().contiguous() if kind == "transposed" else torch.ops.mkldnn._reorder_linear_weight(weight)
            held = self._copies[kind] = (key, copy)
        return held[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if (torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)) \
                or x.dtype != torch.float32 or self.weight.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        bias = None if self.bias is None else self.bias.detach()
        if rows == 1 and self.transposed_row:
            out = x.reshape(1, x.shape[-1]) @ self._copy("transposed")
            out = out if bias is None else out + bias
            return out.reshape(*x.shape[:-1], self.out_features)
        if rows >= self.min_rows and onednn_linear_available():
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._copy("packed"), bias, "none", [], "")
        return super().forward(x)


class RowAdaptiveHead(PackedLinear):
    """The LM head's kernels (see :class:`PackedLinear`): one row as ``x @ Wᵀ``, two or more rows
    (verification, prefill) packed. Decoding and verification run it on 1-9 rows, where the default
    product over a large vocabulary is slow on CPU."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear, min_rows=2, transposed_row=True)


PACK_MIN_WEIGHT = 1 << 19  # 524,288 weights: SmolLM2's MLP matrices (884,736) pack, its attention ones don't


def pack_linears(module: nn.Module, min_weight: int = PACK_MIN_WEIGHT) -> int:
    """Replace, in place, every plain ``nn.Linear`` under ``module`` with at least ``min_weight``
    weights by a :class:`PackedLinear` (the LM head excepted: :class:`RowAdaptiveHead` is its kernel);
    returns how many. A no-op (0) where this torch lacks oneDNN. Idempotent."""
    if not onednn_linear_available():
        return 0
    count = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != "lm_head" and child.weight.numel() >= min_weight:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count


def use_inference_kernels(model: PreTrainedModel) -> PreTrainedModel:
    """Serve ``model`` with the row-adaptive kernels of :class:`PackedLinear`: its LM head becomes a
    :class:`RowAdaptiveHead` and its large decoder linears pack (:func:`pack_linears`). Same weights,
    idempotent; members built from it afterwards share them. Verifying k drafts on SmolLM2 (one thread,
    after a 120-token prefix, in units of one decoded token): k = 2: 1.32 → 1.12, k = 5: 1.74 → 1.39,
    k = 8: 2.04 → 1.57."""
    current = model.lm_head
    if isinstance(current, nn.Linear) and not isinstance(current, RowAdaptiveHead):
        model.lm_head = RowAdaptiveHead(current)
    pack_linears(model)
    return model

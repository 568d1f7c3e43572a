"""Running a slice of a decoder's layers: the primitive behind split inference and familial reuse.

A Llama/Qwen2 ``*ForCausalLM`` is ``embed -> layers[0..L) -> norm -> lm_head``. Family members share
their first layers, so a member can stop after layer k and another (larger) member can resume at
layer k from the transmitted hidden states, with the KV cache of the layers each one ran. These
functions expose exactly those three steps with the model's own modules, so the numbers are the
model's own (a test compares them with one full ``forward``).
"""

from __future__ import annotations

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


class RowAdaptiveHead(nn.Linear):
    """The LM head with the GEMM kernel chosen by the number of rows (same weight, same result up to
    float summation order, ~1e-6 here): decoding and verification run it on 1-5 rows, where the
    default ``x @ Wᵀ`` over a large vocabulary is slow on CPU (measured on SmolLM2's 49152 × 576 head,
    one thread: 1 row 16.6 ms vs 8.8 ms as ``x @ (Wᵀ contiguous)``; 2-5 rows 24-64 ms vs 13-20 ms as
    ``(W @ xᵀ)ᵀ``; from ~6 rows the default is as fast). Only when no gradient is wanted: training
    keeps nn.Linear's path (the transposed copy is a cache, refreshed when the weight changes).
    """

    FEW_ROWS = 5

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter (tied embeddings stay tied)
        self.bias = linear.bias
        self._transposed: torch.Tensor | None = None
        self._transposed_of: tuple[int, int] | None = None

    def _weight_t(self) -> torch.Tensor:
        key = (self.weight.data_ptr(), self.weight._version)
        if self._transposed_of != key:
            with torch.no_grad():
                self._transposed = self.weight.detach().t().contiguous()
            self._transposed_of = key
        return self._transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if (torch.is_grad_enabled() and self.weight.requires_grad) or self.bias is not None \
                or x.dtype != self.weight.dtype or not 1 <= rows <= self.FEW_ROWS or x.device.type != "cpu":
            return super().forward(x)
        flat = x.reshape(rows, x.shape[-1])
        out = flat @ self._weight_t() if rows == 1 else (self.weight @ flat.t()).t().contiguous()
        return out.reshape(*x.shape[:-1], self.out_features)


def use_row_adaptive_head(model: PreTrainedModel) -> PreTrainedModel:
    """Give ``model`` a :class:`RowAdaptiveHead` (idempotent; members built from it afterwards share it)."""
    current = model.lm_head
    if isinstance(current, nn.Linear) and not isinstance(current, RowAdaptiveHead):
        model.lm_head = RowAdaptiveHead(current)
    return model

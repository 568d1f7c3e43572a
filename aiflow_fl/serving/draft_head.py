"""A feature-level draft head (EAGLE, Li et al. 2024, arXiv 2401.15077) and the tier that runs it.

EAGLE drafts at the level of the verifier's *features* rather than tokens: the head reads the
verifier's last hidden state ``f_{t-1}`` (after the final norm, the LM head's input) together with
the embedding of the token ``x_t`` that followed it, and predicts ``f̂_t`` with one decoder layer:

    f̂_t = Layer(FC([embed(x_t); f_{t-1}]))      next-token logits = head(f̂_t)

The embedding, the LM head and the rotary embedding are the backbone's own (frozen, shared); the
head only owns ``FC`` (2H → H) and one decoder layer of the backbone's architecture. The LM head is
restricted to a frequency-ranked vocabulary (FR-Spec, Zhao et al. 2025) so a draft token costs a
few percent of a verifier token. Drafting k tokens autoregresses on the head's own ``f̂``; after
each verification the verifier's true features replace the predicted ones (the chain recomputes the
positions that were drafted from predictions), so errors do not accumulate across rounds.

Verification stays exact: greedy output is the verifier's argmax, sampled output follows the
verifier's distribution (``q`` is 0 outside the draft vocabulary; the residual covers it).

The head is saved as one safetensors file with the backbone's shape (hidden size, vocabulary, layer
count) and fingerprint in its metadata; :func:`load_draft_head` checks them against the verifier
and names any mismatch before a single token is generated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from aiflow_fl.errors import AiflowError
from aiflow_fl.layers import decoder_of, positions, run_layers
from aiflow_fl.serving.tiers import TierOutput, predictions

FORMAT = "aiflow-draft-head/1"


class DraftHead(nn.Module):
    """FC(2H → H) + one decoder layer of the backbone's class, on the backbone's embedding and head.

    ``vocab`` (V',) are the ids the head can propose (a frequency-ranked subset plus end-of-turn ids).
    The backbone's modules are referenced, never copied or trained here.
    """

    def __init__(self, backbone: PreTrainedModel, vocab: torch.Tensor, init_from_last_layer: bool = False) -> None:
        super().__init__()
        config = backbone.config
        hidden = int(config.hidden_size)
        self.config = config
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        layer_cls = type(decoder_of(backbone).layers[0])
        self.layer = layer_cls(config, layer_idx=0)
        with torch.no_grad():
            # Start as "the feature passes through": FC = [small · embedding | identity on the feature],
            # and the backbone's last layer (its residual stream starts near the verifier's features).
            self.fc.weight.zero_()
            self.fc.weight[:, hidden:].copy_(torch.eye(hidden))
            self.fc.weight[:, :hidden].normal_(0.0, 0.02)
            if init_from_last_layer:
                self.layer.load_state_dict(decoder_of(backbone).layers[-1].state_dict())
        self.register_buffer("vocab", vocab.to(torch.long).clone(), persistent=True)
        # Frozen, outside the module's parameters (not saved): the backbone's embedding, rows of its head.
        object.__setattr__(self, "_backbone", backbone)
        self.refresh_head()

    def refresh_head(self) -> None:
        """Copy the backbone's LM-head rows of ``vocab`` (contiguous: one small GEMM per draft token)."""
        object.__setattr__(self, "head_rows", self._backbone.lm_head.weight[self.vocab].detach().clone())

    @property
    def backbone(self) -> PreTrainedModel:
        return self._backbone

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return decoder_of(self._backbone).embed_tokens(tokens)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor, start: int = 0,
                cache: DynamicCache | None = None, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` (B, T) at positions start.., ``features`` (B, T, H): the verifier's feature of the
        position *before* each token. Returns predicted features (B, T, H) and logits over ``vocab`` (B, T, V')."""
        with torch.no_grad():  # the backbone's embedding stays frozen
            embedded = self.embed(tokens)
        x = self.fc(torch.cat([embedded, features.to(self.fc.weight.dtype)], dim=-1))
        pos = positions(start, tokens.shape[1]).expand(tokens.shape[0], -1)
        predicted = run_layers(self._backbone, x, 0, 1, pos, cache, attention_mask=attention_mask, layers=nn.ModuleList([self.layer]))
        return predicted, predicted @ self.head_rows.t()

    def parameters_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------- files
def backbone_shape(model: PreTrainedModel) -> dict[str, int]:
    c = model.config
    return {"hidden_size": int(c.hidden_size), "vocab_size": int(c.vocab_size), "num_hidden_layers": int(c.num_hidden_layers)}


def save_draft_head(head: DraftHead, path: Path, fingerprint: str, info: dict | None = None) -> None:
    """One safetensors file: FC, the layer and the vocabulary; metadata = format, backbone shape, fingerprint."""
    from safetensors.torch import save

    from aiflow_fl.files import atomic_write_bytes

    tensors = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    meta = {"format": FORMAT, "backbone": json.dumps(backbone_shape(head.backbone)), "fingerprint": fingerprint,
            "info": json.dumps(info or {})}
    atomic_write_bytes(Path(path), save(tensors, metadata=meta))


def load_draft_head(path: Path, backbone: PreTrainedModel, fingerprint: str | None = None) -> DraftHead:
    """The head saved at ``path``, checked against ``backbone`` before use (module docstring).

    Raises AiflowError naming the problem: not a draft-head file / truncated, a head for a backbone
    of another hidden size, vocabulary or layer count, or (when ``fingerprint`` is given) other weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise AiflowError(f"Draft head file {path} does not exist.")
    data = path.read_bytes()
    try:
        tensors = load(data)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, ValueError, OSError) as exc:
        raise AiflowError(f"Draft head file {path} is unreadable or truncated ({len(data)} bytes): {exc}") from exc
    if meta.get("format") != FORMAT:
        raise AiflowError(f"{path} is not an aiflow draft head (format {meta.get('format')!r}, expected {FORMAT!r}).")
    saved = json.loads(meta["backbone"])
    actual = backbone_shape(backbone)
    wrong = [f"{k} {saved.get(k)} (verifier: {v})" for k, v in actual.items() if saved.get(k) != v]
    if wrong:
        raise AiflowError(f"Draft head {path} was built for another backbone: " + ", ".join(wrong) + ".")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise AiflowError(f"Draft head {path} was trained on other backbone weights (fingerprint {meta.get('fingerprint')}, "
                          f"verifier {fingerprint}); retrain it for this model.")
    vocab = tensors.get("vocab")
    if vocab is None or vocab.numel() == 0 or int(vocab.max()) >= actual["vocab_size"]:
        raise AiflowError(f"Draft head {path} has no usable vocabulary for a {actual['vocab_size']}-token backbone.")
    head = DraftHead(backbone, vocab, init_from_last_layer=False)
    missing, unexpected = head.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise AiflowError(f"Draft head {path} does not match this backbone's layer: missing {missing}, unexpected {unexpected}.")
    head.refresh_head()
    return head.eval()


# ---------------------------------------------------------------- the tier
@dataclass
class DraftHeadTier:
    """The device tier running a :class:`DraftHead` (the chain feeds it the verifier's features).

    ``process(start, tokens, hidden)``: ``tokens`` (n,) at positions start.., ``hidden`` (n, H) the
    feature of the position before each (true ones from the verifier, or the head's own predictions).
    Returns the predicted features as ``hidden`` and the predictions over the full vocabulary.
    """

    head: DraftHead
    name: str = "draft-head"
    entry: int = 0
    reads_features: bool = True
    draft: bool = True
    cache: DynamicCache = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    @property
    def hidden_size(self) -> int:
        return int(self.head.config.hidden_size)

    @property
    def vocab(self) -> torch.Tensor:
        return self.head.vocab

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.head.config)

    def crop(self, length: int) -> None:
        for layer in self.cache.layers:
            if layer.is_initialized and layer.keys.shape[-2] > length:
                layer.crop(-(layer.keys.shape[-2] - length))

    @torch.inference_mode()
    def process(self, start: int, tokens: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                temperature: float = 0.0, want_hidden: bool = True, want_features: bool = False) -> TierOutput:
        if tokens is None or hidden is None or hidden.shape[0] != tokens.numel():
            raise AiflowError("A draft head needs the tokens and, for each, the verifier's feature of the position before it.")
        self.crop(start)
        predicted, small = self.head(tokens.view(1, -1), hidden.view(1, tokens.numel(), -1), start, self.cache)
        small = small[0]
        if temperature <= 0:  # greedy: the argmax over the draft vocabulary, mapped to full-vocabulary ids
            confidence = torch.softmax(small.float(), -1).amax(-1)
            return TierOutput(predicted[0], self.head.vocab[small.argmax(-1)], confidence)
        logits = torch.full((small.shape[0], self.head.config.vocab_size), float("-inf"))
        logits[:, self.head.vocab] = small
        return TierOutput(predicted[0], predictions(logits, temperature))


def find_draft_head(verifier: PreTrainedModel) -> Path | None:
    """The head in ``$AIFLOW_CACHE/draft-head`` trained for exactly these verifier weights on the most
    answer tokens (the newest among equals): a short ``--quick`` training never replaces a full one."""
    from safetensors import safe_open

    from aiflow_fl.family.instructions import model_fingerprint
    from aiflow_fl.models import cache_dir

    fingerprint = model_fingerprint(verifier)
    found = []
    for path in (cache_dir() / "draft-head").glob("head-*.safetensors"):
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except Exception:  # a broken cache file is not this verifier's head; load_draft_head names it if chosen
            continue
        if meta.get("format") == FORMAT and meta.get("fingerprint") == fingerprint:
            try:
                tokens = int(json.loads(meta.get("info") or "{}").get("answer_tokens", 0))
            except (ValueError, TypeError, AttributeError):
                tokens = 0
            found.append((tokens, path.stat().st_mtime, path))
    return max(found)[2] if found else None


def resolve_draft_head(setting: str, verifier: PreTrainedModel) -> DraftHead | None:
    """``serving.draft_head``: "off" -> None; "auto" -> the cached head for these weights, else None;
    a path -> that head, checked against the verifier (AiflowError on any mismatch)."""
    if setting == "off":
        return None
    if setting == "auto":
        path = find_draft_head(verifier)
        return None if path is None else load_draft_head(path, verifier)
    return load_draft_head(Path(setting).expanduser(), verifier)

"""The edge side: a projector into a language member's embedding space and the answer (LLaVA-style).

The decoded visual tokens (n × 112, standardized) go through a two-layer MLP projector (LLaVA-1.5's
``mlp2x_gelu``) into the member's embedding space and are placed *before* the question's token
embeddings; the frozen member reads ``inputs_embeds`` = [visual; "\\nQuestion: {q}\\nAnswer:"]. Its
answer is scored from the next-token distribution at the last position: the candidate answer
whose first token (with a leading space: " blue", " yes", …; the 13 first tokens are distinct) the
member gives the highest log-probability. Training loss: the cross-entropy of the answer among the
13 candidates. As LLaVA's second stage does, the member may also learn: :meth:`EdgeModel.add_lora`
injects peft LoRA adapters into its decoder layers (the frozen member alone, reading visual tokens it
was never trained on, answers worse than the question-text prior). :meth:`EdgeModel.generate` lets
the member write the answer as text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aiflow_fl.errors import AiflowError
from aiflow_fl.layers import decoder_of, pack_linears

PROMPT = "\nQuestion: {question}\nAnswer:"


class Projector(nn.Module):
    """Visual tokens (B, n, C) → member embeddings (B, n, H): Linear, GELU, Linear."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


def language_member(cfg, name: str | None = None):
    """The family's language member ``name`` (default ``cfg.tofc.member``) as THE family
    :class:`~aiflow_fl.family.member.Member` (:func:`~aiflow_fl.family.member.member_from_config`:
    a member of the family built in ``family.dir``, else the early exit ``name`` of ``model.name``),
    frozen and in eval mode."""
    from aiflow_fl.family.member import member_from_config

    member = member_from_config(cfg, name or cfg.tofc.member)
    member.model.eval().requires_grad_(False)
    if member.tokenizer is None:
        raise AiflowError(f"Member '{member.name}' has no tokenizer; TOFC's edge needs one for the question.")
    return member


@dataclass
class Batch:
    """Question token ids right-padded (B, L) and each row's last real position."""

    ids: torch.Tensor
    last: torch.Tensor


class EdgeModel(nn.Module):
    """Projector + frozen language member + the answers' first tokens."""

    def __init__(self, member, answers: list[str], channels: int) -> None:
        """``member``: the family's :class:`~aiflow_fl.family.member.Member` (frozen; its causal LM is
        deliberately not a submodule, so ``state_dict`` holds the projector only)."""
        super().__init__()
        self.member = member
        self.tokenizer = member.tokenizer
        tokenizer = self.tokenizer
        self.answers = list(answers)
        first = [tokenizer(" " + a, add_special_tokens=False)["input_ids"][0] for a in self.answers]
        if len(set(first)) != len(first):
            raise AiflowError("The answers' first tokens are not distinct under this tokenizer; scoring would be ambiguous.")
        self.register_buffer("answer_ids", torch.tensor(first), persistent=False)
        self.projector = Projector(channels, member.hidden_size)
        self._question_cache: dict[str, list[int]] = {}
        self.has_lora = False

    def add_lora(self, rank: int, targets: list[str], seed: int) -> None:
        """Inject trainable peft LoRA adapters (rank ``rank``, α = 2·rank) into the member's
        ``targets`` linears, in place (the member is this edge model's own fresh copy)."""
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0, bias="none")
        try:
            inject_adapter_in_model(config, self.member.model)
        except ValueError as exc:
            raise AiflowError(f"tofc.lora_targets {list(targets)} matched no linear of member "
                              f"'{self.member.name}': {str(exc).splitlines()[0]}") from None
        self.has_lora = True

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The member's LoRA weights (peft's names), empty without :meth:`add_lora`."""
        from peft import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(self.member.model)) if self.has_lora else {}

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        mine = self.lora_state()
        if set(mine) != set(state) or any(mine[k].shape != state[k].shape for k in state):
            raise AiflowError("The saved edge LoRA does not fit this member (other rank, targets or member); retrain it.")
        merged = [layer for layer in self._lora_layers() if layer.merged]
        for layer in merged:  # a merged delta must leave the weights before new adapters replace it
            layer.unmerge()
        set_peft_model_state_dict(self.member.model, state)
        for layer in merged:
            layer.merge(safe_merge=True)

    def _lora_layers(self) -> list:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.member.model.modules() if isinstance(m, LoraLayer)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        if not self.has_lora:
            return list(self.projector.parameters())
        if any(layer.merged for layer in self._lora_layers()):
            raise AiflowError("This edge model is frozen (its LoRA is merged into the member); build a new one to train.")
        return list(self.projector.parameters()) + [p for n, p in self.member.model.named_parameters() if "lora_" in n]

    def freeze(self) -> None:
        """Inference mode: nothing trains, and the LoRA is merged into the member's weights (W + α/r·BA,
        peft's own merge): the unmerged adapters cost 84 extra small products a forward, ~10 % of
        the edge's time at 8 visual tokens. The adapters stay readable (:meth:`lora_state`). Then the
        member's large (MLP) linears keep a oneDNN-packed copy of their weights (:func:`~aiflow_fl.layers.pack_linears`:
        the ~20-row prefill of 8 visual tokens + the question; `aiflow bench tofc`, one thread, edge 46.0 → 43.2 ms).

        ``safe_merge``: peft then writes W + ΔW into a new tensor. Its in-place merge would write into
        the member's frozen weights, which every :meth:`~aiflow_fl.family.member.Member.fresh_copy` of
        the process shares: each later edge would start from (and merge again into) merged weights."""
        for p in self.trainable_parameters():
            p.requires_grad_(False)
        for layer in self._lora_layers() if self.has_lora else []:
            if not layer.merged:
                layer.merge(safe_merge=True)
        pack_linears(self.member.model)
        self.eval()
        self.member.model.eval()

    def question_ids(self, question: str) -> list[int]:
        ids = self._question_cache.get(question)
        if ids is None:
            ids = self.tokenizer(PROMPT.format(question=question), add_special_tokens=False)["input_ids"]
            self._question_cache[question] = ids
        return ids

    def batch(self, questions: list[str]) -> Batch:
        rows = [self.question_ids(q) for q in questions]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return Batch(ids, torch.tensor([len(r) - 1 for r in rows]))

    def embeds(self, visual: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """[projected visual; question embeddings] and the answer position of each row."""
        text = self.member.model.get_input_embeddings()(batch.ids)
        projected = self.projector(visual.to(text.dtype))
        return torch.cat([projected, text], dim=1), batch.last + visual.shape[1]

    def next_token_logits(self, visual: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """The member's next-token logits (B, V) after [visual; question]. Right padding is safe: the
        attention is causal, so padded positions after a row's last token never affect it."""
        return self.member.model.get_output_embeddings()(self._answer_hidden(visual, questions))

    def _answer_hidden(self, visual: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """The member's last hidden state at each row's answer position, (B, H)."""
        batch = self.batch(questions)
        embeds, last = self.embeds(visual, batch)
        hidden = decoder_of(self.member.model)(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return hidden[torch.arange(len(questions)), last]

    def answer_logits(self, visual: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """The member's logits of the candidate answers' first tokens only, (B, n_answers): the LM-head
        rows of those tokens (13 of a 49k vocabulary), the same values as ``next_token_logits[:, ids]``."""
        head = self.member.model.get_output_embeddings()
        bias = head.bias[self.answer_ids] if head.bias is not None else None
        return nn.functional.linear(self._answer_hidden(visual, questions), head.weight[self.answer_ids], bias)

    def loss(self, visual: torch.Tensor, questions: list[str], answers: torch.Tensor) -> torch.Tensor:
        """Answer cross-entropy (nats) among the candidate answers' first tokens: the member's logits of
        those tokens, softmaxed over the candidates (the scoring :meth:`predict` uses)."""
        logits = self.answer_logits(visual, questions)
        return nn.functional.cross_entropy(logits.float(), answers)

    @torch.no_grad()
    def predict(self, visual: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """Index of the answer whose first token the member scores highest, (B,)."""
        return self.answer_logits(visual, questions).argmax(dim=-1)

    @torch.no_grad()
    def generate(self, visual: torch.Tensor, question: str, max_new_tokens: int = 4) -> str:
        """The member's greedy answer text for one image (visual (1, n, C)), via inputs_embeds."""
        embeds, _ = self.embeds(visual, self.batch([question]))
        out = self.member.model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        text = self.tokenizer.decode(out[0], skip_special_tokens=True)
        return text.strip().split("\n")[0].strip()

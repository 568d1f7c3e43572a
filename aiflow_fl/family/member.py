"""The one family :class:`Member` every consumer takes, and the only two functions that build one.

A member is a transformers causal LM (``LlamaForCausalLM`` / ``Qwen2ForCausalLM``) plus what the rest
of aiflow-fl needs to know about it (paper §III-B):

* ``kind`` — ``full`` (the backbone), ``eesb`` (early exit + a private low-rank *branch* layer),
  ``exit`` (plain early exit: first ``exit_layer`` layers, shared final norm and LM head; the paper's
  direct-head baseline) or ``hpcd`` (every linear as residual low-rank components);
* ``exit_layer`` — decoder layers it runs before its branch / final norm; ``shared_layers`` — how many
  leading layers are the backbone's own, unchanged weights (so another member's hidden states at any
  layer ``e <= shared_layers`` are exactly this member's: split inference and familial reuse, §III-C);
* ``key_of(path)`` — the family-wide key a module's federated update travels under
  (:func:`aiflow_fl.family.spec.align_key`: an EESB branch gets its own ``branch.{exit}.`` namespace);
* :meth:`Member.fold` — the one way to fold a federated update (the server's base + LoRA, factors
  ``scaling · B @ A`` per key) into the member's frozen weights.

Builders (nowhere else builds a member or an early-exit model):

* :func:`load_family_member` — a member of a built family (a folder written by ``aiflow family
  build``, or a :class:`~aiflow_fl.family.family.Family` in memory);
* :func:`early_exit_member` — an early exit of a bare backbone (``exit-k``, ``eesb-i`` sized by
  ``family.budgets[i]``, ``full``) whose modules *are* the backbone's (no copy, no memory).

:func:`member_from_config` picks between them from a config (``family.dir`` built or not) and keeps a
pristine copy per process, handing out :meth:`Member.fresh_copy` so a federated round does not reload
or copy the weights.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel

from aiflow_fl.errors import AiflowError
from aiflow_fl.family.spec import MemberSpec, align_key, count_member
from aiflow_fl.layers import decoder_of

if TYPE_CHECKING:
    from aiflow_fl.aggregation.update import AdapterUpdate
    from aiflow_fl.config import AiflowConfig
    from aiflow_fl.family.family import Family


@dataclass(eq=False)
class Member:
    """One family member: its causal LM, what it is (``spec``) and its tokenizer (module docstring)."""

    model: PreTrainedModel
    spec: MemberSpec
    tokenizer: Any = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        """``full`` | ``eesb`` | ``exit`` | ``hpcd``."""
        return self.spec.kind

    @property
    def num_layers(self) -> int:
        """Decoder layers of :attr:`model` (an EESB member's branch included)."""
        return int(self.model.config.num_hidden_layers)

    @property
    def exit_layer(self) -> int:
        """Decoder layers run before the branch / final norm (an EESB branch sits at this index)."""
        return self.spec.exit if self.kind in ("eesb", "exit") else self.num_layers

    @property
    def branch(self) -> bool:
        """Layer ``exit_layer`` of :attr:`model` is a private EESB branch."""
        return self.kind == "eesb"

    @property
    def shared_layers(self) -> int:
        """Leading decoder layers identical to the backbone's (HPCD: none; full: all)."""
        return self.spec.shared_layers(self.num_layers)

    @property
    def resume_layers(self) -> range:
        """Layers this member can start at from another member's hidden states (split inference):
        ``0..shared_layers``, since the layers below the entry must be the backbone's own."""
        return range(0, self.shared_layers + 1)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def max_context(self) -> int:
        """Longest sequence (prompt + generated tokens) the config allows: ``max_position_embeddings``."""
        return int(self.model.config.max_position_embeddings)

    def key_of(self, module_path: str) -> str:
        """Family-wide key of a module path of this member (peft's ``base_model.model.`` prefix accepted)."""
        return align_key(self.spec, module_path)

    @torch.no_grad()
    def fold(self, update: AdapterUpdate) -> int:
        """W0 ← W0 + scaling · B @ A for every key of ``update`` this member has; returns how many.

        Keys of modules the member lacks are skipped: the server's base is family-wide (a node it has
        not heard from yet gets every key) and a shallow member applies the part it has. A plain
        linear gets a *new* weight tensor (never an in-place add: the frozen weights may be shared
        with the process's pristine copy, see :meth:`fresh_copy`); a module whose weight is not a
        writable parameter (a decomposed family linear) gets the update as a frozen forward hook
        ``y += x ΔWᵀ``. Raises ValueError on a factor of the wrong shape.
        """
        paths = {self.key_of(name): name for name, module in self.model.named_modules() if isinstance(module, nn.Linear)}
        folded = 0
        for key, factors in update.layers.items():
            if key not in paths:
                continue
            folded += 1
            module = self.model.get_submodule(paths[key])
            delta = factors.delta()
            if tuple(delta.shape) != (module.out_features, module.in_features):
                raise ValueError(f"base update of {key} has shape {tuple(delta.shape)}, the module is {(module.out_features, module.in_features)}")
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter):
                module.weight = nn.Parameter(weight.detach() + delta.to(weight.dtype), requires_grad=weight.requires_grad)
            else:
                frozen = delta.detach().clone()
                module.register_forward_hook(lambda mod, inp, out, d=frozen: out + inp[0] @ d.to(out.dtype).T)
        return folded

    def fresh_copy(self) -> Member:
        """A copy with its own module tree (LoRA injection and hooks stay in it) whose frozen weights are
        this member's tensors, not copies of them (a device round does not copy the whole model:
        ~0.4 s and 0.5 GB for SmolLM2). Safe because nothing writes into frozen weights in place
        (:meth:`fold` gives a module a new tensor). Each parameter gets a new ``Parameter`` object
        (``module.to(...)`` on the copy replaces its data only); tied parameters stay tied."""
        memo: dict[int, object] = {}
        for param in self.model.parameters():
            memo[id(param)] = nn.Parameter(param.data, requires_grad=param.requires_grad)
        for buffer in self.model.buffers():
            memo[id(buffer)] = buffer
        return Member(copy.deepcopy(self.model, memo), copy.deepcopy(self.spec), self.tokenizer)


# ----------------------------------------------------------------------------------------------------
# Builder 1: a member of a built family
# ----------------------------------------------------------------------------------------------------


def load_family_member(source: str | Path | Family, name: str, dtype: torch.dtype | None = None) -> Member:
    """Member ``name`` of a family: a folder (``aiflow family build``; only the tensors and partial-branch
    slices this member uses are read) or a :class:`~aiflow_fl.family.family.Family` in memory (the
    member then uses the family's tensors themselves: training it trains the family)."""
    from aiflow_fl.family.family import Family, read_member

    if isinstance(source, Family):
        spec = source.spec(name)
        return Member(source.build(spec, share=True, dtype=dtype).eval(), copy.deepcopy(spec), source.tokenizer)
    model, tokenizer, spec = read_member(Path(source), name, dtype)
    return Member(model.eval(), spec, tokenizer)


# ----------------------------------------------------------------------------------------------------
# Builder 2: an early exit of a bare backbone
# ----------------------------------------------------------------------------------------------------


def exit_layers(name: str, total_layers: int, budgets: Sequence[float]) -> int:
    """Decoder layers the backbone early exit ``name`` keeps: ``full`` -> all, ``exit-k`` -> k,
    ``eesb-i`` -> ``round(budgets[i] · L)`` (at least 1): the budgets a family would use, without a branch."""
    if name == "full":
        return total_layers
    match = re.fullmatch(r"(eesb|exit)-(\d+)", name)
    if match is None:
        raise AiflowError(
            f"Member '{name}' is not a known member name. Without a built family (family.dir) members are "
            f"'eesb-i' (i < {len(budgets)}, a fraction family.budgets[i] of the layers), 'exit-k' "
            f"(1 <= k <= {total_layers}) or 'full'."
        )
    kind, number = match.group(1), int(match.group(2))
    if kind == "eesb":
        if number >= len(budgets):
            raise AiflowError(f"Member '{name}': family.budgets has {len(budgets)} entries, so i must be < {len(budgets)}.")
        return max(1, min(total_layers, round(budgets[number] * total_layers)))
    if not 1 <= number <= total_layers:
        raise AiflowError(
            f"Member '{name}': exit layer {number} is outside 1..{total_layers} (the backbone has {total_layers} decoder layers)."
        )
    return number


def _shared_prefix_model(backbone: PreTrainedModel, exit_layer: int) -> PreTrainedModel:
    """A standalone causal LM = the backbone's first ``exit_layer`` layers + its norm and head, the
    modules *shared* with the backbone (built on the meta device, then the real modules put in)."""
    from aiflow_fl.family.spec import member_config

    config = member_config(backbone.config, exit_layer)
    with torch.device("meta"):
        model = type(backbone)(config)
    inner, source = decoder_of(model), decoder_of(backbone)
    inner.embed_tokens = source.embed_tokens
    inner.layers = nn.ModuleList(list(source.layers[:exit_layer]))
    inner.norm = source.norm
    inner.rotary_emb = source.rotary_emb
    model.lm_head = backbone.lm_head
    model.generation_config = copy.deepcopy(backbone.generation_config)
    return model.eval()


def early_exit_member(backbone: PreTrainedModel, name: str, tokenizer: Any = None, budgets: Sequence[float] = ()) -> Member:
    """The early exit ``name`` (``full``, ``exit-k``, ``eesb-i`` by ``budgets``; see :func:`exit_layers`)
    of ``backbone``: its first k decoder layers, then the shared final norm and LM head (paper §III-A2
    without a branch; LayerSkip's early exit). Its modules are the backbone's (no copy), so it is the
    same draft transformers' ``generate(assistant_model=...)`` would get. Module paths stay the
    backbone's, so its update keys are the paths themselves (a shallow member just has fewer)."""
    total = int(backbone.config.num_hidden_layers)
    k = exit_layers(name, total, budgets)
    model = backbone if k == total else _shared_prefix_model(backbone, k)
    spec = MemberSpec(name, "full" if k == total else "exit", exit=k)
    spec.num_parameters, spec.num_bytes, spec.block_parameters = count_member(model)
    return Member(model, spec, tokenizer)


def early_exit_members(backbone: PreTrainedModel, exits: Sequence[int], tokenizer: Any = None) -> list[Member]:
    """:func:`early_exit_member` ``exit-k`` for each k in ``exits`` (strictly increasing), then ``full``."""
    total = int(backbone.config.num_hidden_layers)
    if sorted(set(exits)) != list(exits) or any(not 1 <= k < total for k in exits):
        raise AiflowError(f"Exits {list(exits)} must be strictly increasing layer counts within 1..{total - 1}.")
    return [early_exit_member(backbone, f"exit-{k}", tokenizer) for k in exits] + [early_exit_member(backbone, "full", tokenizer)]


# ----------------------------------------------------------------------------------------------------
# Which builder a config means, with a pristine copy per process
# ----------------------------------------------------------------------------------------------------


_PRISTINE: dict[tuple[str, str, str, str], Member] = {}
_MAX_CACHED = 3  # a device uses one member, the server a few: bound memory


def family_built(cfg: AiflowConfig) -> bool:
    """``family.dir`` holds a built family (else members are early exits of ``model.name``)."""
    return (Path(cfg.family.dir) / "family.json").is_file()


def member_from_config(cfg: AiflowConfig, name: str) -> Member:
    """A :meth:`~Member.fresh_copy` of member ``name`` with frozen weights as built: from the family in
    ``family.dir`` when one is built, else the early exit ``name`` of ``model.name`` (dtype
    ``model.dtype``). The pristine member is cached per process."""
    built = family_built(cfg)
    key = (cfg.model.name, cfg.model.dtype, str(cfg.family.dir) if built else "", name)
    if key not in _PRISTINE:
        if len(_PRISTINE) >= _MAX_CACHED:
            _PRISTINE.pop(next(iter(_PRISTINE)))
        dtype = getattr(torch, cfg.model.dtype)
        if built:
            member = load_family_member(cfg.family.dir, name, dtype=dtype)
        else:
            from aiflow_fl.models import load_backbone

            loaded = load_backbone(cfg.model.name, dtype=dtype)
            member = early_exit_member(loaded.model, name, loaded.tokenizer, list(cfg.family.budgets))
        member.model.requires_grad_(False)
        _PRISTINE[key] = member
    return _PRISTINE[key].fresh_copy()

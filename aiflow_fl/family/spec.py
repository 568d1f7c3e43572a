"""What each family member is (``MemberSpec``), how its module tree is assembled, and its alignment keys.

The object every consumer takes is :class:`aiflow_fl.family.member.Member` (model + spec + tokenizer);
this module is the description and assembly underneath it. A member IS a transformers causal LM (``LlamaForCausalLM`` / ``Qwen2ForCausalLM``) with fewer or
low-rank layers, so ``forward(labels=...)``, ``generate`` with its KV cache, and peft work unchanged.

Kinds (paper §III-B):

* ``full``  — the backbone.
* ``eesb``  — early exit with a scalable branch: the backbone's first ``exit`` decoder layers
  (identical weights), then a *branch* = a copy of decoder layer ``exit`` (0-based) whose linears are
  whitened-SVD factorized at ``ratio``, then the shared final norm and LM head. The member's
  ``config.num_hidden_layers`` is ``exit + 1``; the branch sits at index ``exit`` (so it uses KV-cache
  slot ``exit``). A member whose ratio is below its stored branch's uses a prefix of the factors
  (a partial branch).
* ``exit``  — a plain early exit (the paper's direct-head baseline): the first ``exit`` layers, then
  the final norm and LM head.
* ``hpcd``  — every decoder linear as the sum of the first ``components`` residual low-rank
  components (each of parameter ratio ``ratio``); norms and embeddings are the backbone's.

Alignment keys (:func:`align_key`): a family-wide name for a module, used to merge updates of
different members. Shared layers keep the backbone's path (``model.layers.3.self_attn.q_proj``). An
EESB branch is a different function from the real layer at the same index, so it gets its own
namespace ``branch.{exit}.self_attn.q_proj`` and is never merged with the real layer of a deeper
member (branches of the same exit, partial or not, do merge). HPCD members keep the backbone's paths:
every HPCD linear approximates the same backbone weight in the same input/output space, so a LoRA
update ΔW learned on top of it is a valid update of that weight in every member.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from aiflow_fl.errors import AiflowError
from aiflow_fl.family.svd import DecomposedLinear, rank_for_ratio
from aiflow_fl.models import SUPPORTED_ARCHITECTURES

KINDS = ("full", "eesb", "exit", "hpcd")
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LAYER_PATH = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_BRANCH_KEY = re.compile(r"^branch\.(\d+)\.(.+)$")
_PEFT_PREFIX = "base_model.model."


@dataclass
class MemberSpec:
    """One member of a family. ``exit``: shared backbone layers (eesb/exit); ``components``: k (hpcd)."""

    name: str
    kind: str
    exit: int = 0
    ratio: float = 1.0
    components: int = 0
    num_parameters: int = 0
    num_bytes: int = 0
    block_parameters: int = 0  # parameters inside decoder layers (branch included)

    @property
    def num_layers(self) -> int:
        """``config.num_hidden_layers`` of the member (set by :func:`skeleton`)."""
        return self.exit + 1 if self.kind == "eesb" else self.exit

    def shared_layers(self, backbone_layers: int) -> int:
        """How many leading decoder layers are the backbone's own, unchanged weights."""
        if self.kind in ("eesb", "exit"):
            return self.exit
        return backbone_layers if self.kind == "full" else 0

    def to_dict(self) -> dict:
        return asdict(self)


def check_architecture_config(config: PretrainedConfig) -> None:
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise AiflowError(
            f"Unsupported architecture '{model_type}': families are built from "
            f"{' or '.join(SUPPORTED_ARCHITECTURES)} causal LMs (decoder layers with q/k/v/o and gate/up/down "
            "projections)."
        )


def check_exit(exit_layer: int, num_layers: int, kind: str = "eesb") -> int:
    top = num_layers - 1 if kind == "eesb" else num_layers
    if not isinstance(exit_layer, int) or not 0 <= exit_layer <= top:
        raise AiflowError(
            f"Exit layer {exit_layer!r} is outside the allowed range 0..{top} for a {num_layers}-layer backbone "
            f"({'the branch copies decoder layer `exit`, so it must exist' if kind == 'eesb' else 'layers kept by the early exit'})."
        )
    return exit_layer


def member_config(config: PretrainedConfig, num_layers: int) -> PretrainedConfig:
    """The backbone's config cut to ``num_layers`` decoder layers (per-layer lists cut too)."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = num_layers
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:num_layers]
    return cfg


def skeleton(config: PretrainedConfig, spec: MemberSpec, ranks: Mapping[str, list[int]]) -> PreTrainedModel:
    """The member's module tree on the meta device (no memory): right layers, DecomposedLinear where
    ``ranks[module path]`` gives component ranks. Fill it with :func:`fill`."""
    check_architecture_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(member_config(config, spec.num_layers))
        for path, comp_ranks in ranks.items():
            parent_path, child = path.rsplit(".", 1)
            parent = model.get_submodule(parent_path)
            old = getattr(parent, child)
            setattr(parent, child, DecomposedLinear(old.in_features, old.out_features, comp_ranks, bias=old.bias is not None))
    return model


def fill(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load ``tensors`` (the member's full state dict) into a meta skeleton; check nothing is missing,
    extra or misshapen (AiflowError), tie embeddings, rebuild the rotary buffers, set eval mode."""
    expected = {k: v for k, v in model.state_dict().items()}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    needed = set(expected) - ({"lm_head.weight"} if tied else set())
    missing = sorted(needed - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AiflowError(
            f"The tensors for this member do not match its structure: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {extra[:5]}{' …' if len(extra) > 5 else ''}. "
            "The family folder is incomplete or from another version; rebuild it with `aiflow family build`."
        )
    for key in needed:
        if tuple(tensors[key].shape) != tuple(expected[key].shape):
            raise AiflowError(
                f"Tensor '{key}' has shape {tuple(tensors[key].shape)} but this member needs "
                f"{tuple(expected[key].shape)}; the family folder is corrupt or mismatched — rebuild it."
            )
    state = {k: (tensors[k].to(dtype) if dtype is not None and tensors[k].is_floating_point() else tensors[k]) for k in needed}
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)  # buffers built on the CPU, not meta
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise AiflowError(f"Member assembly left tensors unset: {left[:5]}; the family folder is incomplete.")
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Alignment keys
# ----------------------------------------------------------------------------------------------------


def _strip(module_path: str) -> str:
    return module_path[len(_PEFT_PREFIX):] if module_path.startswith(_PEFT_PREFIX) else module_path


def align_key(spec: MemberSpec, module_path: str) -> str:
    """Family-wide key of a module path inside ``spec``'s member (peft's ``base_model.model.`` prefix
    is accepted). Shared layers and HPCD linears keep the backbone path; an EESB branch layer becomes
    ``branch.{exit}.<rest>``."""
    path = _strip(module_path)
    match = _LAYER_PATH.match(path)
    if spec.kind == "eesb" and match and int(match.group(1)) == spec.exit:
        return f"branch.{spec.exit}.{match.group(2)}"
    return path


def module_path(spec: MemberSpec, key: str, backbone_layers: int) -> str | None:
    """Inverse of :func:`align_key`: the module path in ``spec``'s member, or None if it has none."""
    branch = _BRANCH_KEY.match(key)
    if branch:
        exit_layer = int(branch.group(1))
        return f"model.layers.{exit_layer}.{branch.group(2)}" if spec.kind == "eesb" and spec.exit == exit_layer else None
    match = _LAYER_PATH.match(key)
    if match:
        index = int(match.group(1))
        if spec.kind in ("full", "hpcd"):
            return key if index < backbone_layers else None
        return key if index < spec.exit else None
    return key


# ----------------------------------------------------------------------------------------------------
# Where each member tensor lives in the family's store
# ----------------------------------------------------------------------------------------------------


_SHAPES: dict[str, dict[str, tuple[int, int, bool]]] = {}


def linear_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int, bool]]:
    """``{linear name in a layer: (out, in, has_bias)}`` for one decoder layer of this config."""
    key = member_config(config, 1).to_json_string()
    if key not in _SHAPES:
        _SHAPES[key] = _linear_shapes(config)
    return _SHAPES[key]


def _linear_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int, bool]]:
    with torch.device("meta"):
        layer_model = AutoModelForCausalLM.from_config(member_config(config, 1))
    layer = layer_model.model.layers[0]
    out = {}
    for name in LINEAR_NAMES:
        lin = layer.get_submodule(name)
        out[name] = (lin.out_features, lin.in_features, lin.bias is not None)
    return out


def store_keys(
    spec: MemberSpec,
    config: PretrainedConfig,
    backbone_keys: list[str],
    branch_ranks: Mapping[int, Mapping[str, int]],
    hpcd_ranks: Mapping[str, list[int]],
) -> tuple[dict[str, tuple[str, int | None, int]], dict[str, list[int]]]:
    """For a member: ``{member state key: (store key, prefix length or None, prefix dim)}`` and the
    member's DecomposedLinear ranks ``{module path: [component ranks]}``.

    ``branch_ranks[exit][linear name]`` are the stored (largest) branch ranks; a partial member keeps
    the first ``rank_for_ratio(ratio)`` of them. ``hpcd_ranks[linear path]`` are component ranks.
    """
    if spec.kind not in KINDS:
        raise AiflowError(f"Member kind '{spec.kind}' is not one of: {', '.join(KINDS)}.")
    shapes = linear_shapes(config)
    mapping: dict[str, tuple[str, int | None, int]] = {}
    ranks: dict[str, list[int]] = {}
    for key in backbone_keys:
        match = _LAYER_PATH.match(key)
        if match is None:
            mapping[key] = (key, None, 0)
            continue
        index, rest = int(match.group(1)), match.group(2)
        if spec.kind in ("eesb", "exit") and index >= spec.exit:
            continue
        if spec.kind == "hpcd":
            linear = rest.rsplit(".", 1)[0]
            path = f"model.layers.{index}.{linear}"
            if linear in shapes and rest.endswith(".weight") and path in hpcd_ranks:
                comp = hpcd_ranks[path][: spec.components]
                ranks[path] = comp
                for c in range(spec.components):
                    mapping[f"{path}.us.{c}"] = (f"hpcd.{path}.us.{c}", None, 0)
                    mapping[f"{path}.vs.{c}"] = (f"hpcd.{path}.vs.{c}", None, 0)
                continue
        mapping[key] = (key, None, 0)
    if spec.kind == "eesb":
        if spec.exit not in branch_ranks:
            raise AiflowError(f"The family has no branch at exit {spec.exit}; its branches: {sorted(branch_ranks)}.")
        for key in backbone_keys:
            match = _LAYER_PATH.match(key)
            if match is None or int(match.group(1)) != spec.exit:
                continue
            rest = match.group(2)
            linear = rest.rsplit(".", 1)[0]
            member_key = f"model.layers.{spec.exit}.{rest}"
            if linear in shapes and rest.endswith(".weight"):
                m, n, _ = shapes[linear]
                stored = branch_ranks[spec.exit][linear]
                h = min(stored, rank_for_ratio(m, n, spec.ratio))
                ranks[f"model.layers.{spec.exit}.{linear}"] = [h]
                prefix = None if h == stored else h
                mapping[f"model.layers.{spec.exit}.{linear}.us.0"] = (f"branch.{spec.exit}.{linear}.us.0", prefix, 1)
                mapping[f"model.layers.{spec.exit}.{linear}.vs.0"] = (f"branch.{spec.exit}.{linear}.vs.0", prefix, 0)
            else:
                mapping[member_key] = (f"branch.{spec.exit}.{rest}", None, 0)
    return mapping, ranks


def take(tensor: torch.Tensor, prefix: int | None, dim: int) -> torch.Tensor:
    """A prefix along ``dim`` (a partial branch's factors) or the tensor itself."""
    if prefix is None:
        return tensor
    return tensor[:, :prefix] if dim == 1 else tensor[:prefix]


def count_member(model: nn.Module) -> tuple[int, int, int]:
    """(parameters, bytes, block parameters) of a member (works on meta skeletons; ties counted once)."""
    seen: set[int] = set()
    params = nbytes = blocks = 0
    block_ids = {id(p) for p in model.model.layers.parameters()}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel()
        nbytes += p.numel() * p.element_size()
        if id(p) in block_ids:
            blocks += p.numel()
    return params, nbytes, blocks

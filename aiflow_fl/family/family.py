"""A family: the backbone's tensors + EESB branches + HPCD components, its members, and its folder.

Folder format (written to a temporary folder next to the target, then renamed into place)::

    family.json          format, backbone name, members (MemberSpec fields), branch ranks per exit,
                         HPCD component ranks per linear, calibration/build info
    tensors.safetensors  one file, keys namespaced:
                           model.…            the backbone's own tensors (lm_head only if untied)
                           branch.{exit}.…    an EESB branch: decomposed copy of decoder layer `exit`
                                              (linears as ``…q_proj.us.0`` / ``…q_proj.vs.0``)
                           hpcd.model.layers.{i}.….us.{c} / .vs.{c}   HPCD component c of a linear
    config.json, tokenizer files   the backbone's
    sha256.json          the SHA-256 of every other file (written last, inside the same atomic rename)

Every read (:func:`describe_folder`, :func:`read_member`, :func:`load_family`: so ``aiflow family info``,
``eval``, ``generate``, ``serve`` and the clients) first checks the files against ``sha256.json`` and
refuses a truncated, corrupted or hand-edited folder with one paragraph naming the file and what to
rebuild (:func:`verify_folder`; once per process while the files' size and mtime stay the same).

:func:`read_member` (behind :func:`aiflow_fl.family.member.load_family_member`, the one way to get a
:class:`~aiflow_fl.family.member.Member` of a folder) opens the safetensors file and reads only the keys
(and, for a partial branch, only the prefix slices) that one member uses: what a device would download.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel

from aiflow_fl.errors import AiflowError
from aiflow_fl.files import apply_user_mode, manifest_mismatches, temp_dir_beside, write_manifest
from aiflow_fl.family.batches import calibration_batches
from aiflow_fl.family.budget import budget_from_fraction, exit_and_ratio, explicit_eesb, size_model
from aiflow_fl.family.spec import (
    _LAYER_PATH,
    LINEAR_NAMES,
    MemberSpec,
    check_architecture_config,
    check_exit,
    count_member,
    fill,
    skeleton,
    store_keys,
    take,
)
from aiflow_fl.family.svd import calibrate, check_ratio, factorize, rank_for_ratio, residual_components

FORMAT = 1
DESCRIPTION = "family.json"
TENSORS = "tensors.safetensors"
MANIFEST = "sha256.json"


@dataclass
class Family:
    """Everything needed to build any member, in memory."""

    config: PretrainedConfig
    tokenizer: Any
    tensors: dict[str, torch.Tensor]
    members: dict[str, MemberSpec] = field(default_factory=dict)
    branch_ranks: dict[int, dict[str, int]] = field(default_factory=dict)  # exit -> linear -> stored rank
    hpcd_ranks: dict[str, list[int]] = field(default_factory=dict)  # linear path -> component ranks
    info: dict[str, Any] = field(default_factory=dict)
    # Calibration Gram matrices of the build (not saved): progressive HPCD training re-factorizes
    # residuals with them.
    grams: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def backbone_keys(self) -> list[str]:
        return sorted(k for k in self.tensors if k.startswith("model.") or k == "lm_head.weight")

    def spec(self, name: str) -> MemberSpec:
        if name not in self.members:
            raise AiflowError(f"The family has no member '{name}'. Its members: {', '.join(self.members)}.")
        return self.members[name]

    def add(self, spec: MemberSpec) -> MemberSpec:
        """Register a member (its parameter counts are computed from its structure)."""
        _, ranks = store_keys(spec, self.config, self.backbone_keys, self.branch_ranks, self.hpcd_ranks)
        spec.num_parameters, spec.num_bytes, spec.block_parameters = count_member(skeleton(self.config, spec, ranks))
        self.members[spec.name] = spec
        return spec

    def build(self, name_or_spec: str | MemberSpec, share: bool = False, dtype: torch.dtype | None = None) -> PreTrainedModel:
        """The member as a transformers causal LM. ``share=True`` uses the family's tensors themselves
        (training a member then trains the family); otherwise the member owns copies."""
        spec = self.spec(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
        mapping, ranks = store_keys(spec, self.config, self.backbone_keys, self.branch_ranks, self.hpcd_ranks)
        missing = sorted({store for store, _, _ in mapping.values()} - set(self.tensors))
        if missing:
            raise AiflowError(f"Member '{spec.name}' needs tensors the family lacks: {missing[:5]}.")
        tensors = {}
        for key, (store, prefix, dim) in mapping.items():
            t = take(self.tensors[store], prefix, dim)
            tensors[key] = t if share and prefix is None else t.detach().clone()
        return fill(skeleton(self.config, spec, ranks), tensors, dtype)

    def describe(self) -> list[dict[str, Any]]:
        full = self.members.get("full") or self.add(MemberSpec("full", "full", exit=self.config.num_hidden_layers))
        rows = []
        for spec in self.members.values():
            row = spec.to_dict()
            row["params_fraction"] = spec.num_parameters / full.num_parameters
            row["block_params_fraction"] = spec.block_parameters / full.block_parameters
            rows.append(row)
        return rows

    def save(self, folder: str | Path) -> Path:
        """Write the family folder atomically: a temp folder beside it, then rename."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tmp = temp_dir_beside(folder)
        try:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
            save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt", "aiflow_family": str(FORMAT)})
            self.config.save_pretrained(tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            description = {
                "format": FORMAT,
                "backbone": getattr(self.config, "name_or_path", "") or self.info.get("backbone", ""),
                "num_layers": self.config.num_hidden_layers,
                "members": [s.to_dict() for s in self.members.values()],
                "branch_ranks": {str(k): v for k, v in self.branch_ranks.items()},
                "hpcd_ranks": self.hpcd_ranks,
                "backbone_keys": self.backbone_keys,
                "info": self.info,
            }
            (tmp / DESCRIPTION).write_text(json.dumps(description, indent=1))
            apply_user_mode(tmp)
            seal_folder(tmp)
            old = None
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
                folder.rename(old)
            tmp.rename(folder)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return folder


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def seal_folder(folder: str | Path) -> None:
    """Record the SHA-256 of the folder's files as they are now in ``sha256.json`` (:meth:`Family.save`
    does it; call it yourself only after assembling a folder by hand, e.g. a device's partial download)."""
    folder = Path(folder)
    write_manifest(folder, [p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST], MANIFEST)


_VERIFIED: dict[Path, tuple] = {}  # folder -> (name, size, mtime_ns) of its files when they last matched


def _fingerprint(folder: Path) -> tuple:
    return tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in folder.iterdir() if p.is_file() for st in [p.stat()]))


def verify_folder(folder: str | Path) -> None:
    """Check every file of the family folder against its ``sha256.json`` (AiflowError naming the file
    and what to rebuild otherwise)."""
    folder = Path(folder).resolve()
    fingerprint = _fingerprint(folder)
    if _VERIFIED.get(folder) == fingerprint:
        return
    rebuild = (f"Nothing was loaded from it. Rebuild the family with `aiflow family build family.dir={folder}` "
               "(with the same config as before), or copy the whole folder again from where it was built.")
    bad = manifest_mismatches(folder, MANIFEST)
    if bad is None:
        raise AiflowError(
            f"The family folder {folder} has no valid {MANIFEST} (the SHA-256 of its files, written when the family "
            f"is built), so its files cannot be trusted: it was built by an older aiflow-fl, or copied or edited by hand. {rebuild}"
        )
    if bad:
        names = ", ".join(bad)
        raise AiflowError(
            f"The family folder {folder} is damaged: {names} {'does' if len(bad) == 1 else 'do'} not match the SHA-256 "
            f"recorded in {folder / MANIFEST} when the family was built (the file is missing, truncated, corrupted or "
            f"was changed since). {rebuild}"
        )
    _VERIFIED[folder] = fingerprint


def _read_description(folder: Path) -> dict[str, Any]:
    path = folder / DESCRIPTION
    if not path.is_file() or not (folder / TENSORS).is_file():
        raise AiflowError(
            f"{folder} is not a family folder: it needs {DESCRIPTION} and {TENSORS}. Build one with "
            "`aiflow family build family.dir=PATH`."
        )
    verify_folder(folder)
    try:
        description = json.loads(path.read_text())
    except ValueError as exc:
        raise AiflowError(f"{path} is not valid JSON ({exc}); rebuild the family.") from None
    if description.get("format") != FORMAT:
        raise AiflowError(f"{path} has format {description.get('format')!r}; this aiflow-fl reads format {FORMAT}.")
    return description


@contextmanager
def _unreadable_tensors(folder: Path) -> Iterator[None]:
    """Turn safetensors' own errors (a file sealed while broken) into the family's clear error."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        raise AiflowError(
            f"{folder / TENSORS} cannot be read as safetensors ({exc}); the family folder is corrupt. Rebuild it with "
            f"`aiflow family build family.dir={folder}`."
        ) from None


def _specs(description: dict[str, Any]) -> dict[str, MemberSpec]:
    return {m["name"]: MemberSpec(**m) for m in description["members"]}


def describe_folder(folder: str | Path) -> dict[str, Any]:
    """family.json of a folder (members, ranks, info), validated."""
    return _read_description(Path(folder))


def read_member(folder: str | Path, name: str, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, Any, MemberSpec]:
    """``(model, tokenizer, spec)`` of one member, reading only the tensors (and slices) it uses.
    Consumers take :func:`aiflow_fl.family.member.load_family_member`, which wraps this in a Member."""
    from safetensors import safe_open

    folder = Path(folder)
    description = _read_description(folder)
    specs = _specs(description)
    if name not in specs:
        raise AiflowError(f"The family in {folder} has no member '{name}'. Its members: {', '.join(specs)}.")
    spec = specs[name]
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    branch_ranks = {int(k): v for k, v in description["branch_ranks"].items()}
    mapping, ranks = store_keys(spec, config, description["backbone_keys"], branch_ranks, description["hpcd_ranks"])
    tensors = {}
    with _unreadable_tensors(folder):
        with safe_open(str(folder / TENSORS), framework="pt") as fh:
            available = set(fh.keys())
            for key, (store, prefix, dim) in mapping.items():
                if store not in available:
                    raise AiflowError(
                        f"Member '{name}' needs tensor '{store}', which {folder / TENSORS} lacks; the family folder is "
                        "incomplete — rebuild it with `aiflow family build`."
                    )
                if prefix is None:
                    tensors[key] = fh.get_tensor(store)
                else:
                    part = fh.get_slice(store)
                    tensors[key] = part[:, :prefix] if dim == 1 else part[:prefix]
    model = fill(skeleton(config, spec, ranks), tensors, dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, spec


def load_family(folder: str | Path) -> Family:
    """The whole family in memory (for training branches or building several members)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    description = _read_description(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with _unreadable_tensors(folder):
        tensors = load_file(str(folder / TENSORS))
    family = Family(
        config=config,
        tokenizer=tokenizer,
        tensors=tensors,
        members=_specs(description),
        branch_ranks={int(k): v for k, v in description["branch_ranks"].items()},
        hpcd_ranks=description["hpcd_ranks"],
        info=description.get("info", {}),
    )
    return family


# ----------------------------------------------------------------------------------------------------
# Building a family from a backbone
# ----------------------------------------------------------------------------------------------------


def add_branch(family: Family, exit_layer: int, ratio: float, grams: dict[str, torch.Tensor] | None) -> dict[str, int]:
    """Store the EESB branch of ``exit_layer``: decoder layer ``exit_layer``'s norms copied and each
    linear factorized (whitened SVD when ``grams`` has its Gram matrix, plain SVD otherwise) at
    ``ratio``. Returns the stored ranks."""
    check_exit(exit_layer, family.config.num_hidden_layers)
    check_ratio(ratio, "branch ratio")
    prefix = f"model.layers.{exit_layer}."
    ranks = {}
    for key in [k for k in family.backbone_keys if k.startswith(prefix)]:
        rest = key[len(prefix):]
        linear = rest.rsplit(".", 1)[0]
        if linear in LINEAR_NAMES and rest.endswith(".weight"):
            weight = family.tensors[key]
            rank = rank_for_ratio(weight.shape[0], weight.shape[1], ratio)
            gram = grams.get(f"model.layers.{exit_layer}.{linear}") if grams else None
            w_u, w_v = factorize(weight, gram).factors(rank, weight.dtype)
            family.tensors[f"branch.{exit_layer}.{linear}.us.0"] = w_u
            family.tensors[f"branch.{exit_layer}.{linear}.vs.0"] = w_v
            ranks[linear] = rank
        else:
            family.tensors[f"branch.{exit_layer}.{rest}"] = family.tensors[key].detach().clone()
    family.branch_ranks[exit_layer] = ranks
    return ranks


def _is_linear_weight(key: str) -> bool:
    match = _LAYER_PATH.match(key)
    return bool(match) and key.endswith(".weight") and match.group(2)[: -len(".weight")] in LINEAR_NAMES


def add_hpcd(
    family: Family, count: int, ratio: float, grams: dict[str, torch.Tensor] | None, layers: Iterable[int] | None = None
) -> None:
    """Store ``count`` residual components (each at ``ratio``) for every decoder linear (of ``layers``;
    default all — linears of other layers stay dense in HPCD members)."""
    if not isinstance(count, int) or count < 1:
        raise AiflowError(f"family.hpcd_components is {count!r}; it must be an integer ≥ 1.")
    check_ratio(ratio, "HPCD component ratio")
    from aiflow_fl.progress import progress_bar

    wanted = None if layers is None else set(layers)
    keys = [k for k in family.backbone_keys
            if _is_linear_weight(k) and (wanted is None or int(_LAYER_PATH.match(k).group(1)) in wanted)]  # type: ignore[union-attr]
    with progress_bar(transient=True) as progress:
        task = progress.add_task("HPCD components", total=len(keys))
        for key in keys:
            path = key[: -len(".weight")]
            weight = family.tensors[key]
            rank = rank_for_ratio(weight.shape[0], weight.shape[1], ratio)
            for c, (w_u, w_v) in enumerate(residual_components(weight, grams.get(path) if grams else None, rank, count)):
                family.tensors[f"hpcd.{path}.us.{c}"] = w_u
                family.tensors[f"hpcd.{path}.vs.{c}"] = w_v
            family.hpcd_ranks[path] = [rank] * count
            progress.advance(task)


def empty_family(model: PreTrainedModel, tokenizer: Any = None) -> Family:
    """A family holding only the backbone (member 'full'); add branches/components to it."""
    check_architecture_config(model.config)
    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = {k: v.detach() for k, v in state.items() if not (tied and k == "lm_head.weight")}
    family = Family(config=model.config, tokenizer=tokenizer, tensors=tensors)
    family.add(MemberSpec("full", "full", exit=model.config.num_hidden_layers))
    return family


def family_from_backbone(
    model: PreTrainedModel,
    tokenizer: Any,
    cfg: Any,
    batches: Iterable[torch.Tensor] | None = None,
    eesb: list[tuple[int, float]] | None = None,
) -> Family:
    """Calibrate, decompose and describe a family (``cfg``: :class:`aiflow_fl.config.FamilyConfig`).

    EESB members come from ``cfg.budgets`` (fractions of the backbone's parameters -> exit and branch
    ratio, see :mod:`aiflow_fl.family.budget`) or from explicit ``eesb=[(exit, ratio), ...]``; they are
    named ``eesb-0, eesb-1, …`` from smallest to largest. Members with the same exit share one branch
    stored at the largest ratio; smaller ones use a prefix (partial branches). HPCD members
    ``hpcd-1..K`` when ``cfg.kind`` is ``hpcd`` or ``both``.
    """
    start = time.perf_counter()
    family = empty_family(model, tokenizer)
    sizes = size_model(model.config)
    kinds = {"eesb": ["eesb"], "hpcd": ["hpcd"], "both": ["eesb", "hpcd"]}.get(cfg.kind)
    if kinds is None:
        raise AiflowError(f"family.kind is '{cfg.kind}'; allowed: eesb, hpcd, both.")
    pairs: list[tuple[int, float]] = []
    if eesb is None and cfg.exits:
        if len(cfg.exits) != len(cfg.ratios):
            raise AiflowError(
                f"family.exits has {len(cfg.exits)} entries but family.ratios has {len(cfg.ratios)}; give one branch "
                "ratio in (0, 1] per exit layer."
            )
        eesb = list(zip(cfg.exits, cfg.ratios))
    if "eesb" in kinds:
        if eesb is not None:
            pairs = [explicit_eesb(sizes, e, r) for e, r in eesb]
        else:
            pairs = [exit_and_ratio(sizes, budget_from_fraction(sizes, b)) for b in cfg.budgets]
        pairs.sort(key=lambda p: sizes.eesb(*p))
    exits = sorted({e for e, _ in pairs})
    layers = list(range(model.config.num_hidden_layers)) if "hpcd" in kinds else exits
    grams = None
    if cfg.whitening and layers:
        if batches is None:
            batches = calibration_batches(tokenizer, cfg.calibration_samples, cfg.calibration_seq_len)
        batches = list(batches)
        grams = calibrate(model, batches, layers=layers, total=len(batches))
    family.grams = grams
    for exit_layer in exits:
        add_branch(family, exit_layer, max(r for e, r in pairs if e == exit_layer), grams)
    for i, (exit_layer, ratio) in enumerate(pairs):
        family.add(MemberSpec(f"eesb-{i}", "eesb", exit=exit_layer, ratio=ratio))
    if "hpcd" in kinds:
        add_hpcd(family, cfg.hpcd_components, cfg.hpcd_ratio, grams)
        for k in range(1, cfg.hpcd_components + 1):
            family.add(MemberSpec(f"hpcd-{k}", "hpcd", exit=model.config.num_hidden_layers, ratio=cfg.hpcd_ratio, components=k))
    family.info.update({
        "whitening": bool(cfg.whitening),
        "calibration_sequences": sum(int(b.shape[0]) for b in batches) if grams is not None and batches is not None else 0,
        "build_s": round(time.perf_counter() - start, 2),
        "backbone": getattr(model.config, "name_or_path", ""),
    })
    return family


def head_member(family: Family, exit_layer: int) -> MemberSpec:
    """Register the direct-head baseline at ``exit_layer`` (first ``exit_layer`` layers + norm + head):
    the family's ``exit-{exit_layer}`` member, the same kind ``exit`` as a backbone's early exit
    (:func:`aiflow_fl.family.member.early_exit_member`); build it with ``load_family_member``."""
    check_exit(exit_layer, family.config.num_hidden_layers, kind="exit")
    spec = MemberSpec(f"exit-{exit_layer}", "exit", exit=exit_layer)
    return family.add(spec)

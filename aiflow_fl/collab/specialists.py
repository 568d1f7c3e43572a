"""Specialists out of the federation: one per edge (cloud base + that edge's own merged adapter), saved with the run.

A hierarchical run whose edges each hold one domain yields, besides the cloud model, one specialist
per edge. At the end of the last cloud round the edge's devices hold ``W0 + B_cloud + Δ_edge``: the
cloud's cumulative base at the start of that round plus everything the edge merged in it (its
accumulated bases and its final adapter, exactly — not truncated to ``hierarchy.edge_rank``). That
is the specialist; the general (server) member is the cloud's merged model. Layout::

    RUN_DIR/specialists/
      general/   specialist.json  adapter.safetensors     the cloud model (role "general")
      edge-0/    specialist.json  adapter.safetensors     edge 0's specialist (role "specialist")
      ...

``specialist.json``: ``name``, ``role``, ``member`` (the family member to fold the adapter into),
``description``, ``description_source`` (``config`` or ``derived``), ``utterances`` (extra router
examples), ``domains`` (chunks per domain label), ``num_examples``. ``adapter.safetensors``: factors
keyed ``<family key>::A|B|scaling`` (the protocol's record layout).

**Descriptions.** ``collab.descriptions[i]`` (config) describes edge i. Otherwise it is *derived from
the edge's training data* by :func:`derive_description`: the domain labels of its chunks, the 12
words most over-represented in its text relative to the other edges' text (z-scored log-odds ratio,
:func:`distinctive_words`), and — as extra router utterances — 4 snippets of its training text. In this repo's
simulation the server recomputes the edge devices' partitions (deterministic from the config); in a
deployment a device would run the same pure function on its own data and send only the result.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save

from aiflow_fl.aggregation import lowrank
from aiflow_fl.aggregation.common import Layers
from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors
from aiflow_fl.errors import AiflowError
from aiflow_fl.files import atomic_write_bytes

SPECIALISTS_DIR = "specialists"
INFO_FILE, ADAPTER_FILE = "specialist.json", "adapter.safetensors"
GENERAL = "general"
_WORD = re.compile(r"[A-Za-z][A-Za-z_]{2,}")
_STOP = set("the and for with that this are from not can use used you your its has have will was were which when "
            "then than but all any each may must into also more most other such only one two see def self return "
            "none true false import class value values list str int".split())


@dataclass
class SpecialistInfo:
    """What ``specialist.json`` holds, plus the folder it came from."""

    name: str
    role: str  # "specialist" | "general"
    member: str
    description: str
    description_source: str = "config"
    utterances: list[str] = field(default_factory=list)
    domains: dict[str, int] = field(default_factory=dict)
    num_examples: int = 0
    folder: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("folder")
        return out


# ---------------------------------------------------------------------------- pure pieces
def specialist_layers(cloud_base_at_round_start: Layers, edge_delta: Layers) -> Layers:
    """The specialist's update relative to the frozen weights: cloud base + the edge's own merge (exact)."""
    return lowrank.add([cloud_base_at_round_start, edge_delta])


def distinctive_words(texts: list[str], all_texts: list[str], count: int = 12) -> list[str]:
    """Words most over-represented in ``texts`` relative to the rest of ``all_texts``.

    Ranked by the z-score of the smoothed log-odds ratio (Monroe, Colaresi & Quinn 2008, "Fightin'
    words", with a uniform add-one prior): δ_w = log((y_w+1)/(n−y_w+V−1)) − log((r_w+1)/(m−r_w+V−1)),
    z_w = δ_w / sqrt(1/(y_w+1) + 1/(r_w+1)), y counts in ``texts``, r in the rest, n and m their
    totals, V the vocabulary. Unlike the plain log-odds, the z-score does not tie every word that only
    this edge uses: frequent ones come first."""
    mine = Counter(w.lower() for t in texts for w in _WORD.findall(t))
    every = Counter(w.lower() for t in all_texts for w in _WORD.findall(t))
    rest = every - mine
    n_mine, n_rest = sum(mine.values()), sum(rest.values())
    vocab = max(1, len(every | mine))

    def z_score(word: str) -> float:
        y, r = mine[word], rest[word]
        delta = math.log((y + 1) / (n_mine - y + vocab - 1)) - math.log((r + 1) / (n_rest - r + vocab - 1))
        return delta / math.sqrt(1 / (y + 1) + 1 / (r + 1))

    candidates = [w for w, c in mine.items() if c >= 2 and w not in _STOP]
    return sorted(candidates, key=lambda w: (-z_score(w), w))[:count]


def derive_description(texts: list[str], domains: dict[str, int], all_texts: list[str], snippets: int = 4,
                       snippet_chars: int = 240) -> tuple[str, list[str]]:
    """(description, utterances) from an edge's training texts (see the module docstring)."""
    if not texts:
        raise AiflowError("Cannot derive a specialist description: the edge has no training text.")
    labels = ", ".join(d for d, _ in sorted(domains.items(), key=lambda kv: -kv[1])[:4])
    words = ", ".join(distinctive_words(texts, all_texts))
    description = f"Specialist for {labels}. Typical terms: {words}."
    step = max(1, len(texts) // snippets)
    utterances = [" ".join(texts[i].split())[:snippet_chars] for i in range(0, len(texts), step)][:snippets]
    return description, utterances


def save_adapter(path: Path, layers: Layers) -> None:
    arrays: dict[str, np.ndarray] = {}
    for key, f in layers.items():
        arrays[f"{key}::A"] = np.ascontiguousarray(f.A.detach().float().cpu().numpy())
        arrays[f"{key}::B"] = np.ascontiguousarray(f.B.detach().float().cpu().numpy())
        arrays[f"{key}::scaling"] = np.asarray([f.scaling], dtype=np.float64)
    atomic_write_bytes(path, save(arrays))


def load_adapter(path: Path) -> AdapterUpdate:
    arrays = load_file(str(path))
    layers: dict[str, LoraFactors] = {}
    for key in {k.rsplit("::", 1)[0] for k in arrays}:
        try:
            layers[key] = LoraFactors(torch.from_numpy(arrays[f"{key}::A"].copy()), torch.from_numpy(arrays[f"{key}::B"].copy()),
                                      float(arrays[f"{key}::scaling"].reshape(-1)[0]))
        except KeyError:
            raise AiflowError(f"{path}: module '{key}' lacks A, B or scaling; the adapter file is damaged.") from None
    return AdapterUpdate(layers, 0)


def write_specialist(folder: Path, info: SpecialistInfo, layers: Layers) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_adapter(folder / ADAPTER_FILE, layers)
    atomic_write_bytes(folder / INFO_FILE, json.dumps(info.to_json(), indent=1).encode())
    return folder


# ---------------------------------------------------------------------------- reading, with clear errors
def read_specialist(folder: Path) -> SpecialistInfo:
    """A specialist folder's info; an :class:`AiflowError` naming what is missing (no model is loaded)."""
    info_path = folder / INFO_FILE
    if not info_path.is_file():
        raise AiflowError(f"Specialist folder {folder} has no {INFO_FILE} (its description and member); "
                          "it was not written by a hierarchical run with specialists.")
    try:
        raw = json.loads(info_path.read_text())
    except json.JSONDecodeError as exc:
        raise AiflowError(f"{info_path} is not valid JSON ({exc.msg}).") from None
    description = str(raw.get("description", "")).strip()
    if raw.get("role", "specialist") != GENERAL and not description:
        raise AiflowError(f"Specialist folder {folder} has no description in {INFO_FILE}: the router needs one to "
                          "match queries. Give it with collab.descriptions in the run's config, or let the run derive it.")
    if not (folder / ADAPTER_FILE).is_file():
        raise AiflowError(f"Specialist folder {folder} has no {ADAPTER_FILE} (the specialist's weights update).")
    known = {f for f in SpecialistInfo.__dataclass_fields__ if f != "folder"}
    return SpecialistInfo(**{k: v for k, v in raw.items() if k in known}, folder=str(folder))


def read_run_specialists(run_dir: str | Path) -> tuple[SpecialistInfo, list[SpecialistInfo]]:
    """(general, specialists) of a run folder; clear errors for a run without them."""
    root = Path(run_dir)
    if not (root / "config.yaml").is_file():
        raise AiflowError(f"{root} is not a run folder (no config.yaml in it).")
    folder = root / SPECIALISTS_DIR
    if not folder.is_dir():
        raise AiflowError(f"Run {root} has no specialists (no {SPECIALISTS_DIR}/ folder): run a hierarchical federation "
                          "(hierarchy.enabled=true) with collab.save_specialists=true, each edge's devices on one domain.")
    infos = [read_specialist(p) for p in sorted(folder.iterdir()) if p.is_dir()]
    general = [i for i in infos if i.role == GENERAL]
    specialists = [i for i in infos if i.role != GENERAL]
    if not specialists:
        raise AiflowError(f"Run {root} has no specialists in {folder} (only {[i.name for i in infos]}).")
    if not general:
        raise AiflowError(f"Run {root} has no general member in {folder} (a folder '{GENERAL}' with role general).")
    return general[0], specialists


# ---------------------------------------------------------------------------- building agents
def load_specialist_model(cfg, info: SpecialistInfo):
    """(model, tokenizer): the member named in ``info`` with its adapter folded into its frozen weights."""
    from aiflow_fl.family.member import member_from_config

    member = member_from_config(cfg, info.member)
    member.fold(load_adapter(Path(info.folder) / ADAPTER_FILE))
    member.model.eval()
    return member.model, member.tokenizer


def local_agent_from_folder(run_dir: str, folder: str, overrides: list[str] | None = None):
    """A :class:`LocalAgent` for one specialist folder of a run (importable: a :class:`ProcessAgent` factory)."""
    from aiflow_fl.collab.agents import LocalAgent
    from aiflow_fl.config import load_config

    cfg = load_config(list(overrides or []), config_file=Path(run_dir) / "config.yaml")
    info = read_specialist(Path(folder))
    model, tokenizer = load_specialist_model(cfg, info)
    return LocalAgent(info.name, model, tokenizer)


# ---------------------------------------------------------------------------- at the end of a run
def save_run_specialists(run_dir: Path, cfg, strategy, cloud_base_at_round_start: Layers) -> list[Path]:
    """Write the general member and one specialist per edge (called by the ServerApp after the last round).

    ``strategy`` is the hierarchical :class:`strategies.base.LoraStrategy` (its ``edges``, ``profiles``,
    ``merged()``); descriptions from ``cfg.collab.descriptions`` or derived from the edges' data."""
    root = Path(run_dir) / SPECIALISTS_DIR
    members_of: dict[str, Counter] = {}
    partitions_of: dict[str, list[int]] = {}
    for profile in strategy.profiles.values():
        members_of.setdefault(profile.edge_id, Counter())[profile.member or "full"] += 1
        if getattr(profile, "partition_id", None) is not None:
            partitions_of.setdefault(profile.edge_id, []).append(int(profile.partition_id))
    edges = {e: agg for e, agg in sorted(strategy.edges.items()) if agg.active}
    texts, counts = _edge_texts(cfg, partitions_of) if any(not _given(cfg, e) for e in edges) else ({}, {})
    every_text = [t for ts in texts.values() for t in ts]
    written = []
    # The general (server) member is the cloud's model, the family's full member with the cloud's merged
    # update: it synthesizes, so it is the strongest member, not the devices' most common (small) one.
    written.append(write_specialist(root / GENERAL, SpecialistInfo(
        GENERAL, GENERAL, "full", "The cloud model: general knowledge of every domain.",
        "config", num_examples=sum(a.last.num_examples for a in edges.values())), strategy.merged()))
    for edge_id, agg in edges.items():
        given = _given(cfg, edge_id)
        if given:
            description, utterances, source = given, [], "config"
        else:
            description, utterances = derive_description(texts.get(edge_id, []), counts.get(edge_id, {}), every_text)
            source = "derived"
        info = SpecialistInfo(f"edge-{edge_id}", "specialist", members_of.get(edge_id, Counter({"full": 1})).most_common(1)[0][0],
                              description, source, utterances, counts.get(edge_id, {}), int(agg.last.num_examples))
        written.append(write_specialist(root / f"edge-{edge_id}", info, specialist_layers(cloud_base_at_round_start, agg.model_delta())))
    return written


def _given(cfg, edge_id: str) -> str:
    descriptions = list(cfg.collab.descriptions)
    try:
        index = int(edge_id)
    except ValueError:
        return ""
    return descriptions[index].strip() if 0 <= index < len(descriptions) else ""


def _edge_texts(cfg, partitions_of: dict[str, list[int]]) -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
    """Each edge's training chunks as text and its chunks per domain label (recomputed from the config)."""
    from aiflow_fl.federated.device import device_profile, load_device_data
    from aiflow_fl.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.name)
    texts: dict[str, list[str]] = {}
    counts: dict[str, dict[str, int]] = {}
    for edge_id, pids in partitions_of.items():
        for pid in sorted(set(pids)):
            profile = device_profile({"partition-id": pid, "num-partitions": cfg.federation.num_devices}, cfg)
            data = load_device_data(cfg, profile, tokenizer)
            texts.setdefault(edge_id, []).extend(tokenizer.batch_decode(data.train.input_ids, skip_special_tokens=True))
            for domain, n in data.domain_counts.items():
                counts.setdefault(edge_id, {})[domain] = counts.get(edge_id, {}).get(domain, 0) + n
    return texts, counts

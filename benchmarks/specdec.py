"""Hierarchical speculative decoding vs the last tier alone and vs transformers' assisted generation.

A family is built in memory from the embedded default (EESB members at the exits in
``serving.exits``, default 18 and 24 of 30 layers, branches by whitened SVD at ratio 0.5, no branch
training): device = the smaller member, edge = the larger, cloud = the full backbone. The same
ordinary-instruction prompts are answered greedily, in one run, side by side, by

* ``target-only``: ``generate()`` of the last tier (the full model) — also the lossless reference;
* ``hf-assisted``: ``generate(assistant_model=device member)`` (transformers' assisted generation,
  its defaults), and ``hf-assisted (draft 3)``: the same starting at our draft length 3 (heuristic
  schedule); ``speedup_vs_hf_assisted`` is against the faster of the two;
* our chains: device->cloud (2 tiers) and device->edge->cloud (3 tiers), sequential and pipelined,
  with and without familial reuse, under a zero-latency and an edge-like link.

Placement: ``seq`` rows run in one process with 2 torch threads (every tier time-shares both cores;
the baselines get the same 2 threads). ``pipe`` rows give each tier one thread pinned to its own core
(device core 0, verifier core 1), and their baseline ``target-only (1 core)`` gets one pinned thread.
Figures are medians over repetitions (configurations interleaved within each repetition, after a
warm-up). The machine is shared: read ratios within one run, not absolute tokens/s.

Returned: ``lossless``, ``speedup_vs_target``, ``speedup_vs_hf_assisted``, ``acceptance_rate``,
``mean_accepted_len``, ``tiers`` (of the fastest chain) and every row.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from aiflow_fl.bench import results_dir
from aiflow_fl.config import load_config
from aiflow_fl.generation import chat_input_ids
from aiflow_fl.models import load_backbone
from aiflow_fl.serving.build import eos_ids, local_chain
from aiflow_fl.serving.link import Link
from aiflow_fl.serving.members import Member

PROMPTS = [
    "Write a short paragraph about why sleep is important.",
    "Give three tips for learning a new language.",
    "Explain how a bicycle works.",
    "What are the main causes of climate change?",
    "Describe how to make a cup of tea.",
    "Summarize the benefits of regular exercise.",
]
# An edge-like network: device <-> edge over Wi-Fi/5G, edge <-> cloud over a metro link.
EDGE_LINK = dict(latency_ms=5.0, bandwidth_mbps=100.0, jitter_ms=1.0)
CLOUD_LINK = dict(latency_ms=20.0, bandwidth_mbps=1000.0, jitter_ms=3.0)
DRAFT_VOCAB = 8192
CONFIDENCE = 0.5  # end a draft block after a token the device gives < 50% (transformers' assistant default: 0.4)


@dataclass
class Row:
    name: str
    placement: str
    tiers: str
    link: str
    run: Callable[[torch.Tensor, int], tuple[list[int], dict]]
    tokens_per_s: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)


def build_members(backbone, tokenizer, exits: list[int], quick: bool) -> tuple[list[Member], str]:
    """device and edge EESB members of an in-memory family, and the full backbone."""
    from aiflow_fl.family.family import calibration_batches, family_from_backbone

    cfg = load_config()
    batches = calibration_batches(tokenizer, 4 if quick else 16, 128)
    family = family_from_backbone(backbone, tokenizer, cfg.family, batches=batches, eesb=[(e, 0.5) for e in exits])
    names = sorted((n for n, s in family.members.items() if s.kind == "eesb"), key=lambda n: family.members[n].exit)
    members = [Member(n, family.build(n, share=True).eval(), family.members[n].exit, branch=True) for n in names]
    layers = backbone.config.num_hidden_layers
    note = ", ".join(f"{m.name}: exit {m.exit_layer} + branch (ratio 0.5)" for m in members) + f", full: {layers} layers"
    return members + [Member("full", backbone, layers)], note


def hf_runner(model, eos: list[int], assistant=None, draft_tokens: int | None = None) -> Callable:
    """transformers' generate; with ``assistant``: assisted generation (its defaults, or a starting
    draft of ``draft_tokens`` with the heuristic schedule; its confidence stop stays at the default)."""
    if assistant is not None and draft_tokens is not None:
        assistant.generation_config.num_assistant_tokens = draft_tokens
        assistant.generation_config.num_assistant_tokens_schedule = "heuristic"

    def run(ids: torch.Tensor, n: int) -> tuple[list[int], dict]:
        if assistant is not None and draft_tokens is not None:
            assistant.generation_config.num_assistant_tokens = draft_tokens  # the heuristic mutates it
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, assistant_model=assistant,
                                 eos_token_id=eos, pad_token_id=eos[0])
        return out[0, ids.shape[1]:].tolist(), {}
    return run


def chain_runner(members: list[Member], eos: list[int], reuse: bool, pipelined: bool, edge_link: bool) -> Callable:
    names = [m.name for m in members]
    # 2 tiers: the full model plays the edge (device->edge link); 3 tiers: device->edge, edge->cloud.
    specs = [EDGE_LINK, CLOUD_LINK][: len(members) - 1]
    links = [Link(f"{low.name}->{high.name}", **(spec if edge_link else {}), seed=i)
             for i, (low, high, spec) in enumerate(zip(members, members[1:], specs))]
    chain = local_chain(members, reuse=reuse, draft_vocab=DRAFT_VOCAB, links=links, eos_token_ids=eos,
                        draft_len=3, adaptive=True, min_draft=1, max_draft=8, blocks=[1, 6][: len(members) - 1],
                        pipelined=pipelined, cores=[0, 1] if pipelined else None, confidence=CONFIDENCE)

    def run(ids: torch.Tensor, n: int) -> tuple[list[int], dict]:
        for link in links:
            link.reset_stats()
        chain.draft_len = 3
        result = chain.generate(ids, n)
        return result.tokens, result.stats

    run.names = names  # type: ignore[attr-defined]
    return run


def remote_runner(device: Member, eos: list[int], url: str) -> Callable:
    """device here (core 0) -> the full model in its own `aiflow serve` process (core 1), pipelined,
    with familial reuse: hidden states at the device's exit cross the loopback link."""
    from aiflow_fl.serving.chain import Chain
    from aiflow_fl.serving.members import LocalTier, draft_vocabulary
    from aiflow_fl.serving.server import RemoteTier

    vocab = draft_vocabulary(device.model.config.vocab_size, DRAFT_VOCAB, eos)
    link = Link("device->full(process)")
    chain = Chain([LocalTier(device, 0, vocab, draft=True), RemoteTier(url, entry=device.exit_layer, timeout_s=120)],
                  links=[link], eos_token_ids=eos, draft_len=3, adaptive=True, min_draft=1, max_draft=8,
                  pipelined=True, cores=[0, 1], confidence=CONFIDENCE)

    def run(ids: torch.Tensor, n: int) -> tuple[list[int], dict]:
        link.reset_stats()
        chain.draft_len = 3
        result = chain.generate(ids, n)
        return result.tokens, result.stats

    return run


def early_copy(model):
    """A shallow copy with its own generation config (assisted generation writes its schedule there)."""
    import copy

    twin = copy.copy(model)
    twin.generation_config = copy.deepcopy(model.generation_config)
    return twin


def _pin_main(cores: set[int] | None) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores or set(range(os.cpu_count() or 1)))


def run(quick: bool = False) -> dict[str, Any]:
    cfg = load_config()
    threads_before = torch.get_num_threads()
    torch.manual_seed(0)
    loaded = load_backbone(cfg.model.name)
    backbone, tok = loaded.model, loaded.tokenizer
    layers = backbone.config.num_hidden_layers
    exits = list(cfg.serving.exits) or [18, 24]
    members, family_note = build_members(backbone, tok, exits, quick)
    device, edge, full = members
    eos = eos_ids(backbone, tok)
    prompts = PROMPTS[:1] if quick else PROMPTS[:4]
    max_new = 16 if quick else 48
    reps = 1 if quick else 3
    inputs = [chat_input_ids(tok, p) for p in prompts]
    two, three = [device, full], [device, edge, full]
    server = None
    rows = [
        Row("target-only", "seq", "full", "-", hf_runner(backbone, eos)),
        Row("hf-assisted", "seq", "device->full", "-", hf_runner(backbone, eos, device.model)),
        Row("hf-assisted (draft 3)", "seq", "device->full", "-", hf_runner(backbone, eos, early_copy(device.model), 3)),
        Row("2-tier", "seq", "device->full", "zero", chain_runner(two, eos, True, False, False)),
        Row("3-tier", "seq", "device->edge->full", "zero", chain_runner(three, eos, True, False, False)),
        Row("2-tier edge-link", "seq", "device->full", "edge", chain_runner(two, eos, True, False, True)),
        Row("target-only (1 core)", "pipe", "full", "-", hf_runner(backbone, eos)),
        Row("2-tier pipelined", "pipe", "device->full", "zero", chain_runner(two, eos, True, True, False)),
    ]
    if not quick:
        rows[5:5] = [
            Row("2-tier no-reuse", "seq", "device->full", "zero", chain_runner(two, eos, False, False, False)),
            Row("3-tier no-reuse", "seq", "device->edge->full", "zero", chain_runner(three, eos, False, False, False)),
            Row("3-tier edge-link", "seq", "device->edge->full", "edge", chain_runner(three, eos, True, False, True)),
        ]
        rows += [
            Row("2-tier pipelined edge-link", "pipe", "device->full", "edge", chain_runner(two, eos, True, True, True)),
            Row("3-tier pipelined", "pipe", "device->edge->full", "zero", chain_runner(three, eos, True, True, False)),
            Row("2-tier pipelined no-reuse", "pipe", "device->full", "zero", chain_runner(two, eos, False, True, False)),
        ]
        if (os.cpu_count() or 1) >= 2:  # the verifier as its own process, pinned to core 1
            from aiflow_fl.serving.commands import start_server

            server, url = start_server(["--tier", "cloud", "--model", cfg.model.name, "--core", "1", "--threads", "1"], timeout_s=300)
            rows.append(Row("2-tier multi-process pipelined", "pipe", "device->full(process)", "loopback", remote_runner(device, eos, url)))

    try:
        _measure(rows, inputs, reps, max_new, threads_before)
    finally:
        if server is not None:
            from aiflow_fl.serving.commands import stop_server

            stop_server(server)
    torch.set_num_threads(threads_before)
    _pin_main(None)
    return _summarize(rows, prompts, max_new, reps, family_note)


def _placed(row: Row, threads_before: int) -> None:
    if row.placement == "pipe":
        torch.set_num_threads(1)
        _pin_main({0} if row.name.startswith("target") else None)
    else:
        torch.set_num_threads(min(2, threads_before) if threads_before > 1 else 1)
        _pin_main(None)


def _measure(rows: list[Row], inputs: list[torch.Tensor], reps: int, max_new: int, threads_before: int) -> None:
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task("specdec", total=len(rows) * (reps * len(inputs) + 1))
        for row in rows:  # warm-up: caches, allocator, first-call overheads
            _placed(row, threads_before)
            row.run(inputs[0][:, :], 4)
            progress.advance(task)
        for rep in range(reps):
            for row in rows:  # interleaved, so load changes hit every configuration alike
                _placed(row, threads_before)
                tokens, seconds, outs, stats = 0, 0.0, [], []
                for ids in inputs:
                    start = time.perf_counter()
                    out, st = row.run(ids, max_new)
                    seconds += time.perf_counter() - start
                    tokens += len(out)
                    outs.append(out)
                    stats.append(st)
                    progress.advance(task)
                row.tokens_per_s.append(tokens / seconds)
                if rep == 0:
                    row.outputs, row.stats = outs, stats


def _summarize(rows: list[Row], prompts: list[str], max_new: int, reps: int, family_note: str) -> dict[str, Any]:
    reference = rows[0].outputs
    # the faster of transformers' assisted generation settings is the one to beat
    hf_best = max(statistics.median(r.tokens_per_s) for r in rows if r.name.startswith("hf-assisted"))
    results = []
    for row in rows:
        tps = statistics.median(row.tokens_per_s)
        base = next(r for r in rows if r.name.startswith("target") and r.placement == row.placement)
        entry: dict[str, Any] = {
            "name": row.name, "placement": row.placement, "tiers": row.tiers, "link": row.link,
            "tokens_per_s": round(tps, 2), "speedup_vs_target": round(tps / statistics.median(base.tokens_per_s), 3),
            "speedup_vs_hf_assisted": round(tps / hf_best, 3),
            "lossless": row.outputs == reference,
        }
        if row.stats and row.stats[0]:
            per_tier: dict[str, dict[str, float]] = {}
            for st in row.stats:
                for t in st["tiers"][1:]:
                    agg = per_tier.setdefault(t["tier"], {"accepted": 0, "drafted": 0, "calls": 0, "produced": 0.0, "bytes_up": 0, "bytes_down": 0})
                    agg["accepted"] += t["accepted"]
                    agg["drafted"] += t["drafted"]
                    agg["calls"] += t["calls"]
                    agg["produced"] += t["mean_accepted_len"] * t["calls"]
                    agg["bytes_up"] += t["bytes_up"]
                    agg["bytes_down"] += t["bytes_down"]
            entry["per_tier"] = {
                name: {"acceptance_rate": round(a["accepted"] / max(1, a["drafted"]), 3),
                       "mean_accepted_len": round(a["produced"] / max(1, a["calls"]), 3),
                       "accepted": a["accepted"], "drafted": a["drafted"], "bytes_up": a["bytes_up"], "bytes_down": a["bytes_down"]}
                for name, a in per_tier.items()
            }
            first = next(iter(entry["per_tier"].values()))
            entry["acceptance_rate"], entry["mean_accepted_len"] = first["acceptance_rate"], first["mean_accepted_len"]
        results.append(entry)

    chains = [r for r in results if "per_tier" in r]
    best = max(chains, key=lambda r: r["speedup_vs_target"])
    best_seq = max((r for r in chains if r["placement"] == "seq"), key=lambda r: r["tokens_per_s"])
    summary = {
        "lossless": all(r["lossless"] for r in results),
        "speedup_vs_target": best["speedup_vs_target"],
        "speedup_vs_hf_assisted": best_seq["speedup_vs_hf_assisted"],
        "acceptance_rate": best["acceptance_rate"],
        "mean_accepted_len": best["mean_accepted_len"],
        "tiers": best["tiers"],
        "best_chain": best["name"],
        "best_sequential_chain": best_seq["name"],
        "hf_assisted_lossless": all(r["lossless"] for r in results if r["name"].startswith("hf-assisted")),
        "family": family_note,
        "draft_vocab": DRAFT_VOCAB,
        "draft_confidence": CONFIDENCE,
        "prompts": len(prompts),
        "max_new_tokens": max_new,
        "repetitions": reps,
        "placement": {"seq": "one process, 2 torch threads shared by all tiers (baselines: same 2 threads)",
                      "pipe": "device thread on core 0, verifier thread on core 1, 1 torch thread each (baseline: 1 thread on core 0)"},
        "links": {"edge": {"device->edge": EDGE_LINK, "edge->cloud": CLOUD_LINK}, "zero": "no delay"},
        "rows": results,
        "note": "shared 2-core machine loaded by other engineers: compare ratios within this run",
    }
    _report(results, summary)
    return summary


def _report(results: list[dict], summary: dict) -> None:
    table = Table(title=f"specdec: {summary['family']} (draft vocab {summary['draft_vocab']})")
    for column in ("configuration", "placement", "tiers", "link", "tokens/s", "vs target", "vs HF assisted", "acceptance", "mean acc. len", "lossless"):
        table.add_column(column)
    for r in results:
        table.add_row(r["name"], r["placement"], r["tiers"], r["link"], f"{r['tokens_per_s']:.2f}", f"{r['speedup_vs_target']:.2f}x",
                      f"{r['speedup_vs_hf_assisted']:.2f}x", str(r.get("acceptance_rate", "-")), str(r.get("mean_accepted_len", "-")),
                      "yes" if r["lossless"] else "NO")
    console = Console()
    console.print(table)
    console.print(f"placement: seq = {summary['placement']['seq']}; pipe = {summary['placement']['pipe']}")
    folder = results_dir("specdec")
    (folder / "specdec.json").write_text(json.dumps(summary, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [f"{r['name']}\n[{r['placement']}]" for r in results]
    colors = ["#888888" if "per_tier" not in r else "#2b7bba" if r["placement"] == "seq" else "#e07b39" for r in results]
    ax.bar(range(len(results)), [r["tokens_per_s"] for r in results], color=colors)
    for i, r in enumerate(results):
        ax.text(i, r["tokens_per_s"], f"{r['speedup_vs_target']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(results)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("tokens/s (median)")
    ax.set_title("Hierarchical speculative decoding (labels: speedup vs target-only of the same placement)")
    fig.tight_layout()
    fig.savefig(folder / "specdec.png", dpi=120)
    plt.close(fig)

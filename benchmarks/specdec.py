"""Hierarchical speculative decoding vs the last tier alone and vs transformers' assisted generation.

A family is built in memory from the embedded default: EESB members at the exits in
``serving.exits`` (default 4 and 12 of 30 layers), each with one full-rank decomposed branch layer
*self-distilled* (family.branch_training.data=self: KL + CE on the backbone's own greedy answers to
generic chat instructions, never the benchmark prompts; short in --quick; the trained branches are
cached per recipe in $AIFLOW_CACHE/specdec): device = the smaller member, edge = the larger, cloud =
the full backbone. The drafts' teacher-forced greedy agreement with the backbone on its answers to
the held-out benchmark prompts is reported before and after distillation. The same
ordinary-instruction prompts are answered greedily, in one run, side by side, by

* ``target-only``: ``generate()`` of the last tier (the full model) — also the lossless reference;
* ``hf-assisted``: ``generate(assistant_model=device member)`` (transformers' assisted generation,
  its defaults), and ``hf-assisted (draft 3)``: the same starting at our draft length 3 (heuristic
  schedule); ``speedup_vs_hf_assisted`` is against the faster of the two;
* our chains: device->cloud (2 tiers) and device->edge->cloud (3 tiers), sequential and pipelined,
  with and without familial reuse, under a zero-latency and an edge-like link.

Placement: ``seq`` rows run in one process with 1 torch thread (every tier time-shares it; the
baselines get the same thread; 2 threads stall on multi-row GEMMs when the cores are shared, see
SEQ_THREADS). ``pipe`` rows give each tier one thread pinned to its own core
(device core 0, verifier core 1), and their baseline ``target-only (1 core)`` gets one pinned thread.
Figures are medians over repetitions (configurations interleaved within each repetition, after a
warm-up). The machine is shared: read ratios within one run, not absolute tokens/s.

``2-tier cost-aware`` chooses each draft length from this run's measured costs and acceptance
(acceptance.best_draft_len). The *bound* section measures the forwards a chain is made of (device
draft per token, full-model verification of k positions from the device's hidden states) as ratios
to target-only's time per token, and solves for the per-token acceptance α the ≥ 2.0× target would
need under them (acceptance.required_acceptance), next to the α measured here.

Returned: ``lossless``, ``speedup_vs_target``, ``speedup_vs_hf_assisted``, ``acceptance_rate``,
``mean_accepted_len``, ``tiers`` (of the fastest chain), every row, ``draft_agreement`` and ``bound``.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from aiflow_fl.bench import results_dir
from aiflow_fl.config import load_config
from aiflow_fl.generation import chat_input_ids
from aiflow_fl.layers import use_inference_kernels
from aiflow_fl.models import load_backbone
from aiflow_fl.serving.build import eos_ids, local_chain
from aiflow_fl.serving.link import Link
from aiflow_fl.family.member import Member, early_exit_member, load_family_member

# Held-out prompts in MT-Bench's eight first-turn categories, three each, written for this benchmark:
# none is in (or on a topic of) the self-distillation instructions (aiflow_fl/family/instructions.py;
# a test checks), so drafts are measured on ordinary use they were never trained on.
PROMPT_CATEGORIES = {
    "writing": ["Write a short paragraph about why sleep is important.",
                "Compose a product description for a reusable water bottle.",
                "Draft a thank-you note to a neighbour who watered my plants."],
    "roleplay": ["Pretend you are a tour guide in an old castle and welcome the visitors.",
                 "You are a football coach at half time and your team is losing. Give a speech.",
                 "Act as a librarian and recommend a book to a teenager who dislikes reading."],
    "reasoning": ["If all cats are animals and some animals are black, are some cats black? Explain.",
                  "A farmer has 17 sheep and all but 9 run away. How many are left? Explain your answer.",
                  "Why might a tall building sway slightly in strong wind?"],
    "math": ["What is 15 percent of 240? Show the steps.",
             "Solve for x: 3x + 7 = 22.",
             "A train travels 180 km in 2 hours. What is its average speed?"],
    "coding": ["Write a Python function that checks whether a string is a palindrome.",
               "Explain what a for loop does in Python with a small example.",
               "How do I reverse a list in Python?"],
    "extraction": ["Extract the names of the cities from this sentence: I flew from Paris to Tokyo and then took a train to Kyoto.",
                   "Summarize in one sentence: The meeting was moved from Monday to Wednesday because the manager was travelling.",
                   "List the numbers that appear in this text: The shop sold 12 apples, 7 pears and 30 plums."],
    "stem": ["Explain how a bicycle works.",
             "What are the main causes of climate change?",
             "Why does ice float on water?"],
    "humanities": ["Give three tips for learning a new language.",
                   "What was the significance of the Silk Road?",
                   "Describe how to make a cup of tea."],
}
PROMPTS = [p for group in PROMPT_CATEGORIES.values() for p in group]
QUICK_PROMPTS = [PROMPT_CATEGORIES["writing"][0], PROMPT_CATEGORIES["coding"][0]]
# An edge-like network: device <-> edge over Wi-Fi/5G, edge <-> cloud over a metro link.
EDGE_LINK = dict(latency_ms=5.0, bandwidth_mbps=100.0, jitter_ms=1.0)
CLOUD_LINK = dict(latency_ms=20.0, bandwidth_mbps=1000.0, jitter_ms=3.0)
DRAFT_VOCAB = 8192
CONFIDENCE = 0.5  # end a draft block after a token the device gives < 50% (transformers' assistant default: 0.4)
EXITS = [4, 12]  # device and edge members: exit layers of 30, each + one full-rank distilled branch layer
BRANCH_RATIO = 1.0
# Self-distillation of the branches (family.branch_training.data=self): instructions answered by the
# backbone, answer length, optimizer steps, learning rate. Cached per recipe in $AIFLOW_CACHE/specdec.
DISTILL = {"quick": {"prompts": 8, "max_new_tokens": 24, "steps": 4, "lr": 2e-3},
           "full": {"prompts": 0, "max_new_tokens": 64, "steps": 200, "lr": 2e-3}}  # 0: all ~760 instructions


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


def _threads(n: int) -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def distill_key(backbone, exits: list[int], quick: bool) -> str:
    """The cache key of a self-distilled family: backbone weights, exits, branch ratio and recipe."""
    from aiflow_fl.family.instructions import model_fingerprint

    recipe = DISTILL["quick" if quick else "full"]
    return hashlib.sha256(json.dumps([model_fingerprint(backbone), exits, BRANCH_RATIO, recipe]).encode()).hexdigest()[:16]


def distilled_family(backbone, tokenizer, exits: list[int], quick: bool):
    """An in-memory family of ``backbone`` with EESB members at ``exits`` (one full-rank branch layer each,
    ratio BRANCH_RATIO) whose branches are self-distilled with the --quick or full DISTILL recipe, or
    loaded from the cache of an earlier run with the same recipe ($AIFLOW_CACHE/specdec/family-KEY.pt).
    Returns (family, cache entry: branches, agreement before distillation, train_s, key)."""
    from aiflow_fl.family.batches import calibration_batches
    from aiflow_fl.family.family import family_from_backbone
    from aiflow_fl.family.instructions import instructions, self_answers, self_batches
    from aiflow_fl.family.train import family_drafts, greedy_agreement, train_branches
    from aiflow_fl.files import atomic_torch_save
    from aiflow_fl.models import cache_dir

    recipe = DISTILL["quick" if quick else "full"]
    cfg = load_config()
    key = distill_key(backbone, exits, quick)
    path = cache_dir() / "specdec" / f"family-{key}.pt"
    cached = torch.load(path) if path.is_file() else None
    cfg.family.whitening = cached is None  # cached branches replace the initialisation anyway
    batches = calibration_batches(tokenizer, 4 if quick else 16, 128)
    family = family_from_backbone(backbone, tokenizer, cfg.family, batches=batches, eesb=[(e, BRANCH_RATIO) for e in exits])
    if cached is None:
        held_out = self_answers(backbone, tokenizer, PROMPTS, 64, batch_size=len(PROMPTS), show_progress=False)
        before = greedy_agreement(backbone, family_drafts(family, exits), held_out)
        started = time.perf_counter()
        answers = self_answers(backbone, tokenizer, instructions(recipe["prompts"]), recipe["max_new_tokens"], batch_size=16)
        from aiflow_fl.config import BranchTrainingConfig

        tcfg = BranchTrainingConfig(steps=recipe["steps"], lr=recipe["lr"], batch_size=4, kl_weight=1.0, data="self")
        train_branches(family, self_batches(answers, tcfg.batch_size), tcfg)
        cached = {"branches": {k: v for k, v in family.tensors.items() if k.startswith("branch.")},
                  "before": before, "train_s": round(time.perf_counter() - started, 1)}
        atomic_torch_save(cached, path)
    family.tensors.update(cached["branches"])
    return family, {**cached, "key": key}


def build_members(backbone, tokenizer, exits: list[int], quick: bool) -> tuple[list[Member], str, dict[str, Any]]:
    """device and edge EESB members of an in-memory family (:func:`distilled_family`), and the full
    backbone; plus the drafts' greedy agreement with the backbone on its own answers to the held-out
    benchmark prompts, before and after distillation."""
    from aiflow_fl.family.instructions import self_answers
    from aiflow_fl.family.train import family_drafts, greedy_agreement

    recipe = DISTILL["quick" if quick else "full"]
    threads = _threads(1)  # batched GEMMs stall with 2 threads on this shared machine (see README)
    try:
        family, cached = distilled_family(backbone, tokenizer, exits, quick)
        held_out = self_answers(backbone, tokenizer, PROMPTS, 64, batch_size=len(PROMPTS), show_progress=False)
        after = greedy_agreement(backbone, family_drafts(family), held_out)
    finally:
        torch.set_num_threads(threads)
    names = sorted((n for n, s in family.members.items() if s.kind == "eesb"), key=lambda n: family.members[n].exit)
    members = [load_family_member(family, n) for n in names]
    layers = backbone.config.num_hidden_layers
    note = ", ".join(f"{m.name}: exit {m.exit_layer} + branch (ratio {BRANCH_RATIO})" for m in members) + f", full: {layers} layers"
    agreement = {
        "measured_on": f"the backbone's greedy answers (64 tokens) to the {len(PROMPTS)} held-out benchmark prompts, teacher-forced",
        "distillation": {**recipe, "data": "self (generic instructions, never the benchmark prompts)", "train_s": cached["train_s"]},
        "before": {k: round(v, 3) for k, v in cached["before"].items()},
        "after": {k: round(v, 3) for k, v in after.items()},
        "device": names[0],
    }
    return members + [early_exit_member(backbone, "full", tokenizer)], note, agreement


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


def chain_runner(members: list[Member], eos: list[int], reuse: bool, pipelined: bool, edge_link: bool,
                 cost_aware: bool = False) -> Callable:
    names = [m.name for m in members]
    # 2 tiers: the full model plays the edge (device->edge link); 3 tiers: device->edge, edge->cloud.
    specs = [EDGE_LINK, CLOUD_LINK][: len(members) - 1]
    links = [Link(f"{low.name}->{high.name}", **(spec if edge_link else {}), seed=i)
             for i, (low, high, spec) in enumerate(zip(members, members[1:], specs))]
    chain = local_chain(members, reuse=reuse, draft_vocab=DRAFT_VOCAB, links=links, eos_token_ids=eos,
                        draft_len=3, adaptive=True, min_draft=1, max_draft=8, blocks=[1, 6][: len(members) - 1],
                        pipelined=pipelined, cores=[0, 1] if pipelined else None, confidence=CONFIDENCE,
                        cost_aware=cost_aware)

    def run(ids: torch.Tensor, n: int) -> tuple[list[int], dict]:
        for link in links:
            link.reset_stats()
        chain.draft_len = 3
        result = chain.generate(ids, n)
        return result.tokens, result.stats

    run.names = names  # type: ignore[attr-defined]
    return run


def own_runner(full: Member, eos: list[int]) -> Callable:
    """The last tier alone in our own runner (a 1-tier chain: plain greedy decoding through the same
    LocalTier forwards the chains use): the baseline that isolates the speculative gain from the
    difference between our decoding loop and transformers' generate()."""
    from aiflow_fl.serving.chain import Chain
    from aiflow_fl.serving.tiers import LocalTier

    chain = Chain([LocalTier(full, 0)], eos_token_ids=eos, draft_len=1)

    def run(ids: torch.Tensor, n: int) -> tuple[list[int], dict]:
        return chain.generate(ids, n).tokens, {}

    return run


def _pin_main(cores: set[int] | None) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores or set(range(os.cpu_count() or 1)))


# The draft head's data: the backbone's answers to the everyday instructions and to the task instructions
# (coding, math, reasoning, extraction, roleplay, stem; 0: all ~760 and all 256). Measured on the held-out
# prompts' answers (teacher-forced agreement of the first draft token): everyday only, 3 epochs 0.278,
# 10 epochs 0.307; 160-token answers, 6 epochs 0.329; with the task instructions, 10 epochs 0.408.
DRAFT_HEAD = {"quick": {"instructions": 16, "tasks": 4, "max_new_tokens": 24, "epochs": 1},
              "full": {"instructions": 0, "tasks": 0, "max_new_tokens": 64, "epochs": 10}}


def head_runner(head, full: Member, eos: list[int], cost_aware: bool, draft_len: int = 3, edge_link: bool = False) -> Callable:
    """The feature-level draft head (serving.draft_head, EAGLE) drafting for the full model (from token ids);
    over an edge-like link the verdicts carry the verifier's features back (bytes counted)."""
    from aiflow_fl.serving.build import head_chain

    link = Link("head->full", **(EDGE_LINK if edge_link else {}))
    chain = head_chain(head, full, eos_token_ids=eos, draft_len=draft_len, adaptive=not cost_aware, min_draft=1,
                       max_draft=8, cost_aware=cost_aware, links=[link])

    def run(ids: torch.Tensor, n: int) -> tuple[list[int], dict]:
        chain.draft_len = draft_len
        result = chain.generate(ids, n)
        return result.tokens, result.stats

    return run


def default_runner(tiers: list[str], eos: list[int]) -> Callable:
    """Exactly what ``aiflow generate --tiers …`` builds with default settings (early exits of the
    default model, the cached draft head where one exists, cost-aware drafting)."""
    from aiflow_fl.serving.commands import build_chain

    cfg = load_config()
    chain, _ = build_chain(cfg, tiers)
    draft_len = cfg.serving.draft_len  # read once: loading the config inside the timed call cost ~60 ms a call

    def run(ids: torch.Tensor, n: int) -> tuple[list[int], dict]:
        chain.draft_len = draft_len
        result = chain.generate(ids, n)
        return result.tokens, result.stats

    run.description = " -> ".join(s.tier.name for s in chain.slots)  # type: ignore[attr-defined]
    return run


def run(quick: bool = False) -> dict[str, Any]:
    cfg = load_config()
    threads_before = torch.get_num_threads()
    torch.manual_seed(0)
    loaded = load_backbone(cfg.model.name)
    backbone, tok = loaded.model, loaded.tokenizer
    # every row, the transformers baselines included, decodes through the same kernels (layers.use_inference_kernels:
    # row-adaptive LM head, packed MLP linears; same weights): a kernel gain is not a speculative one
    use_inference_kernels(backbone)
    exits = list(cfg.serving.exits) or EXITS
    members, family_note, agreement = build_members(backbone, tok, exits, quick)
    device, edge, full = members
    eos = eos_ids(backbone, tok)
    head, head_info = build_head(backbone, tok, quick)
    prompts = QUICK_PROMPTS if quick else PROMPTS
    max_new = 16 if quick else 32
    inputs = [chat_input_ids(tok, p) for p in prompts]
    two, three = [device, full], [device, edge, full]
    rows = [
        Row("target-only", "seq", "full", "-", hf_runner(backbone, eos)),
        Row("target-only (our runner)", "seq", "full", "-", own_runner(full, eos)),
        Row("2-tier cost-aware", "seq", "device->full", "zero", chain_runner(two, eos, True, False, False, cost_aware=True)),
        Row("3-tier", "seq", "device->edge->full", "zero", chain_runner(three, eos, True, False, False)),
        Row("3-tier cost-aware", "seq", "device->edge->full", "zero", chain_runner(three, eos, False, False, False, cost_aware=True)),
        Row("2-tier head", "seq", "head->full", "zero", head_runner(head, full, eos, cost_aware=False)),
        Row("2-tier head cost-aware", "seq", "head->full", "zero", head_runner(head, full, eos, cost_aware=True)),
    ]
    defaults = {"default": ["device", "edge"], "default 3-tier": ["device", "edge", "cloud"]}
    for name, tiers in defaults.items():
        runner = default_runner(tiers, eos)
        rows.append(Row(name, "seq", runner.description, "config", runner))
    if not quick:
        rows[2:2] = [
            Row("hf-assisted", "seq", "device->full", "-", hf_runner(backbone, eos, device.model)),
            Row("2-tier", "seq", "device->full", "zero", chain_runner(two, eos, True, False, False)),
        ]
        rows += [Row("2-tier head edge-link", "seq", "head->full", "edge", head_runner(head, full, eos, cost_aware=True, edge_link=True))]
    _measure(rows, inputs, max_new, threads_before)
    _placed(rows[0], threads_before)  # the bound is measured in the placement of the seq rows
    costs = measure_costs(device, full, eos, inputs[0], reps=3 if quick else 9, max_k=4 if quick else MAX_K)
    head_costs = measure_head_costs(head, full, inputs[0], reps=3 if quick else 9, max_k=4 if quick else MAX_K)
    torch.set_num_threads(threads_before)
    _pin_main(None)
    return _summarize(rows, prompts, max_new, family_note, agreement, costs, head_costs, head_info)


def build_head(backbone, tokenizer, quick: bool) -> tuple[Any, dict[str, Any]]:
    """The feature-level draft head trained on the backbone's own answers (cached by weights + recipe),
    its training record (``train_s`` = answers + teacher features + training, measured when trained)
    and its teacher-forced agreement on the held-out benchmark prompts' answers."""
    from aiflow_fl.family.feature_draft import DraftHeadRecipe, draft_head_for, head_agreement, teacher_features
    from aiflow_fl.family.instructions import self_answers
    from aiflow_fl.serving.draft_head import find_draft_head, load_draft_head

    plan = DRAFT_HEAD["quick" if quick else "full"]
    recipe = DraftHeadRecipe(epochs=plan["epochs"])
    cached = find_draft_head(backbone) if quick else None
    if cached is not None:  # --quick measures the head the default serves (serving.draft_head=auto) when one is cached
        from safetensors import safe_open

        with safe_open(str(cached), framework="pt") as handle:
            info = {**json.loads(handle.metadata()["info"]), "cached": cached.name}
        head = load_draft_head(cached, backbone)
    else:
        head, info = draft_head_for(backbone, tokenizer, recipe, plan["instructions"], plan["max_new_tokens"], show_progress=True,
                                    tasks_count=plan["tasks"])
    threads = _threads(1)
    try:
        held = self_answers(backbone, tokenizer, PROMPTS, 64, batch_size=len(PROMPTS), show_progress=False)
        data = teacher_features(backbone, held.sequences, held.prompt_lens)
        info = {**info, "held_out_agreement": head_agreement(head, data, steps=3)}
    finally:
        torch.set_num_threads(threads)
    return head, info


def _placed(row: Row, threads_before: int) -> None:
    if row.placement == "pipe":
        torch.set_num_threads(1)
        _pin_main({0} if row.name.startswith("target") else None)
    else:  # one thread: see SEQ_THREADS
        torch.set_num_threads(SEQ_THREADS)
        _pin_main(None)


def _measure(rows: list[Row], inputs: list[torch.Tensor], max_new: int, threads_before: int) -> None:
    """Every row answers every prompt; rows are interleaved per prompt (so load changes on this
    shared machine hit all configurations alike) after one warm-up each. tokens/s of a row = its
    tokens over its seconds, summed over the prompts."""
    from rich.progress import Progress

    seconds = {row.name: 0.0 for row in rows}
    tokens = {row.name: 0 for row in rows}
    with Progress(transient=True) as progress:
        task = progress.add_task("specdec", total=len(rows) * (len(inputs) + 1))
        for row in rows:  # warm-up: caches, allocator, first-call overheads
            _placed(row, threads_before)
            row.run(inputs[0][:, :], 4)
            progress.advance(task)
        for i, ids in enumerate(inputs):
            for row in rows:
                _placed(row, threads_before)
                start = time.perf_counter()
                out, st = row.run(ids, max_new)
                seconds[row.name] += time.perf_counter() - start
                tokens[row.name] += len(out)
                row.outputs.append(out)
                row.stats.append(st)
                progress.advance(task)
            if not sys.stdout.isatty():
                print(f"specdec: prompt {i + 1}/{len(inputs)} done", flush=True)
    for row in rows:
        row.tokens_per_s = [tokens[row.name] / seconds[row.name]]


MAX_K = 8
# Sequential rows (and their baselines) get one torch thread. With two threads on this 2-core machine,
# shared with other work, every multi-row GEMM waits for a descheduled worker thread: an 8x576 @
# 576x1536 product took 0.18-8.5 ms with 2 threads vs a steady 0.25 ms with 1 (a verification of
# 7 positions up to 2.7 s), which punishes exactly the verifier's block forwards, not the baseline's.
SEQ_THREADS = 1


def median_seconds(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_costs(device: Member, full: Member, eos: list[int], ids: torch.Tensor, reps: int, max_k: int = MAX_K) -> dict[str, Any]:
    """Median seconds of the forwards a chain is made of, on this prompt's KV cache: the device
    drafting one token (its layers, branch and reduced head), the full model decoding one token
    (our layers path), and the full model verifying k device positions from the device's hidden
    states (familial reuse: layers [exit, L) + full head), k = 1..max_k."""
    from aiflow_fl.serving.tiers import LocalTier, draft_vocabulary

    vocab = draft_vocabulary(device.model.config.vocab_size, DRAFT_VOCAB, eos)
    drafter, target = LocalTier(device, 0, vocab, draft=True), LocalTier(full, 0)
    verifier = LocalTier(full, device.exit_layer)
    prompt = ids.view(-1)
    n = prompt.numel()
    verifier.process(0, hidden=drafter.process(0, tokens=prompt).hidden)
    target.process(0, tokens=prompt)
    tokens = torch.arange(100, 100 + max_k)

    def median(fn: Callable[[], Any]) -> float:
        return median_seconds(fn, reps)

    draft_s = median(lambda: drafter.process(n, tokens=tokens[:1]))  # process() crops back to n first
    target_s = median(lambda: target.process(n, tokens=tokens[:1]))
    hidden = drafter.process(n, tokens=tokens).hidden
    verify_s = [0.0] + [median(lambda k=k: verifier.process(n, hidden=hidden[:k])) for k in range(1, max_k + 1)]
    return {"draft_s": draft_s, "target_s": target_s, "verify_s": verify_s}


def measure_head_costs(head, full: Member, ids: torch.Tensor, reps: int, max_k: int = MAX_K) -> dict[str, Any]:
    """The same for the draft head: one head draft step (its layer + reduced head), the full model's
    1-token forward, and its verification of k drafts from token ids (k + 1 positions: the pending
    bonus token and the k drafts), on this prompt's caches."""
    from aiflow_fl.serving.draft_head import DraftHeadTier
    from aiflow_fl.serving.tiers import LocalTier

    drafter, target = DraftHeadTier(head), LocalTier(full, 0)
    prompt = ids.view(-1)
    n = prompt.numel()
    feats = target.process(0, tokens=prompt, want_features=True).features
    drafter.process(0, tokens=prompt, hidden=torch.cat([torch.zeros(1, feats.shape[1]), feats[:-1]]))
    tokens = torch.arange(100, 101 + max_k)

    def median(fn: Callable[[], Any]) -> float:
        return median_seconds(fn, reps)

    draft_s = median(lambda: drafter.process(n, tokens=tokens[:1], hidden=feats[-1:]))
    target_s = median(lambda: target.process(n, tokens=tokens[:1]))
    verify_s = [0.0] + [median(lambda k=k: target.process(n, tokens=tokens[:k + 1], want_features=True)) for k in range(1, max_k + 1)]
    return {"draft_s": draft_s, "target_s": target_s, "verify_s": verify_s}


def bound(costs: dict[str, Any], target_tps: float, measured_alpha: float, agreement: float, goal: float = 2.0,
          bonus: bool = False) -> dict[str, Any]:
    """What the ≥ ``goal``× target needs under the measured costs (acceptance.required_acceptance, i.i.d.
    acceptance, familial reuse: no bonus token), next to the acceptance measured in this run.

    Against two baselines: the full model's own 1-token forward (``our_runner``: the speculative gain
    alone) and target-only's measured time per token (``hf_generate``: what speedup_vs_target uses,
    which also contains the difference between generate()'s loop and ours)."""
    from aiflow_fl.serving.acceptance import best_draft_len, required_acceptance

    draft_s, verify_s = costs["draft_s"], costs["verify_s"]
    out: dict[str, Any] = {
        "goal_speedup": goal,
        "draft_s_per_token": round(draft_s, 5),
        "verify_s": {str(k): round(v, 5) for k, v in enumerate(verify_s) if k},
        "measured_acceptance_chain": measured_alpha,
        "measured_agreement_teacher_forced": round(agreement, 3),
        "model": "i.i.d. per-token acceptance α; a round of k drafts costs k·draft + V(k) and yields "
                 + ("1 + α(1 − α^k)/(1 − α) tokens (bonus token)" if bonus else "(1 − α^k)/(1 − α) tokens (no bonus: resumes from the draft's layers)"),
    }
    for name, target_s in (("our_runner", costs["target_s"]), ("hf_generate", 1.0 / target_tps)):
        needed = required_acceptance(goal, draft_s, verify_s, target_s, bonus=bonus)
        best_k, speed = best_draft_len(agreement, draft_s, verify_s, target_s, bonus=bonus, lowest=1)
        _, perfect = best_draft_len(1.0, draft_s, verify_s, target_s, bonus=bonus, lowest=1)
        out[name] = {
            "target_s_per_token": round(target_s, 5),
            "draft_over_target": round(draft_s / target_s, 3),
            "verify_k_over_target": {str(k): round(v / target_s, 3) for k, v in enumerate(verify_s) if k},
            "required_acceptance": None if needed is None else round(needed, 3),
            "predicted_speedup_at_agreement": round(speed * target_s, 3),
            "predicted_best_draft_len": best_k,
            "speedup_at_perfect_acceptance": round(perfect * target_s, 3),
        }
    return out


def _summarize(rows: list[Row], prompts: list[str], max_new: int, family_note: str, agreement: dict[str, Any],
               costs: dict[str, Any], head_costs: dict[str, Any], head_info: dict[str, Any]) -> dict[str, Any]:
    reference = rows[0].outputs
    target_tps = rows[0].tokens_per_s[0]
    hf = [r.tokens_per_s[0] for r in rows if r.name.startswith("hf-assisted")]
    own_tps = next(r for r in rows if r.name == "target-only (our runner)").tokens_per_s[0]
    results = []
    for row in rows:
        tps = row.tokens_per_s[0]
        entry: dict[str, Any] = {
            "name": row.name, "placement": row.placement, "tiers": row.tiers, "link": row.link,
            "tokens_per_s": round(tps, 2), "speedup_vs_target": round(tps / target_tps, 3),
            "speedup_vs_target_our_runner": round(tps / own_tps, 3),
            "speedup_vs_hf_assisted": round(tps / max(hf), 3) if hf else None,
            "lossless": row.outputs == reference,
        }
        if row.stats and row.stats[0]:
            # each stats dict describes one generate() call (Chain._reset), so sums over prompts are exact
            per_tier: dict[str, dict[str, float]] = {}
            for st in row.stats:
                for t in st["tiers"][1:]:
                    agg = per_tier.setdefault(t["tier"], dict.fromkeys(("accepted", "drafted", "calls", "produced", "bytes_up", "bytes_down"), 0))
                    for key in agg:
                        agg[key] += t[key]
            entry["per_tier"] = {
                name: {"acceptance_rate": round(a["accepted"] / max(1, a["drafted"]), 3),
                       "mean_accepted_len": round(a["produced"] / max(1, a["calls"]), 3),
                       **{k: a[k] for k in ("accepted", "drafted", "calls", "bytes_up", "bytes_down")}}
                for name, a in per_tier.items()
            }
            if "draft_lens_chosen" in row.stats[0]:  # cost-aware: the draft lengths the policy chose
                chosen: dict[str, int] = {}
                for st in row.stats:
                    for k, c in st["draft_lens_chosen"].items():
                        chosen[k] = chosen.get(k, 0) + c
                entry["draft_lens_chosen"] = chosen
            first = next(iter(entry["per_tier"].values()), None)
            if first is not None:
                entry["acceptance_rate"], entry["mean_accepted_len"] = first["acceptance_rate"], first["mean_accepted_len"]
        results.append(entry)

    chains = [r for r in results if "per_tier" in r and not r["name"].startswith("default")]
    best = max(chains, key=lambda r: r["speedup_vs_target"])
    three = max((r for r in chains if r["tiers"].count("->") == 2), key=lambda r: r["speedup_vs_target"])
    default = next(r for r in results if r["name"] == "default")
    default3 = next(r for r in results if r["name"] == "default 3-tier")
    head_row = next(r for r in results if r["name"] == "2-tier head")
    summary = {
        "lossless": all(r["lossless"] for r in results),
        "speedup_vs_target": best["speedup_vs_target"],
        "speedup_vs_target_our_runner": best["speedup_vs_target_our_runner"],
        "speedup_vs_hf_assisted": best["speedup_vs_hf_assisted"],
        "best_chain": best["name"],
        "acceptance_rate": best.get("acceptance_rate"),
        "mean_accepted_len": best.get("mean_accepted_len"),
        "tiers": best["tiers"],
        "per_tier": best["per_tier"],
        "speedup_vs_target_3tier": three["speedup_vs_target"],
        "best_3tier_chain": three["name"],
        "per_tier_3tier": three["per_tier"],
        "default_vs_target": default["speedup_vs_target"],
        "default_tiers": default["tiers"],
        "default_3tier_vs_target": default3["speedup_vs_target"],
        "default_3tier_tiers": default3["tiers"],
        "draft_train_s": head_info.get("train_s"),
        "draft_head": head_info,
        "family": family_note,
        "draft_agreement": agreement,
        "draft_vocab": DRAFT_VOCAB,
        "draft_confidence": CONFIDENCE,
        "prompts": len(prompts),
        "prompt_categories": sorted(PROMPT_CATEGORIES) if len(prompts) == len(PROMPTS) else "quick subset",
        "max_new_tokens": max_new,
        "placement": "one process, 1 torch thread shared by all tiers (baselines: same thread); rows interleaved per prompt",
        "lm_head": "row-adaptive kernels (layers.use_inference_kernels) in every row, baselines included",
        "links": {"edge": {"device->edge": EDGE_LINK, "edge->cloud": CLOUD_LINK}, "zero": "no delay"},
        "rows": results,
        "bound": bound(costs, target_tps, next((r for r in results if r["name"] == "2-tier cost-aware"), {}).get("acceptance_rate", 0.0),
                       agreement["after"][agreement["device"]]),
        "bound_head": bound(head_costs, target_tps, head_row.get("acceptance_rate", 0.0),
                            head_info["held_out_agreement"]["1"], bonus=True),
        "note": "shared 2-core machine loaded by other work: compare ratios within this run",
    }
    _report(results, summary)
    return summary


def _report(results: list[dict], summary: dict) -> None:
    table = Table(title=f"specdec: {summary['prompts']} prompts x {summary['max_new_tokens']} tokens")
    for column in ("configuration", "tiers", "tok/s", "vs target", "vs ours", "accept.", "mean len", "lossless"):
        table.add_column(column)
    for r in results:
        table.add_row(r["name"], r["tiers"], f"{r['tokens_per_s']:.2f}", f"{r['speedup_vs_target']:.2f}x",
                      f"{r['speedup_vs_target_our_runner']:.2f}x", str(r.get("acceptance_rate", "-")),
                      str(r.get("mean_accepted_len", "-")), "yes" if r["lossless"] else "NO")
    console = Console(width=100)
    console.print(table)
    console.print(f"family: {summary['family']}; draft head: {summary['draft_head'].get('head_parameters')} parameters, "
                  f"trained in {summary['draft_train_s']} s, held-out agreement {summary['draft_head'].get('held_out_agreement')}")
    console.print(f"placement: {summary['placement']}; default = {summary['default_tiers']}, "
                  f"default 3-tier = {summary['default_3tier_tiers']}")
    agree = summary["draft_agreement"]
    table = Table(title=f"draft greedy agreement with the full model ({agree['measured_on']})")
    for column in ("draft", "before distillation", "after self-distillation"):
        table.add_column(column)
    for name in agree["after"]:
        table.add_row(name, str(agree["before"].get(name, "-")), str(agree["after"][name]))
    console.print(table)
    for key in ("bound", "bound_head"):
        _bound_table(console, summary[key], "EESB device" if key == "bound" else "draft head")
    folder = results_dir("specdec")
    _plot(results, folder, summary)


def _bound_table(console: Console, b: dict[str, Any], drafter: str) -> None:
    table = Table(title=f"bound ({drafter}): what {b['goal_speedup']}x over the target alone needs under this run's costs (seq placement); "
                        f"measured α: chain {b['measured_acceptance_chain']}, teacher-forced {b['measured_agreement_teacher_forced']}")
    for column in ("target per token from", "draft / target", "verify k / target (k=1..)", "α needed", "speedup at α=1", "predicted at measured α"):
        table.add_column(column)
    for name in ("our_runner", "hf_generate"):
        r = b[name]
        table.add_row(f"{name} ({1000 * r['target_s_per_token']:.1f} ms)", str(r["draft_over_target"]),
                      ", ".join(str(v) for v in r["verify_k_over_target"].values()),
                      str(r["required_acceptance"]) if r["required_acceptance"] is not None else "unreachable (α = 1 too slow)",
                      f"{r['speedup_at_perfect_acceptance']}x", f"{r['predicted_speedup_at_agreement']}x (k={r['predicted_best_draft_len']})")
    console.print(table)


def _plot(results: list[dict], folder, summary: dict) -> None:
    (folder / "specdec.json").write_text(json.dumps(summary, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [r["name"] for r in results]
    colors = ["#888888" if "per_tier" not in r else "#e07b39" if "head" in r["name"] else "#2b7bba" for r in results]
    ax.bar(range(len(results)), [r["tokens_per_s"] for r in results], color=colors)
    for i, r in enumerate(results):
        ax.text(i, r["tokens_per_s"], f"{r['speedup_vs_target']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(results)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("tokens/s (median)")
    ax.set_title(f"Hierarchical speculative decoding, {summary['prompts']} prompts (labels: speedup vs target-only)")
    fig.tight_layout()
    fig.savefig(folder / "specdec.png", dpi=120)
    plt.close(fig)

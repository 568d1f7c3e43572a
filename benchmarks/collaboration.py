"""Device-server collaboration benchmark (issue 13; paper §IV-A, Tables III-VI): does the protocol beat
its members, and does it beat plain ensembling? Automatic scoring only (no LLM judge).

Domains are text that ships with this environment and nobody in the project wrote:

* ``python-reference`` — the Python language reference (``pydoc_data.topics``);
* ``stdlib-source`` — the standard library's top-level modules (source code);
* ``licenses`` — the licence texts in installed packages' ``*.dist-info`` (deduplicated);
* ``numpy-docs`` — docstrings of numpy's public functions (``numpy``, ``linalg``, ``fft``, ``random``).

Each document goes to the held-out split when ``sha1(domain/doc) mod 4 == 0`` (fixed before any
result was seen), else to training. **Specialists**: one per domain, the embedded default (SmolLM2
via the family cache) + a LoRA fine-tuned briefly on that domain's training text (peft; recipe in
``RECIPE``; cached under ``$AIFLOW_CACHE/collab-bench/``, the first run pays the training, reported
as ``specialist_train_s``). They are saved as a run folder (``specialists/<domain>/specialist.json``
+ ``adapter.safetensors``, ``general/`` = the untouched base), so ``aiflow collaborate ...
collab.run=<that folder>`` works on them; descriptions are **derived from each specialist's training
text** (:func:`aiflow_fl.collab.specialists.derive_description`), none written by hand; each route also
has ``ROUTER_UTTERANCES`` query-shaped utterances, 32-token prefixes of its training windows (training
documents only, so no held-out query is among them; the bench counts the held-out queries sharing
any 8-token span with a route utterance and reports it as ``routing_queries_sharing_8gram``).

**Items** (held-out documents only; 12 per domain with ``--quick``, 50 without): a 32-token passage
prefix, its true 12-token continuation and 3 locally coherent distractors — the 12 tokens that follow
the same last two prefix tokens elsewhere in the domain's held-out text (see :func:`make_items`) —
scored by log-likelihood (multiple-choice cloze), and the true continuation's perplexity. Compared side
by side on the same items (see :mod:`aiflow_fl.collab.evaluation`): every member alone, the router's single choice, the
protocol's token-level synthesis with 1..N routed agents, the average ensemble of all members, the
majority vote, and each device after the broadcast (revision). Routing accuracy: the router's top
specialist is the item's domain (query = the prefix). The bench routes with threshold 0 (every query
is answered by its top-k; ``aiflow collaborate`` keeps ``collab.threshold``).

**Fan-out timing**: the full text protocol (``Collaboration.run``: route, parallel answers, MoA
synthesis by the general member, broadcast + revision) with each specialist in its own worker
process (1 thread each), under ``/tmp/aiflow-timing.lock``; ``fanout_wall_vs_sum`` = the parallel
fan-out's wall time / the sum of the same agents' times answering the same query alone, one after the
other (greedy, so the same work; every agent answers once untimed first). One query, three times, with
``--quick``; one per domain without. The machine's core count bounds it: 4 agents on 2 cores cannot go below ~0.5,
and a process of someone else's busy on one core lifts that to ~0.6 (5 runnable processes on 2 cores)
or more; the 1-minute load average before and after the timed section is reported with it.
Routing accuracy is measured on ``ROUTING_QUERIES_PER_DOMAIN`` held-out queries per domain (at least;
all the items' prefixes) in every mode.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import importlib
import inspect
import json
import os
import random
import re
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from aiflow_fl.bench import results_dir

DOMAINS = ["python-reference", "stdlib-source", "licenses", "numpy-docs"]
PREFIX_TOKENS, CONT_TOKENS, OPTIONS = 32, 12, 4
# LoRA on the top ``top_layers`` decoder layers only: backward stops there, which keeps the CPU cost of
# four specialists at a few minutes (the first run; then cached).
RECIPE = {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
          "top_layers": 6, "steps": 24, "batch": 4, "seq_len": 48, "lr": 2e-3, "train_tokens_per_domain": 60000, "seed": 0}
HELDOUT_MOD = 4
# Router utterances per specialist: up to 512 *query-shaped* utterances (semantic-router's convention:
# a route is many example utterances; the derived description stays one of them): the first
# PREFIX_TOKENS tokens of evenly spaced training windows, shaped like the queries (held-out
# 32-token passage prefixes). Scores are hybrid, (1 - LEXICAL_WEIGHT) * MiniLM top-5 mean cosine +
# LEXICAL_WEIGHT * TF-IDF centroid cosine (aiflow_fl.collab.router). Chosen on a dev set of the
# *training* split only (benchmarks/_collab_router_dev.py: a fifth of the training documents, by hash,
# give 160 dev queries; utterances from the other training documents): top-1 0.856 MiniLM alone
# (top-m 5), 0.906 TF-IDF alone, hybrid 0.881 / 0.894 / 0.906 / 0.919 / 0.938 with weight
# 0.2 / 0.3 / 0.4 / 0.5 / 0.7 (top-m 10: 0.919 ... 0.938); 0.7 taken, top-m stays 5. A first dev set,
# every 5th training window of the same documents as the utterances, was too easy (0.93 dense, 0.957
# at 0.3) and picked 0.3, which gave 0.892 on the held-out queries; the document-level dev set
# predicted that (0.894 at 0.3). (The earlier utterances, 256 snippets of 120 characters, reached
# 0.75-0.875 on held-out items.) Disclosure: the held-out 0.892 at weight 0.3 is what prompted the
# document-level dev set; the weight 0.7 was then read off that dev set alone.
ROUTER_UTTERANCES, LEXICAL_WEIGHT = 512, 0.7
# Routing accuracy is measured on this many held-out queries per domain in every mode (cheap: MiniLM
# only), the multiple-choice items are the first ``items_per_domain`` of them.
ROUTING_QUERIES_PER_DOMAIN = 30
TIMING_LOCK = "/tmp/aiflow-timing.lock"


# ---------------------------------------------------------------------------- domain texts that ship
def python_reference() -> list[tuple[str, str]]:
    topics = importlib.import_module("pydoc_data.topics").topics
    return [(name, text) for name, text in sorted(topics.items()) if len(text) > 400]


def stdlib_source() -> list[tuple[str, str]]:
    folder = Path(sysconfig.get_paths()["stdlib"])
    return [(p.name, p.read_text(errors="replace")[:20000]) for p in sorted(folder.glob("*.py")) if p.stat().st_size > 2000]


def licenses() -> list[tuple[str, str]]:
    """Licence files of installed distributions, one per distinct text (MIT/Apache repeat a lot)."""
    site = sysconfig.get_paths()["purelib"]
    seen, out = set(), []
    for path in sorted(glob.glob(os.path.join(site, "*.dist-info", "**", "*"), recursive=True)):
        base = os.path.basename(path).upper()
        if not os.path.isfile(path) or not ("LICEN" in base or "COPYING" in base):
            continue
        text = Path(path).read_text(errors="replace")
        body = [ln for ln in text.splitlines() if "copyright" not in ln.lower()]
        key = re.sub(r"[^a-z]", "", " ".join(body).lower())[:400]
        if len(text) < 400 or key in seen:
            continue
        seen.add(key)
        out.append((os.path.relpath(path, site), text[:20000]))
    return out


def numpy_docs() -> list[tuple[str, str]]:
    import numpy

    out, seen = [], set()
    for module in (numpy, numpy.linalg, numpy.fft, numpy.random):
        for name in sorted(dir(module)):
            if name.startswith("_"):
                continue
            obj = getattr(module, name, None)
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc or len(doc) < 400 or doc in seen:
                continue
            seen.add(doc)
            out.append((f"{module.__name__}.{name}", doc))
    return out


SOURCES = {"python-reference": python_reference, "stdlib-source": stdlib_source, "licenses": licenses, "numpy-docs": numpy_docs}


def is_heldout(domain: str, doc_id: str) -> bool:
    return int(hashlib.sha1(f"{domain}/{doc_id}".encode()).hexdigest()[:8], 16) % HELDOUT_MOD == 0


def domain_data(tokenizer, domain: str) -> tuple[list[list[int]], list[tuple[str, list[int]]]]:
    """(training token windows of ``seq_len``, held-out documents as (id, token ids))."""
    train: list[list[int]] = []
    heldout: list[tuple[str, list[int]]] = []
    budget = RECIPE["train_tokens_per_domain"]
    seq = RECIPE["seq_len"]
    for doc_id, text in SOURCES[domain]():
        if is_heldout(domain, doc_id):
            heldout.append((doc_id, tokenizer(text, add_special_tokens=False).input_ids))
        elif budget > 0:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            for start in range(0, len(ids) - seq + 1, seq)[:6]:  # a few windows per document: many documents
                train.append(ids[start:start + seq])
                budget -= seq
    return train, heldout


def make_items(domain: str, heldout: list[tuple[str, list[int]]], count: int, tokenizer, seed: int = 0) -> list[dict]:
    """Multiple-choice cloze items of one domain (module docstring), at most 3 per document.

    Distractors are *locally coherent*: the 12 tokens that follow the same last two prefix tokens
    somewhere else in the domain's held-out text (the same last token when fewer than 3 such places
    exist; any place of the domain as the last resort), picked at random (seeded) among those places.
    Every option then fits the prefix's last words, so the first token no longer gives the answer away
    and a member must know how this passage goes on. An option whose tokens match the true continuation
    or another option too closely to be wrong (:class:`difflib.SequenceMatcher` ratio > 0.5) is skipped.
    (A first rule — continuations of the passages nearest in MiniLM meaning — left every method at
    0.88–0.96 on the quick items, so it was replaced by this one before anything else changed.)"""
    from difflib import SequenceMatcher

    span = PREFIX_TOKENS + CONT_TOKENS
    windows = []
    for doc_id, ids in heldout:
        doc_windows = [(s, ids[s:s + span]) for s in range(0, len(ids) - span + 1, span)]
        rng = random.Random(f"{seed}/{doc_id}")
        rng.shuffle(doc_windows)
        for start, w in doc_windows[:3]:
            if sum(ch.isalnum() for ch in tokenizer.decode(w[PREFIX_TOKENS:])) >= 3:
                windows.append((doc_id, start, w))
    by_last: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # last 1 or 2 tokens -> (doc, position after them)
    for d, (_, ids) in enumerate(heldout):
        for p in range(2, len(ids) - CONT_TOKENS + 1):
            by_last.setdefault((ids[p - 1],), []).append((d, p))
            by_last.setdefault((ids[p - 2], ids[p - 1]), []).append((d, p))
    doc_index = {doc_id: d for d, (doc_id, _) in enumerate(heldout)}
    anywhere = [(d, p) for d, (_, ids) in enumerate(heldout) for p in range(0, len(ids) - CONT_TOKENS + 1, CONT_TOKENS)]
    rng = random.Random(f"{seed}/{domain}")
    rng.shuffle(windows)
    items = []
    for doc_id, start, window in windows[:count]:
        true, prefix = window[PREFIX_TOKENS:], window[:PREFIX_TOKENS]
        here = (doc_index[doc_id], start + PREFIX_TOKENS)
        distractors: list[list[int]] = []
        for places in (by_last.get(tuple(prefix[-2:]), []), by_last.get(tuple(prefix[-1:]), []), anywhere):
            places = [q for q in places if q != here]
            for d, p in rng.sample(places, len(places)):
                if len(distractors) == OPTIONS - 1:
                    break
                cont = heldout[d][1][p:p + CONT_TOKENS]
                if not any(SequenceMatcher(None, cont, o).ratio() > 0.5 for o in [true, *distractors]):
                    distractors.append(cont)
        options = [true] + distractors
        order = list(range(OPTIONS))
        rng.shuffle(order)
        items.append({"domain": domain, "doc": doc_id, "prefix": prefix,
                      "options": [options[o] for o in order], "answer": order.index(0),
                      "query": tokenizer.decode(prefix)})
    return items


def route_utterance_ids(train: list[list[int]]) -> list[list[int]]:
    """The first PREFIX_TOKENS tokens of up to ROUTER_UTTERANCES evenly spaced training windows."""
    step = max(1, len(train) // ROUTER_UTTERANCES)
    return [w[:PREFIX_TOKENS] for w in train[::step]][:ROUTER_UTTERANCES]


def shared_ngrams(queries: list[list[int]], utterances: list[list[int]], n: int = 8) -> list[bool]:
    """Per query: does it share at least one n-token span with any utterance (a leakage check)."""
    seen = {tuple(u[i:i + n]) for u in utterances for i in range(len(u) - n + 1)}
    return [any(tuple(q[i:i + n]) in seen for i in range(len(q) - n + 1)) for q in queries]


def bench_router(infos, run_dir: Path, temperature: float, top_m: int):
    """The bench's router (hybrid, threshold 0, every specialist ranked); utterance embeddings cached
    in the run folder, keyed by the texts (encoding ~2000 utterances costs ~1 min on a busy CPU)."""
    from aiflow_fl.collab.embed import shared_encoder
    from aiflow_fl.collab.router import Route, Router, route_texts
    from aiflow_fl.files import atomic_torch_save

    routes = [Route(i.name, i.description, list(i.utterances)) for i in infos]
    encoder = shared_encoder()
    texts, _ = route_texts(routes)
    key = hashlib.sha1(json.dumps([str(encoder.folder), texts]).encode()).hexdigest()[:16]
    cache = run_dir / f"route-embeddings-{key}.pt"
    if cache.is_file():
        embeddings = torch.load(cache)
    else:
        embeddings = encoder.encode(texts)
        atomic_torch_save(embeddings, cache)
    return Router(routes, encoder, top_k=len(routes), threshold=0.0, temperature=temperature, top_m=top_m,
                  lexical_weight=LEXICAL_WEIGHT, utterance_embeddings=embeddings)


# ---------------------------------------------------------------------------- specialists (cached)
def _recipe_key(cfg) -> str:
    return hashlib.sha1(json.dumps({"recipe": RECIPE, "model": cfg.model.name, "heldout_mod": HELDOUT_MOD,
                                    "domains": DOMAINS}, sort_keys=True).encode()).hexdigest()[:12]


def train_specialist(cfg, name: str, train: list[list[int]], seed: int, console) -> tuple[dict, float]:
    """A LoRA on the embedded default, ``RECIPE['steps']`` AdamW steps on random training windows."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from aiflow_fl.aggregation.update import from_peft_state_dict
    from aiflow_fl.family.member import member_from_config
    from aiflow_fl.progress import progress_bar

    torch.manual_seed(seed)
    member = member_from_config(cfg, "full")
    layers = member.num_layers
    model = get_peft_model(member.model, LoraConfig(r=RECIPE["rank"], lora_alpha=RECIPE["alpha"], lora_dropout=0.0,
                                                    target_modules=RECIPE["targets"],
                                                    layers_to_transform=list(range(layers - RECIPE["top_layers"], layers))))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=RECIPE["lr"])
    rng = random.Random(seed)
    start = time.perf_counter()
    losses = []
    with progress_bar(console=console) as bar:
        task = bar.add_task(f"training {name}", total=RECIPE["steps"])
        for _ in range(RECIPE["steps"]):
            batch = torch.tensor(rng.sample(train, RECIPE["batch"]))
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.advance(task)
    seconds = time.perf_counter() - start
    console.print(f"{name}: training loss {sum(losses[:4]) / 4:.3f} (first 4 steps) -> {sum(losses[-4:]) / 4:.3f} (last 4)")
    update = from_peft_state_dict(get_peft_model_state_dict(model), RECIPE["alpha"], num_examples=len(train))
    return {member.key_of(k): f for k, f in update.layers.items()}, seconds


def build_specialists(cfg, tokenizer, console) -> tuple[Path, dict[str, Any], dict]:
    """The run folder of the bench's specialists (trained once per recipe) and the held-out documents."""
    from aiflow_fl.collab.specialists import (ADAPTER_FILE, GENERAL, INFO_FILE, SpecialistInfo, derive_description, save_adapter,
                                              write_specialist)
    from aiflow_fl.config import to_yaml
    from aiflow_fl.files import atomic_write_bytes
    from aiflow_fl.models import cache_dir
    from aiflow_fl.progress import stage

    run_dir = cache_dir() / "collab-bench" / _recipe_key(cfg)
    data = {}
    with stage("domain texts (pydoc_data, stdlib, licences, numpy docstrings)", console):
        for domain in DOMAINS:
            data[domain] = domain_data(tokenizer, domain)
    texts = {d: [tokenizer.decode(w) for w in data[d][0]] for d in DOMAINS}
    every = [t for d in DOMAINS for t in texts[d]]
    train_s = {}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", to_yaml(cfg).encode())
    write_specialist(run_dir / "specialists" / GENERAL, SpecialistInfo(GENERAL, GENERAL, "full", "The untouched base model.", "config"), {})
    for index, domain in enumerate(DOMAINS):
        folder = run_dir / "specialists" / domain
        done = folder / "train.json"  # each specialist is kept as soon as it is trained
        if done.is_file():
            train_s[domain] = json.loads(done.read_text())["train_s"]
        else:
            with stage(f"specialist {domain}: LoRA r={RECIPE['rank']} on the top {RECIPE['top_layers']} layers, "
                       f"{RECIPE['steps']} steps x {RECIPE['batch']}x{RECIPE['seq_len']} tokens", console):
                layers, train_s[domain] = train_specialist(cfg, domain, data[domain][0], RECIPE["seed"] + index, console)
            folder.mkdir(parents=True, exist_ok=True)
            save_adapter(folder / ADAPTER_FILE, layers)
            atomic_write_bytes(done, json.dumps({"train_s": train_s[domain]}).encode())
        # The description is derived from the specialist's training text on every run (cheap), never written by hand.
        description, _ = derive_description(texts[domain], {domain: len(texts[domain])}, every, snippets=1)
        utterances = [tokenizer.decode(w) for w in route_utterance_ids(data[domain][0])]
        info = SpecialistInfo(domain, "specialist", "full", description, "derived", utterances, {domain: len(texts[domain])}, len(texts[domain]))
        atomic_write_bytes(folder / INFO_FILE, json.dumps(info.to_json(), indent=1).encode())
    return run_dir, {"train_s": train_s, "recipe": RECIPE}, data


# ---------------------------------------------------------------------------- scoring
def score_items(models: dict[str, Any], items: list[dict], console) -> torch.Tensor:
    """(M, I, O, T) per-token log-probabilities of every option under every member."""
    from aiflow_fl.collab.agents import score_continuations
    from aiflow_fl.progress import progress_bar

    out = torch.zeros(len(models), len(items), OPTIONS, CONT_TOKENS)
    with progress_bar(console=console) as bar:
        task = bar.add_task("scoring items (every member)", total=len(models) * len(items))
        for m, model in enumerate(models.values()):
            for i, item in enumerate(items):
                out[m, i] = torch.stack(score_continuations(model, item["prefix"], item["options"]))
                bar.advance(task)
    return out


def evaluate(lps: torch.Tensor, names: list[str], specialists: list[str], items: list[dict], route_scores: list[dict[str, float]],
             temperature: float) -> dict[str, Any]:
    """Every figure of the comparison from the per-token log-probabilities (pure; module docstring)."""
    from aiflow_fl.collab.evaluation import accuracy, fused_option_scores, majority_vote, option_scores, perplexity_of, revised_choice
    from aiflow_fl.collab.router import fusion_weights

    answers = [it["answer"] for it in items]
    scores = option_scores(lps)  # (M, I, O)
    own = scores.argmax(-1)  # (M, I)
    index = {n: i for i, n in enumerate(names)}
    spec_rows = [index[s] for s in specialists]
    true_tokens = len(items) * CONT_TOKENS

    def true_lp(per_item_token_lps: list[torch.Tensor]) -> float:
        return float(sum(t.sum() for t in per_item_token_lps))

    alone = {n: accuracy(own[index[n]].tolist(), answers) for n in names}
    by_domain = {n: {d: accuracy([own[index[n], i] for i, it in enumerate(items) if it["domain"] == d],
                                 [a for a, it in zip(answers, items) if it["domain"] == d]) for d in DOMAINS} for n in names}
    ppl_alone = {n: perplexity_of(true_lp([lps[index[n], i, a] for i, a in enumerate(answers)]), true_tokens) for n in names}
    ranked = [sorted(specialists, key=lambda s: (-r[s], s)) for r in route_scores]
    routing_accuracy = accuracy([specialists.index(r[0]) for r in ranked], [specialists.index(it["domain"]) for it in items])

    def protocol(k: int) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        choices, fused_scores, true_token_lps = [], [], []
        for i, order in enumerate(ranked):
            chosen = order[:k]
            weights = fusion_weights([route_scores[i][s] for s in chosen], temperature)
            member_lps = lps[[index[s] for s in chosen], i]  # (k, O, T)
            s = fused_option_scores(member_lps, weights)
            fused_scores.append(s)
            choices.append(int(s.argmax()))
            from aiflow_fl.collab.fusion import mixture_logprobs

            true_token_lps.append(mixture_logprobs(member_lps[:, answers[i]], weights))
        return choices, fused_scores, true_token_lps

    by_agents, ppl_by_agents, synth_scores = [], [], None
    for k in range(1, len(specialists) + 1):
        choices, fused, true_lps = protocol(k)
        by_agents.append(accuracy(choices, answers))
        ppl_by_agents.append(perplexity_of(true_lp(true_lps), true_tokens))
        synth_scores = fused  # the full protocol (k = N) is what is broadcast
    from aiflow_fl.collab.fusion import mixture_logprobs

    uniform = [1.0] * len(names)
    avg_scores = [fused_option_scores(lps[:, i], uniform) for i in range(len(items))]
    avg_choices = [int(s.argmax()) for s in avg_scores]
    ppl_avg = perplexity_of(true_lp([mixture_logprobs(lps[:, i, a], uniform) for i, a in enumerate(answers)]), true_tokens)
    vote = [majority_vote(own[:, i].tolist(), avg_scores[i]) for i in range(len(items))]
    revised = {s: accuracy([revised_choice(scores[index[s], i], synth_scores[i]) for i in range(len(items))], answers)
               for s in specialists}
    weakest = min(specialists, key=lambda s: (alone[s], s))
    strongest = max(specialists, key=lambda s: (alone[s], s))
    best_single = max(names, key=lambda n: (alone[n], n))
    return {
        "routing_accuracy": routing_accuracy,
        "mc_acc_alone": alone, "mc_acc_alone_by_domain": by_domain,
        "mc_acc_own_specialist": accuracy([own[index[it["domain"]], i] for i, it in enumerate(items)], answers),
        "best_single_member": best_single, "mc_acc_best_single": alone[best_single],
        "mc_acc_router_single": by_agents[0], "mc_acc_by_agents": by_agents, "mc_acc_collab": by_agents[-1],
        "mc_acc_avg_ensemble": accuracy(avg_choices, answers), "mc_acc_majority_vote": accuracy(vote, answers),
        "mc_acc_revised": revised, "weakest": weakest, "strongest": strongest,
        "gain_weakest": revised[weakest] - alone[weakest], "gain_strongest": revised[strongest] - alone[strongest],
        "ppl_alone": ppl_alone, "ppl_router_single": ppl_by_agents[0], "ppl_by_agents": ppl_by_agents,
        "ppl_collab": ppl_by_agents[-1], "ppl_avg_ensemble": ppl_avg,
    }


# ---------------------------------------------------------------------------- the text protocol, timed
def timed_protocol(run_dir: Path, queries: list[str], max_new_tokens: int, console, repeats: int = 1) -> dict[str, Any]:
    """The full protocol with one worker process per specialist; fan-out wall vs the agents' own times."""
    from aiflow_fl.collab.agents import LocalAgent, ProcessAgent
    from aiflow_fl.collab.protocol import CollabSettings, Collaboration
    from aiflow_fl.collab.specialists import load_specialist_model, local_agent_from_folder, read_run_specialists
    from aiflow_fl.config import load_config
    from aiflow_fl.progress import stage

    cfg = load_config([], config_file=run_dir / "config.yaml")
    general_info, infos = read_run_specialists(run_dir)
    with stage(f"starting {len(infos)} specialist processes (1 thread each)", console):
        with ThreadPoolExecutor(len(infos)) as pool:
            agents = dict(zip([i.name for i in infos], pool.map(
                lambda info: ProcessAgent(info.name, local_agent_from_folder, (str(run_dir), info.folder, []), threads=1), infos)))
    try:
        model, tokenizer = load_specialist_model(cfg, general_info)
        router = bench_router(infos, run_dir, cfg.collab.temperature, cfg.collab.top_m)
        settings = CollabSettings(top_k=len(infos), threshold=0.0, rounds=1, max_new_tokens=max_new_tokens, timeout_s=600)
        collab = Collaboration(router, agents, LocalAgent(general_info.name, model, tokenizer), settings, tokenizer)
        results, alone_s = [], []
        # one short untimed answer per agent first: a worker's first generate pays one-off start-up costs
        # that would inflate the "alone" sum and flatter the ratio
        list(collab.pool.map(lambda a: a.chat([{"role": "user", "content": "Hello"}], 2), agents.values()))
        with stage(f"waiting for {TIMING_LOCK}, then {len(queries) * repeats} timed collaborations", console), open(TIMING_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            load_before = os.getloadavg()[0]
            try:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                for query in [q for q in queries for _ in range(repeats)]:  # alone and parallel interleaved
                    # each selected agent alone first (one after the other): the sum the parallel
                    # fan-out is compared with (inside a parallel step an agent's own time is inflated
                    # by the others sharing the cores, so that sum would flatter the ratio)
                    user = [{"role": "user", "content": query}]
                    alone_s.append(sum(agents[n].chat(user, max_new_tokens).seconds for n in router.route(query).selected))
                    results.append(collab.run(query))
            finally:
                torch.set_num_threads(threads)
                load_after = os.getloadavg()[0]
                fcntl.flock(lock, fcntl.LOCK_UN)
        collab.close()
    finally:
        for agent in agents.values():
            agent.close()
    fan = [r.step("fan-out") for r in results]
    rev = [r.step("revision-1") for r in results]
    return {
        "fanout_wall_s": sum(s.wall_s for s in fan), "agents_alone_sum_s": sum(alone_s),
        "fanout_wall_vs_sum": sum(s.wall_s for s in fan) / max(1e-9, sum(alone_s)),
        "fanout_sum_agents_in_step_s": sum(s.sum_agent_s for s in fan),
        "fanout_wall_vs_in_step_sum": sum(s.wall_s for s in fan) / max(1e-9, sum(s.sum_agent_s for s in fan)),
        "revision_wall_vs_in_step_sum": sum(s.wall_s for s in rev if s) / max(1e-9, sum(s.sum_agent_s for s in rev if s)),
        "protocol_wall_s": sum(r.wall_s for r in results), "queries": len(results),
        # other processes on the machine bound the ratio: with C cores and A agents it cannot go below
        # max(1/A, 1/C) when the machine is otherwise idle (here C = os.cpu_count())
        "cpu_count": os.cpu_count(), "load_avg_1min_before_after": [load_before, load_after],
        "bytes_per_query": {k: sum(r.bytes[k] for r in results) // max(1, len(results)) for k in results[0].bytes},
        "example": results[0].to_dict(),
    }


# ---------------------------------------------------------------------------- run
def run(quick: bool = False) -> dict[str, Any]:
    from rich.console import Console

    from aiflow_fl.collab.specialists import ADAPTER_FILE, load_adapter, read_run_specialists
    from aiflow_fl.config import load_config
    from aiflow_fl.family.member import member_from_config
    from aiflow_fl.models import load_tokenizer
    from aiflow_fl.progress import stage

    console = Console(width=80)
    cfg = load_config()
    tokenizer = load_tokenizer(cfg.model.name)
    run_dir, meta, data = build_specialists(cfg, tokenizer, console)
    per_domain = 12 if quick else 50
    with stage("held-out items (distractors: what follows the same last tokens elsewhere in the domain)", console):
        # the first items of a domain do not depend on how many are made (same seeded draws)
        pool = {d: make_items(d, data[d][1], max(per_domain, ROUTING_QUERIES_PER_DOMAIN), tokenizer) for d in DOMAINS}
        queries_all = [it for d in DOMAINS for it in pool[d]]
        items = [it for d in DOMAINS for it in pool[d][:per_domain]]
    general_info, infos = read_run_specialists(run_dir)
    specialists = [i.name for i in infos]
    names = specialists + [general_info.name]
    with stage(f"routing {len(queries_all)} held-out queries (MiniLM + TF-IDF, weight {LEXICAL_WEIGHT})", console):
        router = bench_router(infos, run_dir, cfg.collab.temperature, cfg.collab.top_m)
        matrix = router.score_many([it["query"] for it in queries_all])
        all_scores = [{s: float(v) for s, v in zip(specialists, row)} for row in matrix]
        by_query = {(it["domain"], it["doc"], tuple(it["prefix"])): sc for it, sc in zip(queries_all, all_scores)}
        route_scores = [by_query[(it["domain"], it["doc"], tuple(it["prefix"]))] for it in items]
        top1 = [min(sc, key=lambda n: (-sc[n], n)) for sc in all_scores]  # evaluate() breaks ties the same way
        routing_all = sum(t == it["domain"] for t, it in zip(top1, queries_all)) / len(queries_all)
        routing_by_domain = {d: sum(t == d for t, it in zip(top1, queries_all) if it["domain"] == d)
                                / max(1, sum(it["domain"] == d for it in queries_all)) for d in DOMAINS}
        route_ids = {d: route_utterance_ids(data[d][0]) for d in DOMAINS}
        leak = shared_ngrams([it["prefix"] for it in queries_all], [u for d in DOMAINS for u in route_ids[d]])
    with stage("loading members (base + each specialist's LoRA folded in)", console):
        models = {}
        for info in [*infos, general_info]:
            member = member_from_config(cfg, info.member)
            member.fold(load_adapter(Path(info.folder) / ADAPTER_FILE))
            models[info.name] = member.model.eval()
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # accuracy, not speed, is measured here: one thread does not thrash a shared machine
    try:
        lps = score_items(models, items, console)
    finally:
        torch.set_num_threads(threads)
    scoring_s = time.perf_counter() - start
    del models
    figures = evaluate(lps, names, specialists, items, route_scores, cfg.collab.temperature)
    figures["routing_accuracy_mc_items"] = figures["routing_accuracy"]
    figures["routing_accuracy"] = routing_all  # on every held-out query, not only the MC items
    figures["routing_accuracy_by_domain"] = routing_by_domain
    figures["routing_queries"] = len(queries_all)
    figures["routing_queries_sharing_8gram"] = sum(leak)
    # the same accuracy on the queries that share no 8-token span with any route utterance (licence
    # boilerplate and code idioms recur across documents; these queries cannot be matched verbatim)
    clean = [t == it["domain"] for t, it, shared in zip(top1, queries_all, leak) if not shared]
    figures["routing_accuracy_unshared"] = round(sum(clean) / max(1, len(clean)), 4)
    out = results_dir("collaboration")
    torch.save({"logprobs": lps, "members": names, "items": items, "route_scores": route_scores}, out / "scores.pt")
    report_accuracy(figures, console)
    queries = [next(it["query"] for it in items if it["domain"] == d) for d in (DOMAINS[:1] if quick else DOMAINS)]
    # quick: one query three times (alone and in parallel interleaved, so a burst of someone else's
    # load does not fall on one side only); full: each domain's first query once
    timing = timed_protocol(run_dir, queries, 12 if quick else 24, console, repeats=3 if quick else 1)
    result = {**{k: v for k, v in figures.items()}, "fanout_wall_vs_sum": timing["fanout_wall_vs_sum"],
              "revision_wall_vs_in_step_sum": timing["revision_wall_vs_in_step_sum"], "protocol": {k: v for k, v in timing.items() if k != "example"},
              "items": len(items), "items_per_domain": per_domain,
              "lexical_weight": LEXICAL_WEIGHT, "router_utterances_per_specialist": {i.name: len(i.utterances) for i in infos}, "domains": DOMAINS, "specialists_run_dir": str(run_dir),
              "specialist_train_s": meta["train_s"], "recipe": meta["recipe"], "scoring_s": scoring_s}
    by_agents = figures["mc_acc_by_agents"]
    result["targets"] = {
        "routing_accuracy>=0.90": figures["routing_accuracy"] >= 0.90,
        "collab>=best_single+0.05": figures["mc_acc_collab"] >= figures["mc_acc_best_single"] + 0.05,
        "collab>avg_ensemble": figures["mc_acc_collab"] > figures["mc_acc_avg_ensemble"],
        "non_decreasing_in_agents": all(b >= a for a, b in zip(by_agents, by_agents[1:])),
        "gain_weakest>gain_strongest": figures["gain_weakest"] > figures["gain_strongest"],
        "fanout_wall<=0.6*sum": timing["fanout_wall_vs_sum"] <= 0.6,
    }
    (out / "collaboration.json").write_text(json.dumps({**result, "example": timing["example"]}, indent=1, default=float))
    result["plot"] = str(plot(result, out / "collaboration.png"))
    report_targets(result, console)
    return _rounded(result)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def plot(r: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [*r["mc_acc_alone"], "router top-1", *[f"protocol k={k}" for k in range(2, len(r["mc_acc_by_agents"]) + 1)],
              "avg ensemble", "majority vote"]
    values = [*r["mc_acc_alone"].values(), *r["mc_acc_by_agents"], r["mc_acc_avg_ensemble"], r["mc_acc_majority_vote"]]
    colors = ["#999999"] * len(r["mc_acc_alone"]) + ["#1f77b4"] * len(r["mc_acc_by_agents"]) + ["#ff7f0e", "#2ca02c"]
    left.barh(labels[::-1], values[::-1], color=colors[::-1])
    left.axvline(0.25, color="k", lw=0.6, ls=":")
    left.set_xlabel(f"multiple-choice cloze accuracy ({r['items']} held-out items, 4 options)")
    left.set_title("mixed-domain set: members alone vs collaboration")
    for y, v in enumerate(values[::-1]):
        left.text(v + 0.005, y, f"{v:.3f}", va="center", fontsize=7)
    specs = list(r["mc_acc_revised"])
    x = range(len(specs))
    right.bar([i - 0.2 for i in x], [r["mc_acc_alone"][s] for s in specs], 0.4, label="alone", color="#999999")
    right.bar([i + 0.2 for i in x], [r["mc_acc_revised"][s] for s in specs], 0.4, label="after broadcast (revised)", color="#1f77b4")
    right.set_xticks(list(x), specs, rotation=15, fontsize=8)
    right.set_ylabel("accuracy (mixed-domain set)")
    right.set_title(f"each device before/after; routing acc {r['routing_accuracy']:.2f}")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_accuracy(r: dict[str, Any], console) -> None:
    from rich.table import Table

    table = Table(title="each member alone, accuracy per domain (held-out MC cloze)", width=80)
    table.add_column("member")
    for d in DOMAINS:
        table.add_column(d.replace("-", "\n"), justify="right")
    table.add_column("mixed", justify="right")
    table.add_column("ppl", justify="right")
    for name, acc in r["mc_acc_alone"].items():
        table.add_row(name, *[f"{r['mc_acc_alone_by_domain'][name][d]:.3f}" for d in DOMAINS], f"{acc:.3f}", f"{r['ppl_alone'][name]:.1f}")
    console.print(table)
    methods = Table(title="collaboration vs baselines (mixed-domain set)", width=80)
    methods.add_column("method")
    methods.add_column("MC acc", justify="right")
    methods.add_column("ppl (true continuation)", justify="right")
    methods.add_row(f"best single ({r['best_single_member']})", f"{r['mc_acc_best_single']:.3f}", f"{r['ppl_alone'][r['best_single_member']]:.1f}")
    methods.add_row("each domain's own specialist (oracle)", f"{r['mc_acc_own_specialist']:.3f}", "")
    for k, (acc, ppl) in enumerate(zip(r["mc_acc_by_agents"], r["ppl_by_agents"]), 1):
        methods.add_row("router's single choice" if k == 1 else f"protocol, {k} agents (fusion)", f"{acc:.3f}", f"{ppl:.1f}")
    methods.add_row("average ensemble (all members)", f"{r['mc_acc_avg_ensemble']:.3f}", f"{r['ppl_avg_ensemble']:.1f}")
    methods.add_row("majority vote (all members)", f"{r['mc_acc_majority_vote']:.3f}", "")
    methods.caption = (f"routing accuracy {r['routing_accuracy']:.3f} ({r['routing_accuracy_unshared']:.3f} on the "
                       f"{r['routing_queries'] - r['routing_queries_sharing_8gram']} queries sharing no 8-gram "
                       f"with a route); after the broadcast the weakest "
                       f"({r['weakest']}) gains {r['gain_weakest']:+.3f}, the strongest ({r['strongest']}) "
                       f"{r['gain_strongest']:+.3f}")
    console.print(methods)


def report_targets(r: dict[str, Any], console) -> None:
    from rich.table import Table

    p = r["protocol"]
    console.print(f"fan-out: {p['fanout_wall_s']:.1f} s wall in parallel vs {p['agents_alone_sum_s']:.1f} s for the same "
                  f"agents alone one after the other (ratio {r['fanout_wall_vs_sum']:.2f}); bytes per query "
                  f"{p['bytes_per_query']}", highlight=False)
    targets = Table(title="issue 13 targets", width=80)
    targets.add_column("target")
    targets.add_column("met")
    for name, met in r["targets"].items():
        targets.add_row(name, "yes" if met else "[red]no[/red]")
    console.print(targets)

"""A bounded load test of ``aiflow serve`` on loopback: 1, 4 and 8 concurrent streaming clients.

The server is the real one (``aiflow serve FAMILY`` in its own process, FastAPI + uvicorn + SSE)
on the embedded default's family: SmolLM2-135M-Instruct with EESB members at ``specdec.EXITS``
whose branches are the ones ``aiflow bench specdec`` self-distilled (its cache in
$AIFLOW_CACHE/specdec, distilled once if absent; the family folder is cached in
$AIFLOW_CACHE/serving). It serves the plain member ``full`` (requests decoded together by the
iteration-level scheduler: one forward of all rows per step, aiflow_fl/serving/api/batch.py) and the
best chain of ``bench specdec``, ``eesb-0>full`` (the exit-4 member drafting for the full model,
cost-aware: the server's defaults). Each client is the official ``openai`` client streaming
``/v1/chat/completions`` greedily, a fixed number of requests one after another (the test stops by
itself); clients start together behind a barrier.

Reported per model and concurrency: aggregate completion tokens/s (tokens of every answer / the
span from the first request's start to the last one's end), request latency p50/p99, time to the
first token p50, errors. ``batching_gain_8`` = tokens/s at 8 clients / at 1 client, same run.
``overhead``: the API server's own cost per request — one client through HTTP/SSE against the same
member decoded by the same engine (:class:`~aiflow_fl.serving.api.batch.MemberEngine`) called in
this process, with the same torch threads, requests interleaved, median latency ratio − 1.
``lossless``: every greedy answer (token ids from the response's ``aiflow.token_ids``) equals
transformers' ``generate()`` of ``full`` on the same chat-template ids, token for token.

The machine is shared: read the ratios within one run, not absolute tokens/s.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from aiflow_fl.bench import results_dir
from aiflow_fl.config import load_config

CLIENTS = (1, 4, 8)
SETTINGS = {"quick": {"requests_per_client": 1, "max_tokens": 8, "overhead_requests": 2},
            "full": {"requests_per_client": 3, "max_tokens": 32, "overhead_requests": 8}}
PLAIN, CHAIN = "full", "eesb-0>full"
THREADS = 1  # torch threads of the server and of the in-process baseline (2 shared cores; see bench specdec)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def level_summary(requests: list[dict]) -> dict[str, Any]:
    """Figures of one load level from its requests (start, end, ttft, ids, error)."""
    ok = [r for r in requests if r["error"] is None]
    span = max(r["end"] for r in requests) - min(r["start"] for r in requests)
    tokens = sum(len(r["ids"]) for r in ok)
    latencies = [r["end"] - r["start"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"requests": len(requests), "errors": len(requests) - len(ok), "tokens": tokens,
            "throughput_tok_s": round(tokens / span, 2) if span > 0 else 0.0,
            "p50_latency_s": round(percentile(latencies, 0.5), 3), "p99_latency_s": round(percentile(latencies, 0.99), 3),
            "ttft_p50_s": round(percentile(ttfts, 0.5), 3)}


def family_folder(console: Console, quick: bool) -> Path:
    """The served family folder: cached in $AIFLOW_CACHE/serving, else built once from bench specdec's distilled branches."""
    from aiflow_benchmarks.specdec import EXITS, distill_key, distilled_family

    from aiflow_fl.errors import AiflowError
    from aiflow_fl.family.family import verify_folder
    from aiflow_fl.models import cache_dir, load_backbone

    loaded = load_backbone(load_config().model.name)
    folder = cache_dir() / "serving" / f"family-{distill_key(loaded.model, EXITS, quick)}"
    if (folder / "family.json").is_file():
        try:
            verify_folder(folder)
            return folder
        except AiflowError as exc:
            console.print(f"the cached family cannot be used ({exc}); building it again")
    console.print(f"building the family (exits {EXITS}, bench specdec's distilled branches) into {folder}")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        family, _ = distilled_family(loaded.model, loaded.tokenizer, EXITS, quick)
    finally:
        torch.set_num_threads(before)
    return family.save(folder)


def stream_one(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy chat completion: its start/end, time to the first token, token ids, error."""
    start, ttft, ids, error, extra = time.perf_counter(), None, [], None, {}
    try:
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                                    stream=True):
            more = (chunk.model_extra or {}).get("aiflow")
            if more:
                ids += more["token_ids"]
                extra = more if "links" in more else extra
                if ttft is None and ids:
                    ttft = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001  (counted as an error of the load test)
        error = f"{type(exc).__name__}: {exc}"
    return {"start": start, "end": time.perf_counter(), "ttft": ttft, "ids": ids, "error": error,
            "messages": messages, "extra": extra}


def load_level(base_url: str, model: str, work: list[list[list[dict]]], max_tokens: int) -> list[dict]:
    """``len(work)`` clients at once (behind a barrier), each streaming its requests one after another."""
    from openai import OpenAI

    barrier, done, lock = threading.Barrier(len(work)), [], threading.Lock()

    def client_loop(requests: list[list[dict]]) -> None:
        client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
        barrier.wait()
        for messages in requests:
            result = stream_one(client, model, messages, max_tokens)
            with lock:
                done.append(result)
        client.close()

    threads = [threading.Thread(target=client_loop, args=(w,)) for w in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done


def in_process(engine, tokenizer, ids: list[int], max_tokens: int, eos: frozenset[int]) -> tuple[float, list[int]]:
    """One request decoded by a MemberEngine in this process (the overhead's baseline): seconds, ids."""
    from aiflow_fl.serving.api.scheduler import Sequence
    from aiflow_fl.serving.api.text import TextStream

    finished = threading.Event()
    start = time.perf_counter()
    seq = Sequence(ids, max_tokens, lambda ev: finished.set() if ev.final else None,
                   TextStream(lambda t: tokenizer.decode(t, skip_special_tokens=True)), eos=eos)
    engine.submit(seq)
    finished.wait(600)
    return time.perf_counter() - start, list(seq.generated)


def run(quick: bool = False) -> dict[str, Any]:
    from openai import OpenAI

    from aiflow_benchmarks.specdec import PROMPTS

    from aiflow_fl.family.member import load_family_member
    from aiflow_fl.generation import chat_template_ids
    from aiflow_fl.serving.api.batch import MemberEngine
    from aiflow_fl.serving.api.main import start, stop
    from aiflow_fl.serving.build import eos_ids

    console = Console()
    settings = SETTINGS["quick" if quick else "full"]
    per_client, max_tokens = settings["requests_per_client"], settings["max_tokens"]
    started = time.perf_counter()
    folder = family_folder(console, quick)
    console.print(f"serving {folder} (members eesb-0, full; chain {CHAIN}); {per_client} request(s) per client, "
                  f"{max_tokens} tokens each")
    server = start([str(folder), "--member", "eesb-0", "--member", "full", f"serving.chains=[{CHAIN}]",
                    "--threads", str(THREADS)], timeout_s=300)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        full = load_family_member(str(folder), "full")
        tokenizer, model = full.tokenizer, full.model.eval()
        eos = frozenset(eos_ids(model, tokenizer))
        conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
        references: dict[int, list[int]] = {}

        def reference(messages: list[dict]) -> list[int]:
            """transformers' greedy generate() of full on the same chat-template ids (the lossless reference)."""
            key = conversations.index(messages)
            if key not in references:
                ids = torch.tensor([chat_template_ids(tokenizer, messages)])
                with torch.inference_mode():
                    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(eos),
                                         pad_token_id=tokenizer.eos_token_id)
                references[key] = out[0, ids.shape[1]:].tolist()
            return references[key]

        # warm-up: the first requests of a fresh server pay for lazy initialisation
        warm = OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)
        for name in (PLAIN, CHAIN):
            stream_one(warm, name, conversations[0], 4)

        levels: dict[str, dict[str, dict]] = {PLAIN: {}, CHAIN: {}}
        answers: list[dict] = []
        for name in (PLAIN, CHAIN):
            for clients in CLIENTS:
                work = [[conversations[(c * per_client + r) % len(conversations)] for r in range(per_client)]
                        for c in range(clients)]
                done = load_level(server.base_url, name, work, max_tokens)
                answers += [{**r, "model": name} for r in done]
                levels[name][str(clients)] = summary = level_summary(done)
                console.print(f"{name}: {clients} client(s): {summary['throughput_tok_s']} tok/s, "
                              f"p50 {summary['p50_latency_s']} s, errors {summary['errors']}")

        # the server's own overhead: one client through HTTP/SSE vs the same engine called in-process
        engine = MemberEngine(model, 8, "in-process")
        api_s, local_s, local_answers = [], [], []
        try:
            for i in range(settings["overhead_requests"]):
                messages = conversations[i % len(conversations)]
                ids = chat_template_ids(tokenizer, messages)
                api = stream_one(warm, PLAIN, messages, max_tokens)
                seconds, local_ids = in_process(engine, tokenizer, ids, max_tokens, eos)
                if api["error"] is None:
                    api_s.append(api["end"] - api["start"])
                local_s.append(seconds)
                answers.append({**api, "model": PLAIN})
                local_answers.append((messages, local_ids))
        finally:
            engine.close()
        warm.close()
    finally:
        stop(server.proc)
        torch.set_num_threads(threads_before)

    console.print(f"checking {len(answers)} answers against transformers' generate()")
    wrong = [a for a in answers if a["error"] is None and a["ids"] != reference(a["messages"])]
    wrong_local = [m for m, ids in local_answers if ids != reference(m)]
    errors = sum(1 for a in answers if a["error"] is not None)
    chain_links = [a["extra"]["links"][0] for a in answers if a["model"] == CHAIN and a["extra"].get("links")]
    drafted = sum(link["drafted"] for link in chain_links)
    accepted = sum(link["accepted"] for link in chain_links)
    overhead = statistics.median(api_s) / statistics.median(local_s) - 1 if api_s else float("nan")

    def gain(name: str) -> float:
        one = levels[name]["1"]["throughput_tok_s"]
        return round(levels[name]["8"]["throughput_tok_s"] / one, 3) if one else 0.0

    result = {
        "model": PLAIN, "chain": CHAIN, "family": str(folder), "torch_threads": THREADS,
        "requests_per_client": per_client, "max_tokens": max_tokens,
        "throughput_tok_s": {c: levels[PLAIN][c]["throughput_tok_s"] for c in levels[PLAIN]},
        "p50_latency_s": {c: levels[PLAIN][c]["p50_latency_s"] for c in levels[PLAIN]},
        "p99_latency_s": {c: levels[PLAIN][c]["p99_latency_s"] for c in levels[PLAIN]},
        "ttft_p50_s": {c: levels[PLAIN][c]["ttft_p50_s"] for c in levels[PLAIN]},
        "batching_gain_8": gain(PLAIN),
        "chain_results": {"throughput_tok_s": {c: levels[CHAIN][c]["throughput_tok_s"] for c in levels[CHAIN]},
                          "p50_latency_s": {c: levels[CHAIN][c]["p50_latency_s"] for c in levels[CHAIN]},
                          "p99_latency_s": {c: levels[CHAIN][c]["p99_latency_s"] for c in levels[CHAIN]},
                          "ttft_p50_s": {c: levels[CHAIN][c]["ttft_p50_s"] for c in levels[CHAIN]},
                          "gain_8": gain(CHAIN), "drafted": drafted, "accepted": accepted,
                          "acceptance_rate": round(accepted / drafted, 3) if drafted else None},
        "errors": errors,
        "overhead": round(overhead, 4),
        "overhead_detail": {"api_median_s": round(statistics.median(api_s), 4) if api_s else None,
                            "in_process_median_s": round(statistics.median(local_s), 4), "requests": len(local_s)},
        "lossless": not wrong and not wrong_local and errors == 0,
        "answers_checked": len(answers) + len(local_answers),
        "levels": levels,
    }
    _report(console, levels, result)
    _plot(levels, results_dir("serving"))
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


def _report(console: Console, levels: dict[str, dict[str, dict]], result: dict) -> None:
    table = Table(title="aiflow serve under load (streaming clients)", width=80)
    for column in ("model", "clients", "tok/s", "p50 s", "p99 s", "TTFT s", "errors"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, rows in levels.items():
        for clients, row in rows.items():
            table.add_row(name, clients, f"{row['throughput_tok_s']:.1f}", f"{row['p50_latency_s']:.2f}",
                          f"{row['p99_latency_s']:.2f}", f"{row['ttft_p50_s']:.2f}", str(row["errors"]))
    console.print(table)
    chain = result["chain_results"]
    console.print(f"batching gain at 8 clients: {result['batching_gain_8']}x ({PLAIN}), {chain['gain_8']}x ({CHAIN}); "
                  f"server overhead per request {100 * result['overhead']:.1f}% "
                  f"({result['overhead_detail']['api_median_s']} s via the API vs "
                  f"{result['overhead_detail']['in_process_median_s']} s in-process); chain acceptance "
                  f"{chain['acceptance_rate']}; lossless: {result['lossless']} ({result['answers_checked']} answers)")


def _plot(levels: dict[str, dict[str, dict]], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in levels.items():
        clients = [int(c) for c in rows]
        left.plot(clients, [rows[c]["throughput_tok_s"] for c in rows], marker="o", label=name)
        right.plot(clients, [rows[c]["p50_latency_s"] for c in rows], marker="o", label=f"{name} p50")
        right.plot(clients, [rows[c]["p99_latency_s"] for c in rows], marker="x", linestyle="--", label=f"{name} p99")
    left.set(xlabel="concurrent streaming clients", ylabel="aggregate tokens/s", title="throughput", xticks=list(CLIENTS))
    right.set(xlabel="concurrent streaming clients", ylabel="request latency (s)", title="latency", xticks=list(CLIENTS))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("aiflow serve on loopback (SmolLM2-135M family)")
    fig.tight_layout()
    fig.savefig(folder / "serving.png", dpi=120)
    plt.close(fig)

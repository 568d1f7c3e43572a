"""TOFC benchmark (paper §II-B1, Fig. 4-5): bytes per image vs answer accuracy on easy-VQA test questions,
and end-to-end latency vs link rate, every method side by side in one run into the same edge model.

Methods (see :mod:`aiflow_fl.tofc.evaluate`): TOFC at each trained λ (DPC-KNN merged tokens, hyperprior
codec with routed experts, real range-coded bitstreams), ``merge-only`` (merged tokens as float16),
``uncompressed`` (all 64 encoder tokens as float16), and the data-oriented baselines ``jpeg-Q`` /
``webp-Q`` (Pillow; decoded, then the same EfficientNet-Lite0 encoder and edge model). The device
encoder is a CNN (EfficientNet-Lite0 block 10), not a CLIP ViT; the language member is the family's
early exit ``tofc.member`` of the embedded SmolLM2-135M, frozen; only the projector and codecs train.

Figures: ``curves`` (method family → [[bytes, accuracy], ...]), ``acc_uncompressed``,
``bytes_saved_vs_webp`` / ``bytes_saved_vs_jpeg`` (1 − bytes_TOFC / bytes_baseline at equal accuracy,
interpolated on the upper envelopes, at each accuracy a baseline point reaches that TOFC also reaches;
``mean`` over them), ``latency_ratio_vs_webp`` at 64 kbit/s (the cheapest real point of each method
reaching the highest accuracy both reach; latency = device compute + link model (5 ms + 8·bytes/rate)
+ edge compute, compute timed per image on one thread, median; the device side over all timed images,
then the edge side, as two machines would), ``train_s``, and ``acc_prior``: the
accuracy of answering from the question text alone (each question's most frequent training answer),
the floor an edge model that ignores the image reaches. Timing runs under
``/tmp/aiflow-timing.lock``.
"""

from __future__ import annotations

import fcntl
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from aiflow_fl.bench import results_dir

LINK_KBPS = (8, 16, 32, 64, 128, 256, 512, 1024, 4096)
LINK_LATENCY_MS = 5.0
TIMING_LOCK = "/tmp/aiflow-timing.lock"


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"overrides": ["tofc.member=exit-2", "tofc.projector_steps=6", "tofc.codec_warmup_steps=10",
                              "tofc.codec_steps=2", "tofc.batch_size=4", "tofc.lambdas=[0.003,0.03]"],
                "questions": 24, "jpeg": (10, 50), "webp": (10, 50), "timed_images": 2}
    return {"overrides": [], "questions": None, "jpeg": (5, 15, 40, 90), "webp": (0, 10, 30, 75), "timed_images": 12}


@contextmanager
def timing_lock():
    """Hold the machine-wide timing lock (other timing benchmarks wait) while compute is timed."""
    with open(TIMING_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _variant_tokens(system, variant: str, images: np.ndarray, used: list[int]):
    """Standardized tokens (N, 64, C) and bytes (N,) of a JPEG/WebP variant of the scored test images
    (the others stay zero): compressed, decoded, encoded in float16 as the token cache would hold them."""
    from aiflow_fl.tofc.data import image_variant
    from aiflow_fl.tofc.encoder import encode_images

    decoded, sizes = image_variant(images[used], variant)
    tokens = torch.zeros(len(images), 64, 112)
    sizes_all = torch.zeros(len(images), dtype=torch.int64)
    tokens[used] = system.stats.standardize(encode_images(system.token_encoder(), decoded).half())
    sizes_all[used] = torch.from_numpy(sizes.astype(np.int64))
    return tokens, sizes_all


@torch.no_grad()
def _timings(system, images: np.ndarray, ids: list[int], qualities: dict[str, tuple[int, ...]], question: str) -> dict[str, dict]:
    """Per-image compute (median over ``ids``) of each method's device and edge side."""
    from aiflow_fl.tofc.bitstream import decode_fp16, decode_tokens, encode_fp16, encode_tokens
    from aiflow_fl.tofc.encoder import compress_image, decompress_image, encode_images
    from aiflow_fl.tofc.merge import dpc_knn_merge

    enc, edge, cfg = system.token_encoder(), system.edge, system.cfg
    out: dict[str, dict] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per side, as a device would have; steady when the other core is busy

    def tokens_of(img):
        return system.stats.standardize(encode_images(enc, img[None]))

    def run(method, device_fn, edge_fn):
        # all images through the device side, then all payloads through the edge side: device and edge
        # are two machines, so neither side's caches are flushed by the other's work between images
        device, edge_s, payloads = [], [], []
        for i in ids:
            start = time.perf_counter()
            payloads.append(device_fn(images[i]))
            device.append(time.perf_counter() - start)
        for payload in payloads:
            start = time.perf_counter()
            edge_fn(payload)
            edge_s.append(time.perf_counter() - start)
        out[method] = {"device_s": statistics.median(device), "edge_s": statistics.median(edge_s)}

    tokens_of(images[ids[0]])  # warm-up
    edge.predict(torch.zeros(1, 64, 112), [question])
    run("uncompressed", lambda img: encode_fp16(tokens_of(img)[0]),
        lambda data: edge.predict(decode_fp16(data, 112)[None], [question]))
    run("merge-only", lambda img: encode_fp16(dpc_knn_merge(tokens_of(img), cfg.merged_tokens, cfg.knn)[0]),
        lambda data: edge.predict(decode_fp16(data, 112)[None], [question]))
    for lam, codec in sorted(system.codecs.items()):
        run(f"tofc-{lam:g}", lambda img, c=codec: encode_tokens(c, dpc_knn_merge(tokens_of(img), cfg.merged_tokens, cfg.knn)[0]).data,
            lambda data, c=codec: edge.predict(decode_tokens(c, data)[None], [question]))
    for fmt, qs in qualities.items():
        for q in qs:
            run(f"{fmt}-{q}", lambda img, f=fmt, q=q: compress_image(img, f.upper(), q),
                lambda data: edge.predict(tokens_of(decompress_image(data)), [question]))
    torch.set_num_threads(threads)
    return out


def _family(method: str) -> str:
    return "tofc" if method.startswith("tofc-") else method.split("-")[0] if method.split("-")[0] in ("jpeg", "webp") else method


def _equal_accuracy_points(points: dict[str, dict], a: str, b: str) -> tuple[str, str, float] | None:
    """The cheapest real point of family ``a`` and of family ``b`` reaching the highest accuracy both reach."""
    pa = {m: p for m, p in points.items() if _family(m) == a}
    pb = {m: p for m, p in points.items() if _family(m) == b}
    if not pa or not pb:
        return None
    target = min(max(p["accuracy"] for p in pa.values()), max(p["accuracy"] for p in pb.values()))
    ma = min((m for m, p in pa.items() if p["accuracy"] >= target), key=lambda m: pa[m]["bytes"])
    mb = min((m for m, p in pb.items() if p["accuracy"] >= target), key=lambda m: pb[m]["bytes"])
    return ma, mb, target


def _latency(point: dict, timing: dict, kbps: float) -> float:
    from aiflow_fl.serving.link import Link

    link = Link(name="device-edge", latency_ms=LINK_LATENCY_MS, bandwidth_mbps=kbps / 1000.0)
    return timing["device_s"] + link.message_time(int(round(point["bytes"]))) + timing["edge_s"]


def _plot(out: Path, result: dict[str, Any], points: dict[str, dict], timings: dict[str, dict], quick: bool) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suffix = "-quick" if quick else ""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"tofc": ("o-", "tab:red", "TOFC (λ sweep)"), "webp": ("s--", "tab:blue", "WebP"), "jpeg": ("^--", "tab:green", "JPEG")}
    for family, (style, colour, label) in styles.items():
        curve = sorted(result["curves"].get(family, []))
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], style, color=colour, label=label)
    for method, marker in (("uncompressed", "*"), ("merge-only", "D")):
        p = points[method]
        ax.plot([p["bytes"]], [p["accuracy"]], marker, color="black", ms=9, ls="none", label=f"{method} (float16)")
    ax.axhline(result["acc_prior"], color="grey", ls=":", label="question-text prior (no image)")
    ax.set(xscale="log", xlabel="bytes per image (real)", ylabel="answer accuracy",
           title=f"easy-VQA test ({result['questions']} questions)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    rate_path = out / f"rate-accuracy{suffix}.png"
    fig.savefig(rate_path, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    chosen = result.get("latency_points", {})
    for method in [chosen.get("tofc"), chosen.get("webp"), chosen.get("jpeg"), "uncompressed"]:
        if not method:
            continue
        ys = [1e3 * _latency(points[method], timings[method], k) for k in LINK_KBPS]
        ax.plot(LINK_KBPS, ys, "o-", label=f"{method} ({points[method]['bytes']:.0f} B, acc {points[method]['accuracy']:.3f})")
    ax.axvline(64, color="grey", ls=":")
    ax.set(xscale="log", yscale="log", xlabel="uplink rate (kbit/s)", ylabel="end-to-end latency (ms)",
           title=f"latency vs link rate (+{LINK_LATENCY_MS:g} ms link latency)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    latency_path = out / f"latency{suffix}.png"
    fig.savefig(latency_path, dpi=120)
    plt.close(fig)
    return [str(rate_path), str(latency_path)]


def run(quick: bool = False) -> dict[str, Any]:
    from aiflow_fl.config import load_config
    from aiflow_fl.tofc.data import load_split
    from aiflow_fl.tofc.evaluate import answer_prior_accuracy, bytes_saved, fp16_point, image_point, tofc_point
    from aiflow_fl.tofc.system import _test_split, model_dir, test_set, train_system

    console = Console()
    say = lambda line: console.print(f"tofc: {line}", markup=False, highlight=False)  # noqa: E731
    s = _settings(quick)
    cfg = load_config(s["overrides"])
    count = s["questions"] or cfg.tofc.eval_questions
    start = time.perf_counter()
    system = train_system(cfg, say)
    # the recipe's training only: the cache's info may also time codecs of λ outside this run's list
    trained = {"projector", *(f"codec-{lam:g}" for lam in system.codecs)}
    train_detail = {k: v for k, v in system.info.get("train_s", {}).items() if k in trained}
    train_s = round(float(sum(train_detail.values())), 1)
    say(f"system ready in {time.perf_counter() - start:.0f} s (training took {train_s} s, cached in {model_dir(cfg)})")
    test, _ = test_set(system, count, progress=say)
    used = test.images_used
    images = _test_split().images
    train_split = load_split("train")
    acc_prior = answer_prior_accuracy(train_split.questions, train_split.answers, test.questions, test.answers)
    say(f"question-text prior (no image): accuracy {acc_prior:.3f}")

    points: dict[str, dict] = {}
    rate_gaps = {}

    def add(point):
        points[point.method] = {"bytes": point.bytes, "accuracy": point.accuracy, "tokens": point.n_tokens}
        say(f"{point.method}: {point.bytes:.1f} bytes/image, accuracy {point.accuracy:.3f} ({point.n_tokens} tokens)")

    add(fp16_point(system.edge, "uncompressed", test.tokens, test))
    add(fp16_point(system.edge, "merge-only", test.merged, test))
    for lam in sorted(system.codecs):
        point, gap = tofc_point(system.edge, system.codecs[lam], lam, test)
        rate_gaps[point.method] = round(gap, 4)
        add(point)
    qualities = {"jpeg": s["jpeg"], "webp": s["webp"]}
    for fmt, qs in qualities.items():
        for q in qs:
            tokens, sizes = _variant_tokens(system, f"{fmt}-{q}", images, used)
            add(image_point(system.edge, f"{fmt}-{q}", tokens, sizes, test))

    say(f"timing device and edge compute on {s['timed_images']} images (waiting for {TIMING_LOCK})")
    with timing_lock():
        timings = _timings(system, images, used[: s["timed_images"]], qualities, test.questions[0])

    curves: dict[str, list] = {}
    for method, p in points.items():
        family = _family(method)
        if family in ("tofc", "jpeg", "webp"):
            curves.setdefault(family, []).append([round(p["bytes"], 2), round(p["accuracy"], 4)])
    for family in curves:
        curves[family].sort()
    curves["uncompressed"] = [[round(points["uncompressed"]["bytes"], 2), round(points["uncompressed"]["accuracy"], 4)]]
    curves["merge-only"] = [[round(points["merge-only"]["bytes"], 2), round(points["merge-only"]["accuracy"], 4)]]
    saved_webp = bytes_saved(curves["tofc"], curves["webp"])
    saved_jpeg = bytes_saved(curves["tofc"], curves["jpeg"])
    best_tofc = max(a for _, a in curves["tofc"])
    acc_uncompressed = points["uncompressed"]["accuracy"]

    result: dict[str, Any] = {
        "questions": len(test.questions), "images": len(used), "member": system.edge.member.name,
        "merged_tokens": system.cfg.merged_tokens, "lambdas": sorted(system.codecs),
        "acc_uncompressed": round(acc_uncompressed, 4), "acc_best_tofc": round(best_tofc, 4),
        "acc_prior": round(acc_prior, 4),
        "curves": curves,
        "bytes_saved_vs_webp": saved_webp["mean"], "bytes_saved_vs_jpeg": saved_jpeg["mean"],
        "bytes_saved_detail": {"webp": saved_webp["at"], "jpeg": saved_jpeg["at"]},
        "bitstream_vs_estimate_gap": rate_gaps,
        "timings_ms": {m: {k: round(1e3 * v, 2) for k, v in t.items()} for m, t in timings.items()},
        "train_s": train_s, "train_s_detail": train_detail,
    }
    latency_points: dict[str, str] = {}
    ratios = {}
    for base in ("webp", "jpeg"):
        chosen = _equal_accuracy_points(points, "tofc", base)
        if chosen is None:
            continue
        mt, mb, target = chosen
        latency_points.setdefault("tofc", mt)
        latency_points[base] = mb
        ratios[base] = {"tofc": mt, base: mb, "accuracy": round(target, 4),
                        "tofc_ms": round(1e3 * _latency(points[mt], timings[mt], 64), 2),
                        f"{base}_ms": round(1e3 * _latency(points[mb], timings[mb], 64), 2)}
        ratios[base]["ratio"] = round(ratios[base]["tofc_ms"] / ratios[base][f"{base}_ms"], 4)
    result["latency_points"] = latency_points
    result["latency_at_64kbps"] = ratios
    result["latency_ratio_vs_webp"] = ratios.get("webp", {}).get("ratio")
    result["targets"] = {
        "bytes_saved_vs_webp_ge_0.5": result["bytes_saved_vs_webp"] is not None and result["bytes_saved_vs_webp"] >= 0.5,
        "bytes_saved_vs_jpeg_ge_0.6": result["bytes_saved_vs_jpeg"] is not None and result["bytes_saved_vs_jpeg"] >= 0.6,
        "best_tofc_within_0.01_of_uncompressed": best_tofc >= acc_uncompressed - 0.01,
        "latency_ratio_vs_webp_le_0.5": result["latency_ratio_vs_webp"] is not None and result["latency_ratio_vs_webp"] <= 0.5,
    }
    result["plots"] = _plot(results_dir("tofc"), result, points, timings, quick)

    table = Table(title=f"TOFC vs images on easy-VQA ({len(test.questions)} questions, {system.edge.member.name})",
                  title_justify="left")
    for col in ("method", "tokens", "bytes/img", "accuracy", "ms @64k"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for method, p in sorted(points.items(), key=lambda kv: (_family(kv[0]), kv[1]["bytes"])):
        table.add_row(method, str(p["tokens"]), f"{p['bytes']:.1f}", f"{p['accuracy']:.3f}",
                      f"{1e3 * _latency(p, timings[method], 64):.0f}")
    console.print(table)
    console.print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in result["targets"].items()))
    return result

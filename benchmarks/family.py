"""Family benchmark: whitened vs plain SVD, EESB members vs the direct-head baseline, HPCD members.

On the embedded SmolLM2-135M-Instruct, held-out pydoc text (``pydoc_data.topics``, the 10% held-out
split of :func:`aiflow_fl.data.partition.split_heldout`; calibration and branch training use the
other 90%). Everything is measured side by side in one run.

Figures:

* ``svd_eq3_rel_error`` — max over two linears of layer 12 (q_proj, down_proj) and two ranks of
  |measured ‖WX − W_uW_vX‖² − Σ dropped σ²| / Σ dropped σ², X = the real calibration inputs.
* ``ppl_backbone``, ``ppl_whitened_svd``, ``ppl_plain_svd`` — all decoder linears (of ``svd_layers``)
  at parameter ratio ``svd_ratio``.
* ``eesb`` — per member: ``exit``, ``ratio``, ``params_fraction`` (of the whole model),
  ``block_params_fraction`` (decoder-block parameters incl. the branch / the backbone's), ``ppl``,
  ``top1_acc``, ``retention`` (member top-1 / backbone top-1), ``baseline_retention`` (the LM head
  directly at the same exit, untrained).
* ``hpcd`` — per k: ``params_fraction``, ``block_params_fraction``, ``ppl``, ``retention``.
* ``branch_training`` — steps, seconds, tokens; ``build_s`` — calibration + decomposition time.

``--quick`` (< 60 s on an idle 2-core machine): 4 held-out chunks, 4 calibration chunks, SVD and HPCD
on layer 12 only, one EESB member (exit 12) with 1 training step. The full run: 16 held-out chunks
(2,032 predicted tokens), 16 calibration chunks (2,048 tokens), all layers,
EESB exits 8/12/16/24 with branches trained for a wall-clock budget ($AIFLOW_FAMILY_TRAIN_S, 1500 s).
EESB members and direct heads are scored from one backbone pass per batch (identical by the shared
layers; cross-checked against one member's own forward: ``shared_pass_vs_member_forward_diff``).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from aiflow_fl.bench import results_dir
from aiflow_fl.config import BranchTrainingConfig, FamilyConfig
from aiflow_fl.family.batches import heldout_batches, training_batches
from aiflow_fl.family.evaluate import evaluate_lm
from aiflow_fl.family.family import add_branch, add_hpcd, empty_family, head_member
from aiflow_fl.family.member import load_family_member
from aiflow_fl.family.spec import MemberSpec
from aiflow_fl.family.svd import calibrate, decompose_model, factorize, rank_for_ratio
from aiflow_fl.family.train import train_branches
from aiflow_fl.models import DEFAULT_MODEL, load_backbone

SEQ_LEN = 128


def _eq3_rel_error(model, grams: dict[str, torch.Tensor], batches: list[torch.Tensor], layer: int) -> float:
    """Eq. 3 checked against the real inputs X of two linears, captured by an independent hook."""
    names = [f"model.layers.{layer}.self_attn.q_proj", f"model.layers.{layer}.mlp.down_proj"]
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: captured[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n in names]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
    for h in handles:
        h.remove()
    worst = 0.0
    for path in names:
        linear = model.get_submodule(path)
        x = torch.cat(captured[path])
        w = linear.weight.detach().double()
        fac = factorize(linear.weight, grams[path])
        for ratio in (0.25, 0.6):
            rank = rank_for_ratio(w.shape[0], w.shape[1], ratio)
            w_u, w_v = fac.factors(rank, torch.float64)
            measured = float(((w - w_u @ w_v) @ x.T).pow(2).sum())
            predicted = fac.dropped_energy(rank)
            worst = max(worst, abs(measured - predicted) / predicted)
    return worst


def _evaluate_exits(family, exits: list[int], batches: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """Every EESB member and the direct head at each exit from ONE backbone pass per batch.

    The members' first ``exit`` layers are the backbone's (tested bit-exact in tests/test_family.py),
    so member(x) = head(branch(h_exit)) and head-baseline(x) = head(h_exit) with h_exit from the
    backbone's hidden states; :func:`run` cross-checks one member against its own forward."""
    import math

    import torch.nn.functional as F

    from aiflow_fl.layers import head, positions, run_layers

    main = load_family_member(family, "full").model
    branches = {e: family.build(MemberSpec(f"eesb@{e}", "eesb", exit=e, ratio=1.0)).model.layers[e] for e in exits}
    sums = {f"{kind}-{e}": [0.0, 0, 0] for e in exits for kind in ("eesb", "head")}
    with torch.inference_mode():
        for ids in batches:
            out = main(input_ids=ids, output_hidden_states=True, use_cache=False)
            pos = positions(0, ids.shape[1])
            target = ids[:, 1:]
            for e in exits:
                h = out.hidden_states[e]
                for kind, logits in (("head", head(main, h)),
                                     ("eesb", head(main, run_layers(main, h, 0, 1, pos, layers=[branches[e]])))):
                    lg = logits[:, :-1].float()
                    acc = sums[f"{kind}-{e}"]
                    acc[0] += float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), reduction="sum"))
                    acc[1] += int((lg.argmax(-1) == target).sum())
                    acc[2] += target.numel()
    return {k: {"ppl": math.exp(v[0] / v[2]), "top1_acc": v[1] / v[2], "tokens": v[2]} for k, v in sums.items()}


def _plot(eesb: dict, hpcd: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = sorted(eesb.values(), key=lambda r: r["block_params_fraction"])
    ax.plot([r["block_params_fraction"] for r in rows], [r["retention"] for r in rows], "o-", label="EESB (branch)")
    ax.plot([r["baseline_block_params_fraction"] for r in rows], [r["baseline_retention"] for r in rows], "s--",
            label="direct LM head at the exit")
    hrows = sorted(hpcd.values(), key=lambda r: r["block_params_fraction"])
    ax.plot([r["block_params_fraction"] for r in hrows], [r["retention"] for r in hrows], "^-", label="HPCD (k components)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("decoder-block parameters / backbone's")
    ax.set_ylabel("retention (top-1 / backbone top-1)")
    ax.set_title("SmolLM2-135M family on held-out pydoc text")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    console = Console()
    t0 = time.perf_counter()
    loaded = load_backbone(DEFAULT_MODEL)
    model, tok = loaded.model, loaded.tokenizer
    num_layers = model.config.num_hidden_layers
    heldout = heldout_batches(tok, SEQ_LEN, 4, 4 if quick else 16)
    cal_cfg = 4 if quick else 16
    calib = list(itertools.islice(training_batches(tok, SEQ_LEN, 4, seed=7), cal_cfg // 4))
    svd_layers = [12] if quick else list(range(num_layers))
    svd_ratio = 0.8 if not quick else 0.6
    exits = [12] if quick else [8, 12, 16, 24]
    hpcd_k, hpcd_ratio = 3, 0.25

    base = evaluate_lm(model, heldout)
    build_start = time.perf_counter()
    grams = calibrate(model, calib, layers=sorted(set(svd_layers) | set(exits)), total=len(calib))
    calibrate_s = time.perf_counter() - build_start
    eq3 = _eq3_rel_error(model, grams, calib, 12)  # the same X the Gram matrices were built from

    whitened = evaluate_lm(decompose_model(model, grams, svd_ratio, svd_layers), heldout)
    plain = evaluate_lm(decompose_model(model, None, svd_ratio, svd_layers), heldout)

    # EESB family: one branch per exit (ratio 1.0: a branch as large as a rank-mn/(m+n) block)
    family = empty_family(model, tok)
    decompose_start = time.perf_counter()
    for e in exits:
        add_branch(family, e, 1.0, grams)
        family.add(MemberSpec(f"eesb-{len([s for s in family.members.values() if s.kind == 'eesb'])}", "eesb", exit=e, ratio=1.0))
    add_hpcd_layers = svd_layers
    hpcd_family = _hpcd_family(family, grams, hpcd_k, hpcd_ratio, add_hpcd_layers)
    build_s = calibrate_s + (time.perf_counter() - decompose_start)

    tcfg = BranchTrainingConfig(steps=1 if quick else 100_000, lr=3e-4, batch_size=4, seq_len=SEQ_LEN,
                                main="frozen", subset="all", kl_weight=1.0)
    budget_s = None if quick else _train_budget_s()
    train_start = time.perf_counter()
    history = train_branches(family, training_batches(tok, SEQ_LEN, tcfg.batch_size, seed=1), tcfg,
                             show_progress=False, time_limit_s=budget_s)
    train_s = time.perf_counter() - train_start
    steps = int(history["steps_done"][0])

    full = family.spec("full")
    exit_scores = _evaluate_exits(family, exits, heldout)
    # cross-check the shared-pass evaluation against one member's own transformers forward
    check_spec = [s for s in family.members.values() if s.kind == "eesb"][-1]
    own = evaluate_lm(load_family_member(family, check_spec.name).model, heldout[:1])
    shared = _evaluate_exits(family, [check_spec.exit], heldout[:1])[f"eesb-{check_spec.exit}"]
    consistency = abs(own["top1_acc"] - shared["top1_acc"]) + abs(own["ppl"] - shared["ppl"]) / own["ppl"]
    eesb: dict[str, dict[str, Any]] = {}
    for spec in [s for s in family.members.values() if s.kind == "eesb"]:
        scores, baseline = exit_scores[f"eesb-{spec.exit}"], exit_scores[f"head-{spec.exit}"]
        baseline_spec = head_member(family, spec.exit)
        eesb[spec.name] = {
            "exit": spec.exit,
            "ratio": round(spec.ratio, 4),
            "params_fraction": spec.num_parameters / full.num_parameters,
            "block_params_fraction": spec.block_parameters / full.block_parameters,
            "ppl": scores["ppl"],
            "top1_acc": scores["top1_acc"],
            "retention": scores["top1_acc"] / base["top1_acc"],
            "baseline_ppl": baseline["ppl"],
            "baseline_top1_acc": baseline["top1_acc"],
            "baseline_retention": baseline["top1_acc"] / base["top1_acc"],
            "baseline_block_params_fraction": baseline_spec.block_parameters / full.block_parameters,
        }
    hpcd: dict[str, dict[str, Any]] = {}
    for k in range(1, hpcd_k + 1):
        spec = hpcd_family.spec(f"hpcd-{k}")
        scores = evaluate_lm(load_family_member(hpcd_family, spec.name).model, heldout)
        hpcd[str(k)] = {
            "params_fraction": spec.num_parameters / full.num_parameters,
            "block_params_fraction": spec.block_parameters / full.block_parameters,
            "ppl": scores["ppl"],
            "top1_acc": scores["top1_acc"],
            "retention": scores["top1_acc"] / base["top1_acc"],
        }

    plot = results_dir("family") / "family_quality_vs_params.png"
    _plot(eesb, hpcd, plot)
    result: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "heldout_tokens": base["tokens"],
        "calibration_tokens": sum(b.numel() for b in calib),
        "svd_eq3_rel_error": eq3,
        "svd_ratio": svd_ratio,
        "svd_layers": "all" if len(svd_layers) == num_layers else svd_layers,
        "ppl_backbone": base["ppl"],
        "top1_backbone": base["top1_acc"],
        "ppl_whitened_svd": whitened["ppl"],
        "ppl_plain_svd": plain["ppl"],
        "eesb": eesb,
        "hpcd": hpcd,
        "hpcd_component_ratio": hpcd_ratio,
        "hpcd_layers": "all" if len(add_hpcd_layers) == num_layers else add_hpcd_layers,
        "build_s": round(build_s, 1),
        "branch_training": {"steps": steps, "seconds": round(train_s, 1), "tokens": steps * tcfg.batch_size * SEQ_LEN,
                            "main": tcfg.main, "kl_weight": tcfg.kl_weight, "lr": tcfg.lr,
                            "final_unit_ce": {k: v[-1] for k, v in history.items() if k.startswith("eesb") and v}},
        "threads": torch.get_num_threads(),
        "shared_pass_vs_member_forward_diff": consistency,
        "plot": str(plot),
    }
    _print(console, result)
    result["bench_s"] = round(time.perf_counter() - t0, 1)
    return result


def _hpcd_family(eesb_family, grams, count: int, ratio: float, layers: list[int]):
    """HPCD members over the chosen layers (all layers in the full run; other layers stay dense in
    --quick, which the figures then say)."""
    from aiflow_fl.family.family import Family

    family = Family(config=eesb_family.config, tokenizer=None,
                    tensors={k: v for k, v in eesb_family.tensors.items() if not k.startswith("branch.")})
    family.add(MemberSpec("full", "full", exit=eesb_family.config.num_hidden_layers))
    add_hpcd(family, count, ratio, grams, layers=layers)
    for k in range(1, count + 1):
        family.add(MemberSpec(f"hpcd-{k}", "hpcd", exit=family.config.num_hidden_layers, ratio=ratio, components=k))
    return family


def _train_budget_s() -> float:
    import os

    return float(os.environ.get("AIFLOW_FAMILY_TRAIN_S", "1500"))


def _print(console: Console, r: dict[str, Any]) -> None:
    table = Table(title="family: whitened SVD")
    for col in ["figure", "value"]:
        table.add_column(col)
    for key in ["svd_eq3_rel_error", "svd_ratio", "ppl_backbone", "top1_backbone", "ppl_whitened_svd", "ppl_plain_svd", "build_s"]:
        table.add_row(key, f"{r[key]:.4g}" if isinstance(r[key], float) else str(r[key]))
    console.print(table)
    table = Table(title=f"EESB vs direct head (branch training: {r['branch_training']['steps']} steps, "
                        f"{r['branch_training']['seconds']} s)")
    for col in ["member", "exit", "params %", "block %", "ppl", "top-1", "retention", "head ppl", "head retention"]:
        table.add_column(col)
    for name, e in r["eesb"].items():
        table.add_row(name, str(e["exit"]), f"{100 * e['params_fraction']:.1f}", f"{100 * e['block_params_fraction']:.1f}",
                      f"{e['ppl']:.2f}", f"{e['top1_acc']:.3f}", f"{e['retention']:.3f}", f"{e['baseline_ppl']:.1f}",
                      f"{e['baseline_retention']:.3f}")
    console.print(table)
    table = Table(title=f"HPCD (component ratio {r['hpcd_component_ratio']}, layers {r['hpcd_layers']})")
    for col in ["k", "params %", "block %", "ppl", "retention"]:
        table.add_column(col)
    for k, h in r["hpcd"].items():
        table.add_row(k, f"{100 * h['params_fraction']:.1f}", f"{100 * h['block_params_fraction']:.1f}", f"{h['ppl']:.2f}",
                      f"{h['retention']:.3f}")
    console.print(table)

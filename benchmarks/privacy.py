"""Privacy and edge-continual benchmark: the same small federation without DP and with DP-SGD at two
noise levels, and a two-stage stream (standard-library source code, then pydoc topics) with and
without replay.

How it runs: every device round is ``aiflow_fl.federated.device.device_train`` with the ClientApp's
own ``clients.app.training_hooks`` (so DP-SGD and the continual stages/replay are exactly what a
Flower client runs) and the device state passes through Flower's ``context.state`` records between
rounds. The server side is an in-process FedAvg loop instead of the Ray simulation (the simulation
costs ~10 s of start-up per run, too much for five runs in the --quick minute): each round every
device starts from the global model with a fresh LoRA (``base`` = the global update), trains, and
the server averages the devices' products exactly (``aiflow_fl.aggregation.flexlora.aggregate``,
the ``fedavg`` strategy's rule) and folds the mean into the global update.

Models: the embedded SmolLM2-135M-Instruct — an early-exit member of 2 layers for the DP runs, the whole
model for the stream runs (see :func:`settings`); --quick runs fewer examples, rounds and steps.

Figures: ``dp_epsilon`` (the largest ε any device reports after the whole run for the ε ≤ 8 run,
δ = ``dp_delta``), ``heldout_acc_untrained``, ``heldout_acc_no_dp``, ``heldout_acc_dp`` (ε ≤ 8),
``heldout_acc_dp_strong`` (the second, noisier level), ``dp_gain_kept`` = (acc_dp − untrained) /
(acc_no_dp − untrained), ``forgetting_no_replay``, ``forgetting_replay`` (drop of stage-0 accuracy
from its best, after the stage-1 rounds; same steps and batch size in both runs).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from aiflow_fl.aggregation import flexlora, lowrank
from aiflow_fl.aggregation.update import AdapterUpdate
from aiflow_fl.bench import results_dir
from aiflow_fl.config import AiflowConfig, load_config

DELTA = 1e-5


def settings(quick: bool) -> dict[str, Any]:
    """DP runs: the embedded SmolLM2-135M-Instruct as an early-exit member of 2 layers (``exit-2``: the LM
    head reads layer 2's features), LoRA on every linear of those layers; its untrained accuracy is
    low, so a few rounds show a clear gain — the quantity DP has to preserve. Stream runs: the whole
    model (``full``), which is already good on both domains, so training on the second domain can
    visibly cost accuracy on the first (a broken early-exit member improves on any text)."""
    common = dict(model="smollm2-135m-instruct", member="exit-2", seq_len=32, heldout=32, batch=16, lr=1e-2,
                  devices=2, targets="[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                  continual_member="full", continual_lr=2e-3, continual_batch=8)
    if quick:
        return common | dict(examples=48, rounds=2, steps=3, continual_rounds=2, continual_steps=3)
    return common | dict(examples=96, rounds=3, steps=5, continual_rounds=4, continual_steps=4)


def make_config(s: dict[str, Any], *extra: str) -> AiflowConfig:
    return load_config([
        f"model.name={s['model']}", f"federation.members=[{s['member']}]", "federation.ranks=[8]",
        f"federation.num_devices={s['devices']}", f"federation.rounds={s['rounds']}", "data.source=pydoc",
        "data.partitioner=iid", f"data.seq_len={s['seq_len']}", f"data.max_examples_per_client={s['examples']}",
        f"data.max_heldout_examples={s['heldout']}", f"train.batch_size={s['batch']}",
        f"train.local_steps={s['steps']}", f"train.lr={s['lr']}", "privacy.delta=1e-5",
        f"lora.target_modules={s['targets']}", *extra,
    ])


def run_federation(cfg: AiflowConfig, evaluate: Any) -> dict[str, Any]:
    """R rounds of FedAvg over the devices (see the module doc); ``evaluate(merged, round)`` after each."""
    from flwr.app import Context, RecordDict

    from clients.app import load_state, save_state, training_hooks
    from aiflow_fl.federated.device import device_profile, device_train

    n = cfg.federation.num_devices
    contexts = [Context(run_id=1, node_id=i, node_config={"partition-id": i, "num-partitions": n},
                        state=RecordDict(), run_config={}) for i in range(n)]
    base: dict = {}
    evals = [evaluate(None, 0)]
    device_metrics: list[list[dict[str, float]]] = []
    for server_round in range(1, cfg.federation.rounds + 1):
        updates, metrics = [], []
        for context in contexts:
            profile = device_profile(dict(context.node_config), cfg)
            state = load_state(context)
            update, m = device_train(cfg, profile, state, AdapterUpdate(base, 0) if base else None, None,
                                     server_round, cfg.train.local_steps, cfg.train.lr,
                                     hooks=training_hooks(cfg, state, profile))
            save_state(context, state)
            updates.append(update)
            metrics.append(m)
        base = lowrank.add([base, flexlora.aggregate(updates).merged()])
        device_metrics.append(metrics)
        evals.append(evaluate(AdapterUpdate(base, 0), server_round))
    return {"evals": evals, "devices": device_metrics}


def central_eval(cfg: AiflowConfig):
    """(accuracy, loss) of the member on the central held-out set of ``data.source``."""
    from aiflow_fl.federated.central import CentralEvaluator

    evaluator = CentralEvaluator(cfg)

    def run(merged: Any, _round: int) -> tuple[float, float]:
        m = evaluator(merged)
        return m["eval-accuracy"], m["eval-loss"]

    return run


def stage_eval(cfg: AiflowConfig):
    """{stage: (accuracy, loss)} on the held-out data of every stage seen by round ``r``."""
    from aiflow_fl.continual import StageEvaluator, stage_of_round

    evaluator = StageEvaluator(cfg)
    rounds, stages = cfg.federation.rounds, cfg.continual.stages

    def run(merged: Any, r: int) -> dict[int, tuple[float, float]]:
        metrics = evaluator.metrics(merged, stage_of_round(max(r, 1), rounds, stages))
        return {j: (m["eval-accuracy"], m["eval-loss"]) for j, m in metrics.items()}

    return run


def plot(path: Path, dp_runs: dict[str, dict], continual_runs: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    for label, run in dp_runs.items():
        ax.plot(range(len(run["evals"])), [a for a, _ in run["evals"]], marker="o", label=label)
    ax.set(xlabel="round", ylabel="central held-out next-token accuracy", title="accuracy with and without DP")
    ax.legend(fontsize=8)
    ax = axes[1]
    for label, run in dp_runs.items():
        if "dp-epsilon" not in run["devices"][0][0]:
            continue
        for d in range(len(run["devices"][0])):
            eps = [ms[d]["dp-epsilon"] for ms in run["devices"]]
            ax.plot(range(1, len(eps) + 1), eps, marker="o", label=f"{label}, device {d}")
    ax.axhline(8.0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="round", ylabel=f"ε (δ={DELTA:g}), composed over the run", title="privacy spent per device")
    ax.legend(fontsize=7)
    ax = axes[2]
    for (label, run), style in zip(continual_runs.items(), ("-", "--")):
        history = run["evals"][1:]
        for stage in sorted({j for h in history for j in h}):
            points = [(r + 1, h[stage][0]) for r, h in enumerate(history) if stage in h]
            xs, ys = zip(*points)
            ax.plot(xs, ys, style, marker="o", label=f"{label}: stage {stage}")
    ax.set(xlabel="round", ylabel="held-out accuracy of the stage", title="two-stage stream: stdlib code → pydoc")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False) -> dict[str, Any]:
    from aiflow_fl.continual import forgetting

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    s = settings(quick)
    console = Console()

    dp_runs: dict[str, dict] = {}
    for label, extra in (
        ("no DP", []),
        ("DP ε≤8", ["privacy.enabled=true", "privacy.target_epsilon=8", "privacy.max_grad_norm=1.0"]),
        ("DP ε≤1", ["privacy.enabled=true", "privacy.target_epsilon=1", "privacy.max_grad_norm=1.0"]),
    ):
        cfg = make_config(s, *extra)
        t0 = time.perf_counter()
        dp_runs[label] = run_federation(cfg, central_eval(cfg))
        dp_runs[label]["seconds"] = time.perf_counter() - t0

    continual_runs: dict[str, dict] = {}
    for label, replay in (("no replay", ["continual.replay=none"]),
                          ("replay", ["continual.replay=reservoir", "continual.replay_fraction=0.5",
                                      "continual.buffer_size=32"])):
        cfg = make_config(s, f"federation.rounds={s['continual_rounds']}", f"train.local_steps={s['continual_steps']}",
                          f"federation.members=[{s['continual_member']}]", f"train.lr={s['continual_lr']}",
                          f"train.batch_size={s['continual_batch']}", "continual.enabled=true",
                          # Code first, then documentation: fine-tuning the full model on pydoc costs it
                          # accuracy on stdlib code (measured 0.38 -> 0.32 after 6 steps), while code
                          # training does not hurt pydoc; so this order is where forgetting shows.
                          "continual.stages=2", "continual.domains=[stdlib,pydoc]", *replay)
        t0 = time.perf_counter()
        continual_runs[label] = run_federation(cfg, stage_eval(cfg))
        continual_runs[label]["seconds"] = time.perf_counter() - t0

    untrained, untrained_loss = dp_runs["no DP"]["evals"][0]
    acc = {label: run["evals"][-1][0] for label, run in dp_runs.items()}
    loss = {label: run["evals"][-1][1] for label, run in dp_runs.items()}
    eps = {label: max(m["dp-epsilon"] for m in run["devices"][-1]) for label, run in dp_runs.items() if label != "no DP"}
    sigma = {label: run["devices"][-1][0]["dp-noise-multiplier"] for label, run in dp_runs.items() if label != "no DP"}
    gain = acc["no DP"] - untrained
    kept = (acc["DP ε≤8"] - untrained) / gain if gain > 0 else float("nan")
    loss_gain = untrained_loss - loss["no DP"]
    kept_loss = (untrained_loss - loss["DP ε≤8"]) / loss_gain if loss_gain > 0 else float("nan")
    # Forgetting of stage 0 after the stage-1 rounds: by accuracy (the figure) and by loss.
    forget = {label: forgetting([{j: a for j, (a, _) in h.items()} for h in run["evals"][1:]]).get(0, float("nan"))
              for label, run in continual_runs.items()}
    forget_loss = {label: forgetting([{j: -l for j, (_, l) in h.items()} for h in run["evals"][1:]]).get(0, float("nan"))
                   for label, run in continual_runs.items()}
    final_stage = {label: {j: a for j, (a, _) in run["evals"][-1].items()} for label, run in continual_runs.items()}

    out_dir = results_dir("privacy")
    plot(out_dir / "privacy.png", dp_runs, continual_runs)

    table = Table(title=f"privacy (SmolLM2 {s['member']}) + stream ({s['continual_member']}){', quick' if quick else ''}, "
                        f"{s['devices']} devices, {s['rounds']} rounds × {s['steps']} steps, batch {s['batch']})")
    for col in ("run", "σ", f"ε (δ={DELTA:g})", "held-out acc", "held-out loss", "acc gain kept", "s"):
        table.add_column(col)
    table.add_row("untrained member", "", "", f"{untrained:.4f}", f"{untrained_loss:.3f}", "", "")
    for label, run in dp_runs.items():
        g = (acc[label] - untrained) / gain if gain > 0 else float("nan")
        table.add_row(label, f"{sigma.get(label, 0):.3f}" if label in sigma else "-",
                      f"{eps[label]:.3f}" if label in eps else "∞", f"{acc[label]:.4f}", f"{loss[label]:.3f}",
                      f"{g:.1%}", f"{run['seconds']:.0f}")
    for label, run in continual_runs.items():
        accs = ", ".join(f"stage {j}: {a:.4f}" for j, a in sorted(final_stage[label].items()))
        table.add_row(f"stream, {label}", "", "", accs, f"forgetting (loss) {forget_loss[label]:.3f}",
                      f"forgetting {forget[label]:.4f}", f"{run['seconds']:.0f}")
    console.print(table)

    return {
        "model": s["model"],
        "member": s["member"],
        "continual_member": s["continual_member"],
        "devices": s["devices"],
        "rounds": s["rounds"],
        "local_steps": s["steps"],
        "dp_epsilon": eps["DP ε≤8"],
        "dp_delta": DELTA,
        "dp_noise_multiplier": sigma["DP ε≤8"],
        "dp_epsilon_strong": eps["DP ε≤1"],
        "dp_noise_multiplier_strong": sigma["DP ε≤1"],
        "heldout_acc_untrained": untrained,
        "heldout_acc_no_dp": acc["no DP"],
        "heldout_acc_dp": acc["DP ε≤8"],
        "heldout_acc_dp_strong": acc["DP ε≤1"],
        "dp_gain_kept": kept,
        "heldout_loss_untrained": untrained_loss,
        "heldout_loss_no_dp": loss["no DP"],
        "heldout_loss_dp": loss["DP ε≤8"],
        "dp_loss_gain_kept": kept_loss,
        "forgetting_no_replay": forget["no replay"],
        "forgetting_replay": forget["replay"],
        "forgetting_loss_no_replay": forget_loss["no replay"],
        "forgetting_loss_replay": forget_loss["replay"],
        "stage_acc_no_replay": {str(k): v for k, v in final_stage["no replay"].items()},
        "stage_acc_replay": {str(k): v for k, v in final_stage["replay"].items()},
        "plot": str(out_dir / "privacy.png"),
        "seconds": round(time.perf_counter() - start, 1),
    }

"""Privacy and edge-continual benchmark: the same small federation without DP and with DP-SGD (at two
noise levels in the full mode), and a two-stage stream (standard-library source code, then pydoc
topics) with and without replay.

How it runs: every device round is ``aiflow_fl.federated.device.device_train`` with the ClientApp's
own ``clients.app.training_hooks`` (so DP-SGD and the continual stages/replay are exactly what a
Flower client runs) and the device state passes through Flower's ``context.state`` records between
rounds. The server side is an in-process FedAvg loop instead of the Ray simulation (the simulation
costs ~10 s of start-up per run, too much for five runs in the --quick minute): each round every
device starts from the global model with a fresh LoRA (``base`` = the global update), trains, and
the server averages the devices' products exactly (``aiflow_fl.aggregation.flexlora.aggregate``,
the ``fedavg`` strategy's rule) and folds the mean into the global update.

Model: the embedded SmolLM2-135M-Instruct, whole (``full``), with LoRA on the last two decoder layers
only. Why: every early-exit member of this backbone starts degenerate (held-out loss ≈ 19, accuracy
≈ 0.04: the tied LM head reads early features as "repeat the current token") and needs tens of steps
before its accuracy moves at all, so within a minute its "gain" is noise; the whole model starts
sensible (≈ 0.16 next-token accuracy on 8-token pydoc chunks) and LoRA on its last layers adapts it
to the device data in a few steps, while backpropagation stops at the first adapted layer (the
frozen 28 layers below cost a forward pass only).

DP levers (see :func:`settings`): many examples per device at a fixed batch (q = 1/64, so the
accountant lets σ ≈ 0.43 reach ε = 8 over the run's 4 steps), 8-token chunks so the expected batch
of 32 examples stays cheap, and plain DP-SGD (``privacy.optimizer=sgd``, ``privacy.lr=1.0``) for the
private runs while the non-private baseline keeps the training loop's AdamW (lr 5e-3): with the
noise per coordinate (σC/b ≈ 0.013) far above most coordinates' mean gradient, Adam moves every
coordinate by ≈ lr in a random direction, whereas SGD adds the noise linearly to the step (measured
on this benchmark's quick setting, 2 devices × 4 steps: DP-Adam lr 5e-3 kept 33 % of the accuracy
gain and 36 % of the loss gain; DP-SGD lr 0.3 / 0.6 / 1.0 kept 14 / 86 / 116 % of the accuracy gain).
The baseline is the better of the non-private settings tried (AdamW lr 5e-3 / 1e-2, SGD lr 0.3 /
0.6 / 1.0; SGD at 1.0 diverges without per-example clipping). Batch matters: an expected batch of
24 instead of 32 kept 20 %. Stream levers: a high learning rate (1.5e-2; 1e-2 in the full mode), so the stage-1 rounds on
pydoc overwrite what stage 0 learnt on code; replay mixes half of every stage-1 batch from a buffer
of stage-0 examples. The quick mode measures both effects on 64 held-out chunks (448 predicted
tokens: one token is 0.0022 of accuracy, so its figures, and the learning-rate comparisons above, are
coarse); the full mode on 512 (3,584 tokens). On 512 chunks the quick setting keeps 54 % of the
accuracy gain (DP-SGD lr 0.6: 55 %, lr 1.5: none; LoRA r2 at lr 0.25: 60 %; expected batch 64: 63 %).

The two stream runs share their stage-0 rounds: replay only acts once stage 1 starts (the buffer is
filled from the finished stage 0), so the stage-0 rounds run once and both runs continue from the
same global model and device states (``context.state`` copied) — same compute, same starting point.

Threads: on this 2-core machine shared by three engineers a 2-thread forward is 2.5× slower than a
1-thread one while another process holds a core (measured 1.19 s vs 0.47 s: every op waits for its
slower thread), while on idle cores two threads make the quick run ~1.3× faster (measured 61 s vs
81 s wall). :func:`pick_threads` takes two only when /proc/stat shows both cores idle, checked again
before every run (``threads`` in the figures); a burst of someone else's load in the middle of a
run still costs that run (seen once: 29 s of training instead of 8).

Figures: ``dp_epsilon`` (the largest ε any device reports after the whole run for the ε ≤ 8 run,
δ = ``dp_delta``), ``heldout_acc_untrained``, ``heldout_acc_no_dp``, ``heldout_acc_dp`` (ε ≤ 8),
``heldout_acc_dp_strong`` (the second, noisier level; full mode), ``dp_gain_kept`` = (acc_dp −
untrained) / (acc_no_dp − untrained) and ``dp_loss_gain_kept`` (the same on held-out loss),
``forgetting_no_replay``, ``forgetting_replay`` (drop of stage-0 accuracy from its best, after the
stage-1 rounds; same steps and batch size in both runs).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from aiflow_fl.aggregation import flexlora, lowrank
from aiflow_fl.aggregation.update import AdapterUpdate
from aiflow_fl.bench import results_dir
from aiflow_fl.config import AiflowConfig, load_config

DELTA = 1e-5
MODEL = "smollm2-135m-instruct"
LORA_MODULES = ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")


def last_layer_targets(num_layers: int, last: int = 2) -> str:
    """LoRA target list (module paths, which peft matches by suffix) for the last ``last`` decoder layers."""
    paths = [f"model.layers.{layer}.{m}" for layer in range(num_layers - last, num_layers) for m in LORA_MODULES]
    return "[" + ",".join(paths) + "]"


def settings(quick: bool) -> dict[str, Any]:
    """DP part: 2 devices × ``examples`` 8-token chunks of pydoc, expected batch 32, ``rounds`` ×
    ``steps``; stream part: 2 devices, 8-token chunks, batch 16, lr 1.5e-2 (full: 1e-2),
    ``stream_rounds_per_stage`` rounds of ``stream_steps`` steps per stage. Quick mode: one DP level (ε ≤ 8), the DP runs
    evaluated at the end only, one round per stage."""
    common = dict(model=MODEL, member="full", devices=2, rank=8,
                  seq_len=8, batch=32, examples=2048, heldout=64, lr=5e-3, max_grad_norm=1.0,
                  dp_optimizer="sgd", dp_lr=1.0,
                  # Same chunk length, example cap and held-out size as the DP part: the stream's pydoc stage
                  # reuses the partition the DP runs made (partitioning costs ~1 s per source and device).
                  stream_seq_len=8, stream_batch=16, stream_examples=2048, stream_heldout=64, stream_lr=1.5e-2,
                  buffer=32, replay_fraction=0.5)
    if quick:
        return common | dict(rounds=2, steps=2, strong_level=False, eval_every_round=False,
                             stream_devices=2, stream_rounds_per_stage=1, stream_steps=3)
    # Two rounds per stage: at lr 1.5e-2 the 12 steps per device go unstable (measured: the replay run's
    # stage-1 accuracy fell to 0.138, below the untrained 0.16), so the full stream uses 1e-2.
    # 512 held-out chunks (3,584 predicted tokens, one token = 0.00028 of accuracy) instead of quick's 64.
    return common | dict(rounds=3, steps=2, strong_level=True, eval_every_round=True, heldout=512, stream_heldout=512,
                         stream_devices=2, stream_rounds_per_stage=2, stream_steps=3, stream_lr=1e-2)


def make_config(s: dict[str, Any], targets: str, *extra: str) -> AiflowConfig:
    return load_config([
        f"model.name={s['model']}", f"federation.members=[{s['member']}]", f"federation.ranks=[{s['rank']}]",
        f"federation.num_devices={s['devices']}", f"federation.rounds={s['rounds']}", "data.source=pydoc",
        "data.partitioner=iid", f"data.seq_len={s['seq_len']}", f"data.max_examples_per_client={s['examples']}",
        f"data.max_heldout_examples={s['heldout']}", f"train.batch_size={s['batch']}",
        f"train.local_steps={s['steps']}", f"train.lr={s['lr']}", f"privacy.delta={DELTA}",
        f"privacy.max_grad_norm={s['max_grad_norm']}", f"lora.target_modules={targets}", "train.eval_batch_size=64",
        "family.dir=/nonexistent",  # the backbone's own members, even where a family has been built
        *extra,
    ])


def stream_config(s: dict[str, Any], targets: str, replay: bool) -> AiflowConfig:
    """Two stages (stdlib code, then pydoc); both runs keep a buffer of the same size (the buffer
    state is shared through the common stage-0 rounds), only the replay run draws from it."""
    rounds = 2 * s["stream_rounds_per_stage"]
    return make_config(
        s, targets, f"federation.rounds={rounds}", f"federation.num_devices={s['stream_devices']}",
        f"train.local_steps={s['stream_steps']}",
        f"train.lr={s['stream_lr']}", f"train.batch_size={s['stream_batch']}", f"data.seq_len={s['stream_seq_len']}",
        f"data.max_examples_per_client={s['stream_examples']}", f"data.max_heldout_examples={s['stream_heldout']}",
        "continual.enabled=true", "continual.stages=2", "continual.domains=[stdlib,pydoc]",
        f"continual.buffer_size={s['buffer']}",
        *(["continual.replay=reservoir", f"continual.replay_fraction={s['replay_fraction']}"] if replay
          else ["continual.replay=none"]),
    )


def idle_cores(window_s: float = 0.1) -> float | None:
    """Cores left idle by every other process over ``window_s`` (Linux ``/proc/stat``; None elsewhere).
    This process sleeps meanwhile, so what is busy is busy for someone else."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, all

    try:
        idle0, total0 = sample()
        time.sleep(window_s)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return cores * (idle1 - idle0) / max(1, total1 - total0)


def pick_threads() -> int:
    """torch threads for the next run: 2 when both cores are idle, else 1 (see the module doc)."""
    idle = idle_cores()
    cores = min(2, os.cpu_count() or 1)
    threads = cores if idle is None else max(1, min(cores, int(idle + 0.25)))
    torch.set_num_threads(threads)
    return threads


@dataclass
class Federation:
    """Server and device state of an in-process FedAvg run (see the module doc)."""

    contexts: list[Any]
    base: dict = field(default_factory=dict)
    round: int = 0
    evals: list[tuple[int, Any]] = field(default_factory=list)  # (round, evaluation)
    devices: list[list[dict[str, float]]] = field(default_factory=list)  # per round, per device metrics
    seconds: float = 0.0


def start_federation(cfg: AiflowConfig) -> Federation:
    from flwr.app import Context, RecordDict

    n = cfg.federation.num_devices
    return Federation([Context(run_id=1, node_id=i, node_config={"partition-id": i, "num-partitions": n},
                               state=RecordDict(), run_config={}) for i in range(n)])


def run_rounds(fed: Federation, cfg: AiflowConfig, last_round: int, evaluate: Callable[[Any, int], Any],
               eval_rounds: set[int]) -> Federation:
    """FedAvg rounds ``fed.round + 1 .. last_round``; ``evaluate(merged, round)`` after the rounds in
    ``eval_rounds``."""
    from clients.app import load_state, save_state, training_hooks
    from aiflow_fl.federated.device import device_profile, device_train

    t0 = time.perf_counter()
    for server_round in range(fed.round + 1, last_round + 1):
        updates, metrics = [], []
        for context in fed.contexts:
            profile = device_profile(dict(context.node_config), cfg)
            state = load_state(context)
            update, m = device_train(cfg, profile, state, AdapterUpdate(fed.base, 0) if fed.base else None, None,
                                     server_round, cfg.train.local_steps, cfg.train.lr,
                                     hooks=training_hooks(cfg, state, profile))
            save_state(context, state)
            updates.append(update)
            metrics.append(m)
        fed.base = lowrank.add([fed.base, flexlora.aggregate(updates).merged()])
        fed.devices.append(metrics)
        fed.round = server_round
        if server_round in eval_rounds:
            fed.evals.append((server_round, evaluate(AdapterUpdate(fed.base, 0), server_round)))
    fed.seconds += time.perf_counter() - t0
    return fed


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


def plot(path: Path, dp_runs: dict[str, Federation], stream_runs: dict[str, Federation]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    for label, fed in dp_runs.items():
        ax.plot([r for r, _ in fed.evals], [a for _, (a, _) in fed.evals], marker="o", label=label)
    ax.set(xlabel="round", ylabel="central held-out next-token accuracy", title="accuracy with and without DP")
    ax.legend(fontsize=8)
    ax = axes[1]
    for label, fed in dp_runs.items():
        if "dp-epsilon" not in fed.devices[0][0]:
            continue
        for d in range(len(fed.devices[0])):
            eps = [ms[d]["dp-epsilon"] for ms in fed.devices]
            ax.plot(range(1, len(eps) + 1), eps, marker="o", label=f"{label}, device {d}")
    ax.axhline(8.0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="round", ylabel=f"ε (δ={DELTA:g}), composed over the run", title="privacy spent per device")
    ax.legend(fontsize=7)
    ax = axes[2]
    for (label, fed), style in zip(stream_runs.items(), ("-", "--")):
        for stage in sorted({j for _, h in fed.evals for j in h}):
            xs, ys = zip(*[(r, h[stage][0]) for r, h in fed.evals if stage in h])
            ax.plot(xs, ys, style, marker="o", label=f"{label}: stage {stage}")
    ax.set(xlabel="round", ylabel="held-out accuracy of the stage", title="two-stage stream: stdlib code → pydoc")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False) -> dict[str, Any]:
    from aiflow_fl.continual import forgetting
    from aiflow_fl.family.member import member_from_config

    start = time.perf_counter()
    s = settings(quick)
    console = Console()
    num_layers = member_from_config(make_config(s, "[q_proj]"), s["member"]).num_layers
    targets = last_layer_targets(num_layers)
    base_cfg = make_config(s, targets)
    threads: dict[str, int] = {"setup": pick_threads()}

    # DP: the untrained member is evaluated once (the same held-out set for every run).
    evaluate = central_eval(base_cfg)
    untrained, untrained_loss = evaluate(None, 0)
    rounds = s["rounds"]
    eval_rounds = set(range(1, rounds + 1)) if s["eval_every_round"] else {rounds}
    private = ["privacy.enabled=true", f"privacy.optimizer={s['dp_optimizer']}", f"privacy.lr={s['dp_lr']}"]
    levels = [("no DP", []), ("DP ε≤8", [*private, "privacy.target_epsilon=8"])]
    if s["strong_level"]:
        levels.append(("DP ε≤1", [*private, "privacy.target_epsilon=1"]))
    dp_runs: dict[str, Federation] = {}
    for label, extra in levels:
        cfg = make_config(s, targets, *extra)
        threads[label] = pick_threads()  # the other engineers' load changes between runs
        fed = start_federation(cfg)
        fed.evals.append((0, (untrained, untrained_loss)))
        dp_runs[label] = run_rounds(fed, cfg, rounds, evaluate, eval_rounds)

    # Stream: shared stage-0 rounds, then stage 1 without and with replay (module doc).
    per_stage = s["stream_rounds_per_stage"]
    no_replay_cfg, replay_cfg = stream_config(s, targets, False), stream_config(s, targets, True)
    stage_evaluate = stage_eval(no_replay_cfg)  # same stages, chunks and held-out sets in both runs
    every = set(range(1, 2 * per_stage + 1))
    threads["stage 0"] = pick_threads()
    prefix = run_rounds(start_federation(no_replay_cfg), no_replay_cfg, per_stage, stage_evaluate, every)
    stream_runs: dict[str, Federation] = {}
    for label, cfg in (("no replay", no_replay_cfg), ("replay", replay_cfg)):
        threads[label] = pick_threads()
        stream_runs[label] = run_rounds(copy.deepcopy(prefix), cfg, 2 * per_stage, stage_evaluate, every)

    acc = {label: fed.evals[-1][1][0] for label, fed in dp_runs.items()}
    loss = {label: fed.evals[-1][1][1] for label, fed in dp_runs.items()}
    private = [label for label in dp_runs if label != "no DP"]
    eps = {label: max(m["dp-epsilon"] for m in dp_runs[label].devices[-1]) for label in private}
    sigma = {label: dp_runs[label].devices[-1][0]["dp-noise-multiplier"] for label in private}
    gain = acc["no DP"] - untrained
    kept = {label: (acc[label] - untrained) / gain if gain > 0 else float("nan") for label in dp_runs}
    loss_gain = untrained_loss - loss["no DP"]
    kept_loss = {label: (untrained_loss - loss[label]) / loss_gain if loss_gain > 0 else float("nan")
                 for label in dp_runs}
    # Forgetting of stage 0 after the stage-1 rounds: by accuracy (the figure) and by loss.
    forget = {label: forgetting([{j: a for j, (a, _) in h.items()} for _, h in fed.evals]).get(0, float("nan"))
              for label, fed in stream_runs.items()}
    forget_loss = {label: forgetting([{j: -l for j, (_, l) in h.items()} for _, h in fed.evals]).get(0, float("nan"))
                   for label, fed in stream_runs.items()}
    final_stage = {label: {j: a for j, (a, _) in fed.evals[-1][1].items()} for label, fed in stream_runs.items()}
    stage0_best = {label: max(h[0][0] for _, h in fed.evals) for label, fed in stream_runs.items()}

    out_dir = results_dir("privacy")
    plot(out_dir / "privacy.png", dp_runs, stream_runs)

    table = Table(title=f"privacy: SmolLM2 {s['member']}, LoRA r{s['rank']} on the last 2 layers, {s['devices']} devices, "
                        f"{rounds} rounds × {s['steps']} steps, batch {s['batch']} of {s['seq_len']} tokens, "
                        f"{s['examples']} examples/device{', quick' if quick else ''} | stream: batch {s['stream_batch']}, "
                        f"{per_stage} round(s) × {s['stream_steps']} steps per stage")
    for col in ("run", "σ", f"ε (δ={DELTA:g})", "held-out acc", "held-out loss", "acc gain kept", "loss gain kept", "s"):
        table.add_column(col)
    table.add_row("untrained member", "", "", f"{untrained:.4f}", f"{untrained_loss:.3f}", "", "", "")
    for label, fed in dp_runs.items():
        table.add_row(label, f"{sigma[label]:.3f}" if label in sigma else "-", f"{eps[label]:.3f}" if label in eps else "∞",
                      f"{acc[label]:.4f}", f"{loss[label]:.3f}", f"{kept[label]:.1%}", f"{kept_loss[label]:.1%}",
                      f"{fed.seconds:.0f}")
    for label, fed in stream_runs.items():
        accs = ", ".join(f"stage {j}: {a:.4f}" for j, a in sorted(final_stage[label].items()))
        table.add_row(f"stream, {label}", "", "", accs, f"stage-0 best {stage0_best[label]:.4f}",
                      f"forgetting {forget[label]:.4f}", f"(loss) {forget_loss[label]:.3f}", f"{fed.seconds:.0f}")
    console.print(table)

    return {
        "model": s["model"],
        "member": s["member"],
        "lora_targets": targets,
        "devices": s["devices"],
        "rounds": rounds,
        "local_steps": s["steps"],
        "batch_size": s["batch"],
        "examples_per_device": s["examples"],
        "seq_len": s["seq_len"],
        "threads": threads,
        "dp_epsilon": eps["DP ε≤8"],
        "dp_delta": DELTA,
        "dp_noise_multiplier": sigma["DP ε≤8"],
        "dp_sample_rate": dp_runs["DP ε≤8"].devices[-1][0]["dp-sample-rate"],
        "dp_max_grad_norm": s["max_grad_norm"],
        "optimizer_no_dp": f"adamw lr={s['lr']}",
        "optimizer_dp": f"{s['dp_optimizer']} lr={s['dp_lr']}",
        **({"dp_epsilon_strong": eps["DP ε≤1"], "dp_noise_multiplier_strong": sigma["DP ε≤1"],
            "heldout_acc_dp_strong": acc["DP ε≤1"], "dp_gain_kept_strong": kept["DP ε≤1"]} if "DP ε≤1" in dp_runs else {}),
        "heldout_acc_untrained": untrained,
        "heldout_acc_no_dp": acc["no DP"],
        "heldout_acc_dp": acc["DP ε≤8"],
        "dp_gain_kept": kept["DP ε≤8"],
        "heldout_loss_untrained": untrained_loss,
        "heldout_loss_no_dp": loss["no DP"],
        "heldout_loss_dp": loss["DP ε≤8"],
        "dp_loss_gain_kept": kept_loss["DP ε≤8"],
        "stream_rounds_per_stage": per_stage,
        "stream_local_steps": s["stream_steps"],
        "forgetting_no_replay": forget["no replay"],
        "forgetting_replay": forget["replay"],
        "forgetting_loss_no_replay": forget_loss["no replay"],
        "forgetting_loss_replay": forget_loss["replay"],
        "stage0_best_acc": stage0_best,
        "stage_acc_no_replay": {str(k): v for k, v in final_stage["no replay"].items()},
        "stage_acc_replay": {str(k): v for k, v in final_stage["replay"].items()},
        "run_seconds": {label: round(fed.seconds, 1) for label, fed in {**dp_runs, **stream_runs}.items()},
        "train_seconds": {label: round(sum(m["train-time-s"] for ms in fed.devices for m in ms), 1)
                          for label, fed in {**dp_runs, **stream_runs}.items()},
        "plot": str(out_dir / "privacy.png"),
        "seconds": round(time.perf_counter() - start, 1),
    }

"""Scale benchmark: N = 10, 100, 1000 simulated devices on Flower's simulation engine, and poisoned devices.

Every run is the repo's real ServerApp and ClientApp (``aiflow simulate``) in a process of its own, so
its peak RSS (``ru_maxrss`` of the process that runs the ServerApp and the Ray driver) is that run's
alone. With N registered devices, ``federation.fraction_train`` is chosen so the same K devices train
each round (Flower's ``sample_nodes`` through the Grid); each device derives its profile and its data
partition (iid shard of the ``stdlib`` chunks) from its own node id, and the server holds nothing per
registered device: so server memory and round time should not grow with N.

Then, at N = 10 (every device trains, run.seed = 2 makes devices 2 and 5 the attackers: 20 %), the same
federation with ``federation.attack_fraction=0.2`` (sign-flipped ×10 updates,
``aiflow_fl/federated/attacks.py``) under ``fedavg``, ``median`` and ``trimmed_mean``, against the clean
FedAvg run; accuracy = the server's held-out next-token accuracy after the last round (and its loss: a
tiny random member's accuracy barely moves, its loss does).

Figures (JSON): per N ``server_peak_rss_mb``, ``round_s`` (median over rounds after the first: round 1
also loads data and models in fresh Ray workers), ``downlink_bytes_per_round`` / ``uplink_bytes_per_round``
(the real serialized messages, all sampled devices), ``clean_acc``, ``fedavg_acc_with_attackers``,
``robust_acc_with_attackers`` (median and trimmed_mean), ``acc_before``, ratios against N = 10.
Run it under ``flock /tmp/aiflow-timing.lock`` on a shared machine.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from aiflow_fl.bench import results_dir

SIZES = (10, 100, 1000)
SEED = 2  # with 10 devices and attack_fraction 0.2 this seed makes exactly devices 2 and 5 attack
COMMON = [
    "data.source=stdlib", "data.partitioner=iid", "data.seq_len=32", "data.max_examples_per_client=8",
    "data.max_heldout_examples=48", "federation.members=[exit-2]", "federation.ranks=[4]", "federation.num_edges=1",
    "train.batch_size=4", "train.lr=1e-2", "federation.client_cpus=1", "family.dir=/nonexistent", "lora.dropout=0.0",
    f"run.seed={SEED}", "federation.downlink=lean",
]


def tiny_member_dir() -> Path:
    """A tiny random Llama (2 layers, hidden 32, the real SmolLM2 tokenizer) saved once in the model
    cache: a member small enough that 1000 registered devices fit and a round takes seconds on CPU."""
    from aiflow_fl.models import tiny_model_folder

    return tiny_model_folder("llama", num_layers=2, hidden_size=32)


def _settings(quick: bool) -> dict[str, Any]:
    return {"sampled": 4 if quick else 10, "rounds": 2 if quick else 4, "local_steps": 2 if quick else 4,
            "attack_rounds": 2 if quick else 4}


def _one(overrides: list[str]) -> dict[str, Any]:
    """Run one simulation in this process; its own peak RSS and the run folder's figures."""
    from aiflow_fl.federated.run import RunFolder, config_for
    from simulations.run import simulate

    cfg = config_for(overrides)
    start = time.perf_counter()
    simulate(cfg, show_progress=False)
    wall = time.perf_counter() - start
    folder = RunFolder(cfg.run.dir)
    train, evals = folder.records("train"), folder.records("eval")
    later = [t["round-s"] for t in train[1:]] or [t["round-s"] for t in train]
    return {
        "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "round_s": statistics.median(later),
        "round_s_all": [round(t["round-s"], 3) for t in train],
        "downlink_bytes_per_round": statistics.mean(t.get("bytes/cloud->device", 0) for t in train),
        "uplink_bytes_per_round": statistics.mean(t.get("bytes/device->cloud", 0) for t in train),
        "clients_per_round": [int(t["clients-ok"]) for t in train],
        "attackers_per_round": [int(t.get("attackers", 0)) for t in train],
        "acc_before": evals[0]["eval-accuracy"], "acc": evals[-1]["eval-accuracy"], "loss": evals[-1]["eval-loss"],
        "wall_s": wall,
    }


def _spawn(label: str, overrides: list[str], console: Console) -> dict[str, Any]:
    """One run in a fresh interpreter (its peak RSS is its own); a plain progress line per run."""
    console.print(f"scale: {label} ...")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "aiflow_benchmarks.scale", json.dumps(overrides)], env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"scale run '{label}' failed (rc {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    figures = json.loads(lines[-1])
    console.print(f"scale: {label}: round {figures['round_s']:.2f} s, server peak RSS {figures['server_peak_rss_mb']:.0f} MB, "
                  f"acc {figures['acc']:.4f}, wall {figures['wall_s']:.0f} s")
    return figures


def _plot(out: Path, result: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(n) for n in result["sizes"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(sizes, [result["server_peak_rss_mb"][str(n)] for n in sizes], "o-")
    axes[0].set(xscale="log", xlabel="registered devices N", ylabel="server peak RSS (MB)", title="server memory")
    axes[0].set_ylim(bottom=0)
    axes[1].plot(sizes, [result["round_s"][str(n)] for n in sizes], "o-")
    axes[1].set(xscale="log", xlabel="registered devices N", ylabel="median round (s)",
                title=f"round time ({result['sampled_per_round']} train per round)")
    axes[1].set_ylim(bottom=0)
    labels = ["clean\nFedAvg", "FedAvg\n20 % attackers", "median\n20 % attackers", "trimmed mean\n20 % attackers"]
    values = [result["clean_acc"], result["fedavg_acc_with_attackers"], result["robust_acc_with_attackers"]["median"],
              result["robust_acc_with_attackers"]["trimmed_mean"]]
    axes[2].bar(range(4), values, color=["tab:green", "tab:red", "tab:blue", "tab:blue"])
    axes[2].axhline(result["acc_before"], color="grey", ls="--", label="before training")
    axes[2].set_xticks(range(4), labels, fontsize=8)
    axes[2].set(ylabel="held-out next-token accuracy", title="sign-flipped ×10 updates (N = 10)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    path = out / ("scale-quick.png" if result["quick"] else "scale.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(quick: bool = False) -> dict[str, Any]:
    out = results_dir("scale")
    console = Console()
    s = _settings(quick)
    common = [*COMMON, f"model.name={tiny_member_dir()}"]
    runs_dir = out / ("runs-quick" if quick else "runs")
    shutil.rmtree(runs_dir, ignore_errors=True)  # this benchmark's own previous output
    per_n: dict[int, dict[str, Any]] = {}
    for n in SIZES:
        fraction = (s["sampled"] + 0.5) / n if n > s["sampled"] else 1.0  # int(n · fraction) = sampled
        per_n[n] = _spawn(f"N={n}", [*common, f"federation.num_devices={n}", f"federation.fraction_train={fraction:.6g}",
                                     f"federation.min_clients={min(s['sampled'], n)}", f"federation.rounds={s['rounds']}",
                                     f"train.local_steps={s['local_steps']}", "strategy=fedavg",
                                     f"run.dir={runs_dir / f'n{n}'}"], console)
    attack_common = [*common, "federation.num_devices=10", "federation.fraction_train=1.0", "federation.min_clients=10",
                     f"federation.rounds={s['attack_rounds']}", f"train.local_steps={s['local_steps']}"]
    clean = _spawn("clean FedAvg (N=10)", [*attack_common, "strategy=fedavg", f"run.dir={runs_dir / 'clean'}"], console)
    attacked: dict[str, dict[str, Any]] = {}
    for strategy in ("fedavg", "median", "trimmed_mean"):
        attacked[strategy] = _spawn(f"{strategy}, 20 % attackers (N=10)", [
            *attack_common, f"strategy={strategy}", "federation.attack_fraction=0.2", "federation.attack=signflip",
            "federation.attack_scale=10", f"run.dir={runs_dir / f'attack-{strategy}'}"], console)
    ref = per_n[SIZES[0]]
    result: dict[str, Any] = {
        "sizes": list(SIZES),
        "sampled_per_round": s["sampled"],
        "rounds": s["rounds"],
        "server_peak_rss_mb": {str(n): round(r["server_peak_rss_mb"], 1) for n, r in per_n.items()},
        "round_s": {str(n): round(r["round_s"], 3) for n, r in per_n.items()},
        "round_s_all": {str(n): r["round_s_all"] for n, r in per_n.items()},
        "downlink_bytes_per_round": {str(n): round(r["downlink_bytes_per_round"]) for n, r in per_n.items()},
        "uplink_bytes_per_round": {str(n): round(r["uplink_bytes_per_round"]) for n, r in per_n.items()},
        "clients_per_round": {str(n): r["clients_per_round"] for n, r in per_n.items()},
        "rss_ratio_1000_vs_10": round(per_n[SIZES[-1]]["server_peak_rss_mb"] / ref["server_peak_rss_mb"], 3),
        "round_ratio_1000_vs_10": round(per_n[SIZES[-1]]["round_s"] / ref["round_s"], 3),
        "acc_before": round(clean["acc_before"], 4),
        "clean_acc": round(clean["acc"], 4),
        "fedavg_acc_with_attackers": round(attacked["fedavg"]["acc"], 4),
        "robust_acc_with_attackers": {k: round(attacked[k]["acc"], 4) for k in ("median", "trimmed_mean")},
        "attackers_per_round": attacked["fedavg"]["attackers_per_round"],
        "attack": "signflip x10, 20 % of devices (2 of 10)",
        "quick": quick,
    }
    result["targets"] = {
        "rss_within_1.15x": result["rss_ratio_1000_vs_10"] <= 1.15,
        "round_within_1.3x": result["round_ratio_1000_vs_10"] <= 1.3,
        "downlink_le_uplink": all(result["downlink_bytes_per_round"][k] <= result["uplink_bytes_per_round"][k]
                                  for k in result["downlink_bytes_per_round"]),
        "robust_within_0.01_of_clean": all(abs(v - result["clean_acc"]) <= 0.01 for v in result["robust_acc_with_attackers"].values()),
        "fedavg_derailed": abs(result["fedavg_acc_with_attackers"] - result["clean_acc"]) > 0.01,
    }
    result["plot"] = str(_plot(out, result))
    table = Table(title=f"scale: {s['sampled']} of N devices train per round, {s['rounds']} rounds")
    for col in ("N", "server RSS MB", "round s", "down B/round", "up B/round"):
        table.add_column(col, justify="right")
    for n in SIZES:
        k = str(n)
        table.add_row(k, f"{result['server_peak_rss_mb'][k]:.0f}", f"{result['round_s'][k]:.2f}",
                      f"{result['downlink_bytes_per_round'][k]:,}", f"{result['uplink_bytes_per_round'][k]:,}")
    console.print(table)
    attack_table = Table(title="N = 10, sign-flipped x10 updates from 2 of 10 devices")
    attack_table.add_column("run")
    attack_table.add_column("held-out acc", justify="right")
    attack_table.add_row("before training", f"{result['acc_before']:.4f}")
    attack_table.add_row("clean FedAvg", f"{result['clean_acc']:.4f}")
    attack_table.add_row("FedAvg, attacked", f"{result['fedavg_acc_with_attackers']:.4f}")
    for k, v in result["robust_acc_with_attackers"].items():
        attack_table.add_row(f"{k}, attacked", f"{v:.4f}")
    console.print(attack_table)
    console.print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in result["targets"].items()))
    return result


if __name__ == "__main__":  # one run, in its own process (see _spawn)
    print(json.dumps(_one(json.loads(sys.argv[1]))), flush=True)

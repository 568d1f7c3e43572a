"""Scale benchmark: N = 10, 100, 1000 simulated devices on Flower's simulation engine, and poisoned devices.

The member: a tiny Llama (2 layers, hidden 64, the real SmolLM2 tokenizer) pre-trained once, all
weights, for 150 steps on the ``stdlib`` source (Python code; cached in the model cache), so it is a
language model that has learnt something — a random one sits at ln V and LoRA cannot move its
next-token accuracy. The federated task is LoRA (rank 4 on q, v, o, up, down) on the ``pydoc`` source
(the language reference's prose): another domain, on which held-out next-token accuracy rises within a
few rounds.

Every size is the repo's real ServerApp and ClientApp (``aiflow simulate``) in a process of its own, so
its peak RSS (``ru_maxrss`` of the process that runs the ServerApp and the Ray driver) is that run's
alone. With N registered devices, ``federation.fraction_train`` is chosen so the same K = 10 devices
train each round (Flower's ``sample_nodes`` through the Grid); each device derives its profile and its
data partition (iid shard of the chunks) from its own node id, and the server holds nothing per
registered device: so server memory and round time should not grow with N.

Then, at N = 10 (every device trains; run.seed = 2 makes devices 2 and 5 the attackers: 20 %), the same
federation with ``federation.attack_fraction=0.2`` (each attacker sends its round's change ×(−10),
``aiflow_fl/federated/attacks.py``) under ``fedavg``, ``median`` and ``trimmed_mean``, against the clean
run (the N = 10 run above: the same config without attackers). The attacked runs share one process
(their memory is not measured), which saves interpreter and import start-ups. Accuracy = the server's
held-out next-token accuracy after the last round (128 chunks of 16 tokens). ``--quick``: N = 10 and
1000 only, 2 rounds, and only ``median`` as the robust rule (4 Ray start-ups instead of 6).

Figures (JSON): per N ``server_peak_rss_mb``, ``round_s`` (median over rounds after the first: round 1
also loads data and models in fresh Ray workers), ``downlink_bytes_per_round`` / ``uplink_bytes_per_round``
(the real serialized messages, all sampled devices), ``clean_acc``, ``fedavg_acc_with_attackers``,
``robust_acc_with_attackers`` (per rule), ``acc_before``, ratios against N = 10.
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
SAMPLED = 10  # devices that train per round at every N (all of them at N = 10)
SEED = 2  # with 10 devices and attack_fraction 0.2 this seed makes exactly devices 2 and 5 attack
PRETRAIN = {"source": "stdlib", "steps": 150, "batch_size": 16, "seq_len": 32, "lr": 3e-3, "hidden": 64, "layers": 2}
COMMON = [
    "data.source=pydoc", "data.partitioner=iid", "data.seq_len=16", "data.max_examples_per_client=8",
    "data.max_heldout_examples=128", "federation.members=[exit-2]", "federation.ranks=[4]", "federation.num_edges=1",
    "lora.target_modules=[q_proj,v_proj,o_proj,up_proj,down_proj]", "train.batch_size=4", "train.lr=1e-2",
    "federation.client_cpus=1", "family.dir=/nonexistent", "lora.dropout=0.0", f"run.seed={SEED}",
    "federation.downlink=lean",
]
ATTACK = ["federation.attack_fraction=0.2", "federation.attack=signflip", "federation.attack_scale=10"]


def pretrained_member_dir(console: Console | None = None) -> Path:
    """The benchmark's member: :func:`aiflow_fl.models.tiny_model` (Llama, ``PRETRAIN`` sizes) with
    every weight trained by AdamW for ``PRETRAIN['steps']`` steps of next-token loss on random chunks
    of ``PRETRAIN['source']``; saved once, with the SmolLM2 tokenizer, under the model cache."""
    import torch

    from aiflow_fl.data import load_chunks
    from aiflow_fl.federated.local import lm_loss
    from aiflow_fl.files import temp_dir_beside
    from aiflow_fl.models import cache_dir, load_tokenizer, tiny_model

    c = PRETRAIN
    path = cache_dir() / "bench" / f"tiny-llama-l{c['layers']}-h{c['hidden']}-{c['source']}-{c['steps']}steps"
    if (path / "config.json").is_file():
        return path
    if console is not None:
        console.print(f"scale: pre-training the member once ({c['steps']} steps on {c['source']}) ...")
    tokenizer = load_tokenizer()
    chunks = load_chunks(c["source"], tokenizer, c["seq_len"]).input_ids
    model = tiny_model("llama", num_layers=c["layers"], hidden_size=c["hidden"], seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(c["steps"]):
        rows = torch.randint(0, chunks.shape[0], (c["batch_size"],), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        lm_loss(model, chunks[rows]).backward()
        optimizer.step()
    model.eval()
    tmp = temp_dir_beside(path)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def _settings(quick: bool) -> dict[str, Any]:
    return {"sizes": (10, 1000) if quick else SIZES, "rounds": 2 if quick else 4, "local_steps": 4,
            "robust": ("median",) if quick else ("median", "trimmed_mean")}


def _one(overrides: list[str]) -> dict[str, Any]:
    """Run one simulation in this process; its peak RSS so far and the run folder's figures."""
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
        "acc_per_round": [round(e["eval-accuracy"], 4) for e in evals],
        "loss_before": evals[0]["eval-loss"], "wall_s": wall,
    }


def _spawn(runs: dict[str, list[str]], console: Console) -> dict[str, dict[str, Any]]:
    """The runs, one after another, in one fresh interpreter (its peak RSS is theirs, not this
    process's); a plain progress line per run as it finishes."""
    labels = list(runs)
    console.print(f"scale: {', '.join(labels)} ...")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-m", "aiflow_benchmarks.scale", json.dumps(list(runs.values()))], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: dict[str, dict[str, Any]] = {}
    tail: list[str] = []
    assert child.stdout is not None
    for line in child.stdout:
        tail = [*tail, line][-40:]
        if line.startswith("{") and len(out) < len(labels):
            label = labels[len(out)]
            figures = out[label] = json.loads(line)
            console.print(f"scale: {label}: round {figures['round_s']:.2f} s, server peak RSS {figures['server_peak_rss_mb']:.0f} MB, "
                          f"acc {figures['acc_before']:.4f} -> {figures['acc']:.4f}, wall {figures['wall_s']:.0f} s")
    if child.wait() != 0 or len(out) < len(labels):
        raise RuntimeError(f"scale runs {labels} failed (rc {child.returncode}):\n{''.join(tail)[-3000:]}")
    return out


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
    robust = result["robust_acc_with_attackers"]
    labels = ["clean\nFedAvg", "FedAvg\n20 % attackers", *[f"{k.replace('_', ' ')}\n20 % attackers" for k in robust]]
    values = [result["clean_acc"], result["fedavg_acc_with_attackers"], *robust.values()]
    axes[2].bar(range(len(values)), values, color=["tab:green", "tab:red", *["tab:blue"] * len(robust)])
    axes[2].axhline(result["acc_before"], color="grey", ls="--", label="before training")
    axes[2].set_xticks(range(len(values)), labels, fontsize=8)
    axes[2].set(ylabel="held-out next-token accuracy", title="sign-flipped ×10 changes (N = 10)")
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
    common = [*COMMON, f"model.name={pretrained_member_dir(console)}"]
    runs_dir = out / ("runs-quick" if quick else "runs")
    shutil.rmtree(runs_dir, ignore_errors=True)  # this benchmark's own previous output
    rounds = [f"federation.rounds={s['rounds']}", f"train.local_steps={s['local_steps']}"]
    per_n: dict[int, dict[str, Any]] = {}
    for n in s["sizes"]:
        fraction = (SAMPLED + 0.5) / n if n > SAMPLED else 1.0  # int(n · fraction) = SAMPLED
        per_n[n] = _spawn({f"N={n}": [*common, *rounds, f"federation.num_devices={n}", f"federation.fraction_train={fraction:.6g}",
                                      f"federation.min_clients={min(SAMPLED, n)}", "strategy=fedavg",
                                      f"run.dir={runs_dir / f'n{n}'}"]}, console)[f"N={n}"]
    # the clean run is N = 10's: all 10 devices, FedAvg, no attackers; the attacked runs differ only in ATTACK
    attacked = _spawn({f"{k}, 20 % attackers (N=10)": [*common, *rounds, "federation.num_devices=10", "federation.fraction_train=1",
                                                        "federation.min_clients=10", f"strategy={k}", *ATTACK,
                                                        f"run.dir={runs_dir / f'attack-{k}'}"]
                       for k in ("fedavg", *s["robust"])}, console)
    attacked = {label.split(",")[0]: figures for label, figures in attacked.items()}
    clean, ref, big = per_n[10], per_n[s["sizes"][0]], per_n[s["sizes"][-1]]
    result: dict[str, Any] = {
        "sizes": list(s["sizes"]),
        "sampled_per_round": SAMPLED,
        "rounds": s["rounds"],
        "local_steps": s["local_steps"],
        "server_peak_rss_mb": {str(n): round(r["server_peak_rss_mb"], 1) for n, r in per_n.items()},
        "round_s": {str(n): round(r["round_s"], 3) for n, r in per_n.items()},
        "round_s_all": {str(n): r["round_s_all"] for n, r in per_n.items()},
        "downlink_bytes_per_round": {str(n): round(r["downlink_bytes_per_round"]) for n, r in per_n.items()},
        "uplink_bytes_per_round": {str(n): round(r["uplink_bytes_per_round"]) for n, r in per_n.items()},
        "clients_per_round": {str(n): r["clients_per_round"] for n, r in per_n.items()},
        "rss_ratio_1000_vs_10": round(big["server_peak_rss_mb"] / ref["server_peak_rss_mb"], 3),
        "round_ratio_1000_vs_10": round(big["round_s"] / ref["round_s"], 3),
        "acc_before": round(clean["acc_before"], 4),
        "clean_acc": round(clean["acc"], 4),
        "fedavg_acc_with_attackers": round(attacked["fedavg"]["acc"], 4),
        "robust_acc_with_attackers": {k: round(attacked[k]["acc"], 4) for k in s["robust"]},
        "acc_per_round": {"clean": clean["acc_per_round"], **{k: v["acc_per_round"] for k, v in attacked.items()}},
        "loss_before": round(clean["loss_before"], 4),
        "loss_after": {"clean": round(clean["loss"], 4), **{k: round(v["loss"], 4) for k, v in attacked.items()}},
        "attackers_per_round": attacked["fedavg"]["attackers_per_round"],
        "attack": "signflip x10 of the round's change, 20 % of devices (2 of 10)",
        "member": f"tiny Llama l{PRETRAIN['layers']} h{PRETRAIN['hidden']}, pre-trained {PRETRAIN['steps']} steps on {PRETRAIN['source']}",
        "quick": quick,
    }
    result["targets"] = {
        "rss_within_1.15x": result["rss_ratio_1000_vs_10"] <= 1.15,
        "round_within_1.3x": result["round_ratio_1000_vs_10"] <= 1.3,
        "downlink_le_uplink": all(result["downlink_bytes_per_round"][k] <= result["uplink_bytes_per_round"][k]
                                  for k in result["downlink_bytes_per_round"]),
        "clean_learns": result["clean_acc"] > result["acc_before"] + 0.01,
        "robust_within_0.01_of_clean": all(abs(v - result["clean_acc"]) <= 0.01 for v in result["robust_acc_with_attackers"].values()),
        "fedavg_derailed": abs(result["fedavg_acc_with_attackers"] - result["clean_acc"]) > 0.01,
    }
    result["plot"] = str(_plot(out, result))
    table = Table(title=f"scale: {SAMPLED} of N devices train per round, {s['rounds']} rounds")
    for col in ("N", "server RSS MB", "round s", "down B/round", "up B/round"):
        table.add_column(col, justify="right")
    for n in s["sizes"]:
        k = str(n)
        table.add_row(k, f"{result['server_peak_rss_mb'][k]:.0f}", f"{result['round_s'][k]:.2f}",
                      f"{result['downlink_bytes_per_round'][k]:,}", f"{result['uplink_bytes_per_round'][k]:,}")
    console.print(table)
    attack_table = Table(title="N = 10, sign-flipped x10 changes from 2 of 10 devices")
    attack_table.add_column("run")
    attack_table.add_column("held-out acc", justify="right")
    attack_table.add_column("held-out loss", justify="right")
    attack_table.add_row("before training", f"{result['acc_before']:.4f}", f"{result['loss_before']:.3f}")
    attack_table.add_row("clean FedAvg", f"{result['clean_acc']:.4f}", f"{result['loss_after']['clean']:.3f}")
    attack_table.add_row("FedAvg, attacked", f"{result['fedavg_acc_with_attackers']:.4f}", f"{result['loss_after']['fedavg']:.3f}")
    for k, v in result["robust_acc_with_attackers"].items():
        attack_table.add_row(f"{k}, attacked", f"{v:.4f}", f"{result['loss_after'][k]:.3f}")
    console.print(attack_table)
    console.print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in result["targets"].items()))
    return result


if __name__ == "__main__":  # runs in a process of their own (see _spawn): one JSON line per run
    for overrides in json.loads(sys.argv[1]):
        print(json.dumps(_one(overrides)), flush=True)

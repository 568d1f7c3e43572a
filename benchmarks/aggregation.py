"""Aggregation benchmark: exactness, hierarchy, communication, platform overhead and accuracy.

Figures (all measured in this run):

* ``exact_error`` — per method, max |merged ΔW − Σ p_k s_k B_k A_k| on random updates with
  heterogeneous ranks, alphas, example counts and a shallow member (SmolLM2-sized 576×576 modules;
  64×64 with ``--quick``).
* ``hier_equals_flat`` — per method, whether edge-then-cloud (exact edge rank) equals the flat
  aggregation for several random groupings (max error < 1e-4 relative to the update's scale).
* Federated runs in **one** Flower simulation (``flwr.simulation.run_simulation``, Ray backend) of a
  small real peft client (``benchmarks/_lora_client.py``: tiny pre-trained Llama, LoRA on q/v/o/down,
  AdamW, non-IID Markov-chain domains, heterogeneous ranks 2/4/8):

  - ``heldout_acc`` — per method, held-out next-token accuracy of the server's model after the same
    number of rounds (flat federation), plus ``heldout_acc_hier`` for FlexLoRA through edges;
  - ``cloud_bytes_per_round`` (FlexLoRA with edges, ``edge_rank`` = the largest device rank) and
    ``flat_cloud_bytes_per_round`` (the same federation without edges), ``devices_per_edge``, and
    ``cloud_bytes_per_round_exact_edges`` (edges at exact rank);
  - ``overhead_vs_flower_fedavg`` — median wall time of a round of our hierarchical strategy divided
    by that of Flower's stock ``FedAvg`` on the same devices doing the same local training
    (homogeneous rank 4, since stock FedAvg cannot average different shapes); rounds of the two are
    interleaved so machine load hits both alike.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from aiflow_fl.aggregation import EXACT_METHODS, METHODS, AdapterUpdate, LoraFactors, hierarchical, lowrank
from aiflow_fl.bench import results_dir

HERE = Path(__file__).resolve().parent
ACC_METHODS = ("fedit", "ffa", "flora", "flexlora", "hetlora", "fedexlora", "fedavg")


def _client_module():
    name = "aiflow_bench_lora_client"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "_lora_client.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(module)  # Ray workers cannot import it by name
    return sys.modules[name]


# ---------------------------------------------------------------------------------------- math
def random_updates(dim: int, seed: int) -> list[AdapterUpdate]:
    gen = torch.Generator().manual_seed(seed)
    keys = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    specs = [(4, 40, 8.0), (8, 25, 16.0), (16, 60, 32.0), (8, 10, 8.0), (2, 33, 4.0), (4, 12, 16.0)]
    updates = []
    for i, (rank, n, alpha) in enumerate(specs):
        layer_keys = keys[:1] if i == 4 else keys  # device 4 is a shallow member
        layers = {k: LoraFactors(torch.randn(rank, dim, generator=gen) / dim**0.5, torch.randn(dim, rank, generator=gen) / dim**0.5, alpha / rank) for k in layer_keys}
        updates.append(AdapterUpdate(layers, n))
    return updates


def reference(updates: list[AdapterUpdate]) -> dict[str, torch.Tensor]:
    out = {}
    for key in {k for u in updates for k in u.layers}:
        have = [u for u in updates if key in u.layers]
        total = sum(u.num_examples for u in have)
        out[key] = sum(u.num_examples / total * u.layers[key].delta().double() for u in have)
    return out


def max_abs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def math_figures(quick: bool) -> dict[str, Any]:
    dim = 64 if quick else 576
    updates = random_updates(dim, seed=0)
    ref = reference(updates)
    scale = max(float(v.abs().max()) for v in ref.values())
    groupings = [[[0, 1, 2], [3, 4, 5]], [[5, 0, 3], [1, 4], [2]]] + ([] if quick else [[[0], [1, 2], [3, 4, 5]], [[0, 1, 2, 3, 4, 5]]])
    exact_error, hier_equals_flat, hier_error = {}, {}, {}
    for name, method in METHODS.items():
        flat = lowrank.dense(method(updates).merged())
        exact_error[name] = max_abs(flat, ref)
        errors = [max_abs(lowrank.dense(hierarchical([[updates[i] for i in g] for g in grouping], method).merged()), flat) for grouping in groupings]
        hier_error[name] = max(errors)
        hier_equals_flat[name] = bool(max(errors) < 1e-4 * scale)
    return {"exact_error": exact_error, "hier_equals_flat": hier_equals_flat, "hier_vs_flat_error": hier_error, "update_scale": scale, "module_dim": dim}


# ---------------------------------------------------------------------------------- simulation
def simulation_figures(quick: bool) -> dict[str, Any]:
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    from peft import get_peft_model_state_dict

    from aiflow_fl.config import load_config
    from aiflow_fl.protocol import arrays_to_update
    from strategies import build_strategy

    lc = _client_module()
    lc.base_model()  # pre-train (or load) the frozen model once, before the workers need it
    num_devices, num_edges = (4, 2) if quick else (8, 2)
    rounds = 3 if quick else 6
    overhead_rounds = 3 if quick else 6
    steps = 5 if quick else 10
    overhead_steps = 20  # local work of a round in the overhead comparison (both strategies alike)
    hetero = lc.default_devices(num_devices, ranks=(2, 4, 8), num_edges=num_edges)
    homo = [lc.DeviceSpec(rank=4, alpha=8.0, edge_id=d.edge_id, domains=d.domains, examples=d.examples) for d in hetero]
    client = lc.make_client_app({"hetero": hetero, "homo": homo}, steps=steps)
    max_rank = max(d.rank for d in hetero)
    out: dict[str, Any] = {}

    def one_round(strategy: Any, grid: Grid, rnd: int, arrays: ArrayRecord, device_set: str) -> tuple[ArrayRecord, float]:
        start = time.perf_counter()
        config = ConfigRecord({"device-set": device_set, "local-steps": overhead_steps if device_set == "homo" else steps})
        replies = grid.send_and_receive(messages=strategy.configure_train(rnd, arrays, config, grid), timeout=600)
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        return (new_arrays if new_arrays is not None else arrays), time.perf_counter() - start

    def ours(overrides: list[str]) -> Any:
        cfg = load_config(["federation.min_clients=" + str(num_devices), f"federation.num_edges={num_edges}", *overrides])
        return build_strategy(cfg)

    server = ServerApp()

    phase_s: dict[str, float] = {}
    t_start = time.perf_counter()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        phase_s["ray_start"] = time.perf_counter() - t_start
        try:
            with Progress(transient=True) as progress:
                total = 2 * overhead_rounds + rounds * (len(ACC_METHODS) + 2)
                task = progress.add_task("warm-up and overhead", total=total)
                # 1. platform overhead: our hierarchical strategy vs Flower's FedAvg, interleaved
                stock = FedAvg(fraction_evaluate=0.0, min_train_nodes=num_devices, min_available_nodes=num_devices)
                hier = ours(["strategy=fedavg", "hierarchy.enabled=true", "hierarchy.edge_rank=0"])
                init = lc.lora_model(homo[0], {}, {}, False, seed=0)
                stock_arrays = ArrayRecord({k: v.detach().clone() for k, v in get_peft_model_state_dict(init).items()})
                ours_arrays = ArrayRecord()
                t_stock, t_ours = [], []
                t0 = time.perf_counter()
                one_round(FedAvg(fraction_evaluate=0.0, min_train_nodes=num_devices, min_available_nodes=num_devices), grid, 1, stock_arrays, "homo")  # warm-up: Ray actors start, torch imports
                phase_s["warm_up"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                for rnd in range(1, overhead_rounds + 1):
                    stock_arrays, dt = one_round(stock, grid, rnd, stock_arrays, "homo")
                    t_stock.append(dt)
                    progress.advance(task)
                    ours_arrays, dt = one_round(hier, grid, rnd, ours_arrays, "homo")
                    t_ours.append(dt)
                    progress.advance(task)
                phase_s["overhead"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                out["round_s_stock_fedavg"] = t_stock
                out["round_s_ours_hier"] = t_ours
                # 2. accuracy per method (flat), FlexLoRA through edges, and cloud bytes
                runs = {name: ours([f"strategy={name}"]) for name in ACC_METHODS}
                runs["flexlora+edges"] = ours(["strategy=flexlora", "hierarchy.enabled=true", f"hierarchy.edge_rank={max_rank}"])
                runs["flexlora+exact-edges"] = ours(["strategy=flexlora", "hierarchy.enabled=true", "hierarchy.edge_rank=0"])
                accs: dict[str, float] = {}
                curves: dict[str, list[float]] = {}
                for name, strategy in runs.items():
                    arrays = ArrayRecord()
                    progress.update(task, description=f"{name}")
                    curves[name] = [lc.heldout_accuracy({})]
                    for rnd in range(1, rounds + 1):
                        arrays, _ = one_round(strategy, grid, rnd, arrays, "hetero")
                        curves[name].append(lc.heldout_accuracy(arrays_to_update(arrays).layers))
                        progress.advance(task)
                    accs[name] = curves[name][-1]
                phase_s["accuracy"] = time.perf_counter() - t0
                out["server_s_ours_hier"] = [h["server-s"] for h in hier.history]
                out["accs"], out["curves"] = accs, curves
                out["history"] = {name: s.history for name, s in runs.items()}
        except BaseException as exc:  # surfaced after the simulation (a ServerApp error is only logged)
            out["error"] = exc

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"object_store_memory": 128 * 1024 * 1024, "include_dashboard": False}}
    run_simulation(server_app=server, client_app=client, num_supernodes=num_devices, backend_config=backend, verbose_logging=False)
    if "error" in out:
        raise out["error"]

    def per_round(history: list[dict[str, Any]], key: str) -> float:
        return statistics.mean(h[key] for h in history)

    hist = out["history"]
    figures = {
        "heldout_acc": {name: round(out["accs"][name], 4) for name in ACC_METHODS},
        "heldout_acc_hier": round(out["accs"]["flexlora+edges"], 4),
        "heldout_acc_hier_exact_edges": round(out["accs"]["flexlora+exact-edges"], 4),
        "heldout_acc_pretrained": round(out["curves"]["fedit"][0], 4),
        "cloud_bytes_per_round": per_round(hist["flexlora+edges"], "cloud-bytes"),
        "cloud_bytes_per_round_exact_edges": per_round(hist["flexlora+exact-edges"], "cloud-bytes"),
        "flat_cloud_bytes_per_round": per_round(hist["flexlora"], "cloud-bytes"),
        "sim_round_s_hier": per_round(hist["flexlora+edges"], "sim-round-s"),
        "sim_round_s_flat": per_round(hist["flexlora"], "sim-round-s"),
        "devices_per_edge": num_devices / num_edges,
        "edge_rank": max_rank,
        "device_ranks": [d.rank for d in hetero],
        "overhead_vs_flower_fedavg": statistics.median(out["round_s_ours_hier"]) / statistics.median(out["round_s_stock_fedavg"]),
        "round_s_ours_hier": [round(t, 3) for t in out["round_s_ours_hier"]],
        "server_s_ours_hier": [round(t, 4) for t in out["server_s_ours_hier"]],
        "overhead_local_steps": overhead_steps,
        "phase_s": {k: round(v, 2) for k, v in phase_s.items()},
        "round_s_stock_fedavg": [round(t, 3) for t in out["round_s_stock_fedavg"]],
        "rounds": rounds,
        "local_steps": steps,
        "num_devices": num_devices,
        "client": "benchmarks/_lora_client.py (own minimal peft loop; tiny pre-trained Llama)",
    }
    figures["cloud_bytes_ratio"] = figures["cloud_bytes_per_round"] / figures["flat_cloud_bytes_per_round"]
    _plot(out, hist, figures)
    return figures


def _plot(out: dict[str, Any], hist: dict[str, list[dict[str, Any]]], figures: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, curve in out["curves"].items():
        axes[0].plot(range(len(curve)), curve, marker="o", label=name)
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("held-out next-token accuracy")
    axes[0].set_title("accuracy per method (non-IID, ranks 2/4/8)")
    axes[0].legend(fontsize=7)
    links = ["bytes/device->cloud", "bytes/cloud->device", "bytes/device->edge", "bytes/edge->device", "bytes/edge->cloud", "bytes/cloud->edge"]
    runs = ["flexlora", "flexlora+exact-edges", "flexlora+edges"]
    width = 0.25
    for i, run in enumerate(runs):
        values = [statistics.mean(h[link] for h in hist[run]) / 1024 for link in links]
        axes[1].bar([x + i * width for x in range(len(links))], values, width, label=run)
    axes[1].set_xticks([x + width for x in range(len(links))], [link.replace("bytes/", "") for link in links], rotation=30, fontsize=7)
    axes[1].set_ylabel("KiB per round")
    axes[1].set_title("bytes per link per round")
    axes[1].legend(fontsize=7)
    axes[2].plot(out["round_s_stock_fedavg"], marker="o", label="Flower FedAvg (stock)")
    axes[2].plot(out["round_s_ours_hier"], marker="o", label="aiflow hierarchical")
    axes[2].set_xlabel("round")
    axes[2].set_ylabel("wall s")
    axes[2].set_title(f"round time, ratio {figures['overhead_vs_flower_fedavg']:.2f}")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results_dir("aggregation") / "aggregation.png", dpi=110)
    plt.close(fig)


def run(quick: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thin factors: extra threads only spin against the other users of the machine
    try:
        start = time.perf_counter()
        figures = math_figures(quick)
        figures["math_s"] = round(time.perf_counter() - start, 2)
        figures.update(simulation_figures(quick))
    finally:
        torch.set_num_threads(threads)
    table = Table(title="aggregation: exactness, hierarchy, accuracy")
    for col in ("method", "exact_error", "hier_equals_flat", "heldout_acc"):
        table.add_column(col)
    for name in METHODS:
        acc = figures["heldout_acc"].get(name)
        table.add_row(name, f"{figures['exact_error'][name]:.2e}", str(figures["hier_equals_flat"][name]), "-" if acc is None else f"{acc:.3f}")
    Console().print(table)
    comm = Table(title="communication and overhead")
    comm.add_column("figure")
    comm.add_column("value")
    for key in ("devices_per_edge", "edge_rank", "flat_cloud_bytes_per_round", "cloud_bytes_per_round", "cloud_bytes_ratio", "cloud_bytes_per_round_exact_edges",
                "sim_round_s_flat", "sim_round_s_hier", "heldout_acc_pretrained", "heldout_acc_hier", "overhead_vs_flower_fedavg"):
        value = figures[key]
        comm.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(comm)
    figures["plot"] = str(results_dir("aggregation") / "aggregation.png")
    return figures

"""``aiflow simulate``: the ServerApp and ClientApp of this repo under Flower's simulation engine (Ray).

N = ``federation.num_devices`` virtual SuperNodes (each a device with partition-id i of N, its member
and LoRA rank cycled from ``federation.members`` / ``federation.ranks``, its edge = contiguous group of
``federation.num_edges``); each client gets ``federation.client_cpus`` CPUs (default 1: two clients at
a time on a 2-core machine). A live rich view shows the round, clients done and the running loss.

``run.resume=RUN_DIR`` starts from that run's config snapshot (other overrides on top) and its last
checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aiflow_fl.config import AiflowConfig, load_config
from aiflow_fl.errors import AiflowError
from aiflow_fl.federated.run import RunFolder


def config_for(overrides: list[str]) -> AiflowConfig:
    """The config of a simulation; with ``run.resume=DIR`` the run's own snapshot is the base."""
    resume = [o.split("=", 1)[1] for o in overrides if o.startswith("run.resume=")]
    if resume and resume[-1]:
        snapshot = Path(resume[-1]) / "config.yaml"
        if not snapshot.is_file():
            raise AiflowError(f"run.resume={resume[-1]} is not a run folder (no config.yaml in it).")
        return load_config(overrides, config_file=snapshot)
    return load_config(overrides)


def backend_config(cfg: AiflowConfig) -> dict[str, Any]:
    cpus = cfg.federation.client_cpus
    if cpus <= 0:
        raise AiflowError(f"federation.client_cpus is {cpus}; it must be > 0 (CPUs reserved per simulated client).")
    total = max(float(os.cpu_count() or 1), cpus)
    return {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        # A small object store: updates are adapters (MBs), and the machine is shared.
        "init_args": {"num_cpus": int(total), "object_store_memory": 256 * 1024 * 1024, "include_dashboard": False},
    }


def simulate(cfg: AiflowConfig, show_progress: bool = True, node_overrides: dict[int, dict[str, Any]] | None = None):
    """Run the federation in-process; returns the server's :class:`server.app.ServerSummary`.

    ``node_overrides[partition_id]``: extra node-config entries for a simulated device.
    """
    from flwr.simulation import run_simulation
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from clients.app import build_client_app
    from server.app import build_server_app

    if cfg.federation.num_devices < 1:
        raise AiflowError(f"federation.num_devices is {cfg.federation.num_devices}; it must be >= 1.")
    if cfg.run.resume:
        cfg.run.dir = cfg.run.resume
    elif not cfg.run.dir:
        from time import gmtime, strftime

        cfg.run.dir = str(Path("runs") / strftime("%Y%m%d-%H%M%S", gmtime()))
    cfg.run.dir = str(Path(cfg.run.dir).resolve())
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summaries: list = []
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), disable=not show_progress)
    with progress:
        server_app = build_server_app(cfg, progress if show_progress else None, summaries)
        client_app = build_client_app(cfg, node_overrides)
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_devices,
                       backend_config=backend_config(cfg))
    if not summaries:
        failed = RunFolder(cfg.run.dir).records("failed")
        reason = failed[-1]["error"] if failed else "see the log above"
        raise AiflowError(f"The federated simulation did not finish: {reason}. Run folder: {cfg.run.dir}.")
    return summaries[0]


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """The figures of a finished run, read back from its metrics.jsonl."""
    folder = RunFolder(run_dir)
    evals, trains = folder.records("eval"), folder.records("train")
    out: dict[str, Any] = {"run_dir": str(folder.path), "rounds": len(trains)}
    if evals:
        out["heldout_loss_before"], out["heldout_loss_after"] = evals[0]["eval-loss"], evals[-1]["eval-loss"]
        out["heldout_acc_before"], out["heldout_acc_after"] = evals[0]["eval-accuracy"], evals[-1]["eval-accuracy"]
    if trains:
        out["loss_first"], out["loss_last"] = trains[0].get("train-loss-first"), trains[-1].get("train-loss-last")
        out["clients"] = max(int(t.get("clients-ok", 0)) for t in trains)
        out["client_peak_rss_mb"] = max(float(t.get("client-peak-rss-mb", 0.0)) for t in trains)
        rounds_s = sorted(float(t.get("round-s", 0.0)) for t in trains)
        out["round_s_median"] = rounds_s[len(rounds_s) // 2] if len(rounds_s) % 2 else sum(rounds_s[len(rounds_s) // 2 - 1:len(rounds_s) // 2 + 1]) / 2
    out["plot"] = str(folder.path / "summary.png")
    return out


def simulate_command(overrides: list[str]) -> dict[str, Any]:
    """The body of ``aiflow simulate``: run, then print a summary table and one JSON line."""
    from rich.console import Console
    from rich.table import Table

    cfg = config_for(overrides)
    summary = simulate(cfg)
    figures = summarize(summary.run_dir)
    table = Table(title=f"federated simulation ({cfg.strategy}, {cfg.federation.num_devices} devices, {cfg.federation.num_edges} edges)")
    table.add_column("figure")
    table.add_column("value")
    for key, value in figures.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    print(json.dumps(figures), flush=True)
    return figures

"""``aiflow simulate``: the ServerApp and ClientApp of this repo under Flower's simulation engine (Ray).

N = ``federation.num_devices`` virtual SuperNodes (each a device with partition-id i of N, its member
and LoRA rank cycled from ``federation.members`` / ``federation.ranks``, its edge = contiguous group of
``federation.num_edges``); each client gets ``federation.client_cpus`` CPUs (default 1: two clients at
a time on a 2-core machine). With ``RAY_ADDRESS=HEAD:6379`` set, the run joins that Ray cluster
instead of starting a local one (the same ServerApp/ClientApp, unchanged). A live rich view shows the round, clients done and the running loss.

``run.resume=RUN_DIR`` starts from that run's config snapshot (other overrides on top) and its last
checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aiflow_fl.config import AiflowConfig
from aiflow_fl.errors import AiflowError
from aiflow_fl.federated.run import RunFolder, config_for, print_summary, resolve_run_dir, summarize


def backend_config(cfg: AiflowConfig) -> dict[str, Any]:
    cpus = cfg.federation.client_cpus
    if cpus <= 0:
        raise AiflowError(f"federation.client_cpus is {cpus}; it must be > 0 (CPUs reserved per simulated client).")
    address = os.environ.get("RAY_ADDRESS", "")
    if address:  # join a running Ray cluster: its own CPUs and object store (ray.init refuses num_cpus then)
        return {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                "init_args": {"address": address, "include_dashboard": False}}
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
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from aiflow_fl.progress import progress_bar

    from clients.app import build_client_app
    from server.app import build_server_app

    from aiflow_fl.federated.preflight import check_before_start

    backend = backend_config(cfg)
    check_before_start(cfg)  # data, members, run folder: refused before Ray starts or a folder is made
    resolve_run_dir(cfg)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summaries: list = []
    progress = progress_bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), disable=not show_progress)
    with progress:
        server_app = build_server_app(cfg, progress if show_progress else None, summaries)
        client_app = build_client_app(cfg, node_overrides)
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_devices,
                       backend_config=backend)
    if not summaries:
        failed = RunFolder(cfg.run.dir).records("failed")
        reason = failed[-1]["error"] if failed else "see the log above"
        raise AiflowError(f"The federated simulation did not finish: {reason}. Run folder: {cfg.run.dir}.")
    return summaries[0]


def simulate_command(overrides: list[str]) -> dict[str, Any]:
    """The body of ``aiflow simulate``: run, then print a summary table and one JSON line."""
    cfg = config_for(overrides)
    summary = simulate(cfg)
    title = f"federated simulation ({cfg.strategy}, {cfg.federation.num_devices} devices, {cfg.federation.num_edges} edges)"
    return print_summary(summarize(summary.run_dir), title)

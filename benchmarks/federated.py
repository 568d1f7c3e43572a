"""Federated benchmark: LoRA fine-tuning of the embedded default's members under Flower's simulation engine.

Devices hold Dirichlet partitions (by topic) of the Python reference (``pydoc`` topics); the server
evaluates every member on the held-out chunks of all topics before training (round 0: the untrained
members) and after every round. ``--quick``: one small member, two devices, two short rounds.

Figures: ``rounds``, ``clients``, ``loss_first`` / ``loss_last`` (clients' training loss on their first
and last step), ``heldout_acc_before`` / ``heldout_acc_after`` (mean over members of next-token accuracy
on the held-out chunks), ``heldout_loss_before`` / ``heldout_loss_after``, ``acc_gain``,
``client_peak_rss_mb`` (largest peak RSS of a client process), ``round_s_median`` (wall time per round).
Timings on a shared machine are disturbed by other work; compare runs side by side.
"""

from __future__ import annotations

import shutil
from typing import Any

from rich.console import Console
from rich.table import Table

from aiflow_fl.bench import results_dir
from aiflow_fl.federated.run import RunFolder, config_for, summarize
from simulations.run import simulate

COMMON = ["data.source=pydoc", "data.partitioner=dirichlet", "data.dirichlet_alpha=0.5", "strategy=fedavg",
          "family.dir=/nonexistent-use-early-exit-members", "federation.client_cpus=1"]
QUICK = ["federation.members=[eesb-1]", "federation.ranks=[8]", "federation.num_devices=2", "federation.num_edges=1",
         "federation.rounds=2", "train.local_steps=3", "train.batch_size=4", "train.lr=1e-3", "data.seq_len=64",
         "data.max_examples_per_client=64", "data.max_heldout_examples=16"]
FULL = ["federation.members=[eesb-1,full]", "federation.ranks=[4,8]", "federation.num_devices=4", "federation.num_edges=2",
        "federation.rounds=3", "train.local_steps=8", "train.batch_size=4", "train.lr=1e-3", "data.seq_len=128",
        "data.max_examples_per_client=128", "data.max_heldout_examples=32"]


def run(quick: bool = False) -> dict[str, Any]:
    out = results_dir("federated")
    run_dir = out / ("run-quick" if quick else "run")
    if run_dir.exists():
        shutil.rmtree(run_dir)  # this benchmark's own previous output
    cfg = config_for([*COMMON, *(QUICK if quick else FULL), f"run.dir={run_dir}"])
    simulate(cfg, show_progress=True)
    figures = summarize(run_dir)
    evals = RunFolder(run_dir).records("eval")
    result: dict[str, Any] = {
        "rounds": figures["rounds"],
        "clients": figures["clients"],
        "members": list(dict.fromkeys(cfg.federation.members)),
        "loss_first": round(figures["loss_first"], 4),
        "loss_last": round(figures["loss_last"], 4),
        "heldout_loss_before": round(figures["heldout_loss_before"], 4),
        "heldout_loss_after": round(figures["heldout_loss_after"], 4),
        "heldout_acc_before": round(figures["heldout_acc_before"], 4),
        "heldout_acc_after": round(figures["heldout_acc_after"], 4),
        "acc_gain": round(figures["heldout_acc_after"] - figures["heldout_acc_before"], 4),
        "client_peak_rss_mb": round(figures["client_peak_rss_mb"], 1),
        "round_s_median": round(figures["round_s_median"], 2),
        "heldout_chunks": cfg.data.max_heldout_examples,
        "plot": str(out / ("summary-quick.png" if quick else "summary.png")),
    }
    shutil.copyfile(run_dir / "summary.png", result["plot"])
    table = Table(title=f"federated: {cfg.federation.num_devices} devices, {cfg.federation.rounds} rounds, {cfg.strategy}")
    table.add_column("member")
    table.add_column("held-out acc before")
    table.add_column("after")
    table.add_column("held-out loss before")
    table.add_column("after")
    for member in result["members"]:
        table.add_row(member, f"{evals[0][f'eval-accuracy/{member}']:.4f}", f"{evals[-1][f'eval-accuracy/{member}']:.4f}",
                      f"{evals[0][f'eval-loss/{member}']:.3f}", f"{evals[-1][f'eval-loss/{member}']:.3f}")
    Console().print(table)
    figures_table = Table(title="figures")
    figures_table.add_column("figure")
    figures_table.add_column("value")
    for key, value in result.items():
        figures_table.add_row(key, str(value))
    Console().print(figures_table)
    return result

"""The aiflow-fl ServerApp: runs the rounds, evaluates centrally, keeps the run folder, resumes.

Per run (:func:`run_server`):

1. typed config from the Flower run config (``aiflow_fl.config.from_run_config``), or given directly
   by the in-process simulation;
2. the run folder: new (config snapshot) or, with ``run.resume=RUN_DIR``, the existing one — its last
   checkpoint becomes the starting update and only the remaining rounds run;
3. the strategy from ``strategies.build_strategy(cfg)`` (per-node messages, aggregation, faults,
   ``federation.min_clients``), driven through a :class:`WatchedGrid` (progress, per-client timeout);
4. after every cloud round: central held-out evaluation of each member with the merged update, one
   ``eval`` and one ``train`` line in ``metrics.jsonl``, and an atomic checkpoint of the strategy's
   state (cumulative base and adapter apart, with the rule that cuts the adapter; devices keep their
   own state files, see ``clients/app.py``);
5. at the end: ``summary.png`` (loss / accuracy per round).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from aiflow_fl.config import AiflowConfig, from_run_config
from aiflow_fl.federated.central import CentralEvaluator, worse_than_uniform
from aiflow_fl.federated.progress import WatchedGrid
from aiflow_fl.federated.run import RunFolder
from aiflow_fl.aggregation.update import AdapterUpdate


@dataclass
class ServerSummary:
    run_dir: Path
    rounds_done: int
    resumed_from: int


def _client_summary(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Example-weighted train loss, and the extremes that matter for devices (memory, throughput)."""
    if not metrics:
        return {"clients-ok": 0}
    weights = [float(m.get("num-examples", 1)) for m in metrics]
    total = sum(weights) or 1.0
    mean = lambda key: sum(w * float(m.get(key, 0.0)) for w, m in zip(weights, metrics)) / total  # noqa: E731
    return {
        "clients-ok": len(metrics),
        "train-loss": mean("train-loss"),
        "train-loss-first": mean("train-loss-first"),
        "train-loss-last": mean("train-loss-last"),
        "tokens-per-s": mean("tokens-per-s"),
        "client-peak-rss-mb": max(float(m.get("peak-rss-mb", 0.0)) for m in metrics),
        "client-train-s-max": max(float(m.get("train-time-s", 0.0)) for m in metrics),
        # tensors of optimizer state the least lucky device restored (0 after a resume was the old bug)
        "optimizer-restored-min": min(float(m.get("optimizer-restored", 0.0)) for m in metrics),
        "attackers": sum(int(m.get("attacker", 0.0)) for m in metrics),  # poisoned updates (federation.attack_fraction)
        "num-examples": total,
    }


def _link_totals(history: list[dict[str, Any]]) -> dict[str, float]:
    """Bytes per link and simulated time of one cloud round, summed over its edge rounds."""
    totals: dict[str, float] = {}
    for record in history:
        for key, value in record.items():
            if key.startswith(("bytes/", "cloud-bytes", "sim-round-s")):
                totals[key] = totals.get(key, 0) + value
    return totals


def _weighted_eval(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Devices' held-out loss and accuracy, weighted by their held-out sizes."""
    weights = [float(m.get("num-examples", 0)) for m in metrics]
    total = sum(weights) or 1.0
    return {
        "devices": len(metrics),
        "eval-loss": sum(w * float(m["eval-loss"]) for w, m in zip(weights, metrics)) / total,
        "eval-accuracy": sum(w * float(m["eval-accuracy"]) for w, m in zip(weights, metrics)) / total,
    }


def run_server(grid: Grid, cfg: AiflowConfig, progress: Any = None) -> ServerSummary:
    """Run (or resume) a federated fine-tuning run on ``grid`` (see the module docstring)."""
    from aiflow_fl.continual import RoundReporter, check_run_config, plot_run_folder
    from strategies import build_strategy

    check_run_config(cfg)  # privacy / continual values: refuse before any training
    edge_rounds = cfg.hierarchy.edge_rounds if cfg.hierarchy.enabled else 1
    if cfg.run.resume:
        folder = RunFolder.open_for_resume(cfg.run.resume, cfg)
        checkpoint = folder.latest_checkpoint()
    else:
        folder, checkpoint = RunFolder.create(cfg), None
    done = int(checkpoint.meta.get("round", 0)) if checkpoint else 0
    folder.truncate_after(done)  # rounds after the checkpoint are redone
    remaining = cfg.federation.rounds - done
    log(INFO, "aiflow-fl run folder %s: %d round(s) done, %d to go", folder.path, done, remaining)
    if cfg.run.resume:
        folder.log({"round": done, "kind": "resume", "from-checkpoint": str(checkpoint.path) if checkpoint else ""})
    if remaining <= 0:
        folder.plot()
        return ServerSummary(folder.path, done, done)

    strategy = build_strategy(cfg, fraction_evaluate=cfg.federation.fraction_evaluate)
    if checkpoint is not None:  # the cloud's base, adapter (its rank) and rule, as the interrupted run had them
        strategy.load_state(checkpoint.tensors, checkpoint.meta.get("strategy-state", {}))
    strategy.round_offset = done * edge_rounds  # devices see global round numbers (seeds, stages, state files)
    if cfg.privacy.server_side:
        from aiflow_fl.privacy import apply_server_side

        apply_server_side(strategy, cfg)  # central DP inside the aggregation (device-level ε)
    watched = WatchedGrid(grid, progress)
    watched.round_offset = done * edge_rounds
    evaluator = CentralEvaluator(cfg)
    reporter = RoundReporter(cfg, folder.records("continual"))  # ε per device, accuracy per stage
    round_start = [time.perf_counter()]
    # The cloud's base at the start of the current cloud round: with the edges' merges of the last round
    # it makes each edge's specialist (collab.save_specialists; aiflow_fl/collab/specialists.py).
    cloud_base = [dict(strategy.base)]

    def evaluate_fn(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """After each Flower round: on cloud-round ends, evaluate, log and checkpoint (atomically)."""
        if flower_round == 0:
            cloud_base[0] = dict(strategy.base)
            if checkpoint is not None:
                return None  # evaluated in the interrupted run already
            metrics = evaluator(None)
            folder.log({"round": 0, "kind": "eval", **metrics})
            folder.save_eval_chunks(0, evaluator.per_chunk)
            bad = worse_than_uniform(metrics, evaluator.vocab_size)
            if bad:
                import math

                log(WARNING, "\n%s\nWARNING: member(s) %s start at held-out loss %s, worse than guessing uniformly over the "
                    "vocabulary (ln %d = %.1f). Without a built family in family.dir=%s these are raw early exits of the "
                    "backbone (no trained branch): fine-tuning them measures recovery from a broken model, not learning. "
                    "Build a family first (`aiflow family build family.dir=%s`, or `aiflow demo`), or train "
                    "federation.members=[full].\n%s", "!" * 78, ", ".join(bad), ", ".join(f"{v:.1f}" for v in bad.values()),
                    evaluator.vocab_size, math.log(evaluator.vocab_size), cfg.family.dir, cfg.family.dir, "!" * 78)
                folder.log({"round": 0, "kind": "warning", "worse-than-uniform": bad})
            round_start[0] = time.perf_counter()
            return MetricRecord(metrics)
        if flower_round % edge_rounds:
            return None
        cloud_round = done + flower_round // edge_rounds
        merged = AdapterUpdate(strategy.merged(), 0)
        metrics = evaluator(merged)
        train_rounds = range(watched.round_offset + flower_round - edge_rounds + 1, watched.round_offset + flower_round + 1)
        client = _client_summary([m for r in train_rounds for m in watched.client_metrics.get(r, [])])
        # The strategy counts replies it left out (errors, malformed updates); the grid, the nodes that
        # never replied (timeouts).
        history = strategy.history[-edge_rounds:]
        failures = [f for r in train_rounds for f in watched.failures.get(r, [])]
        round_s = time.perf_counter() - round_start[0]
        folder.log({"round": cloud_round, "kind": "train", **client, "round-s": round_s,
                    **_link_totals(history),
                    "clients-ok": history[-1]["clients-ok"],
                    "clients-failed": sum(h["clients-failed"] for h in history) + sum("timed out" in f for f in failures),
                    "failures": failures})
        folder.log({"round": cloud_round, "kind": "eval", **metrics})
        folder.save_eval_chunks(cloud_round, evaluator.per_chunk)
        device_evals = watched.eval_metrics.get(watched.round_offset + flower_round, [])
        if device_evals:  # the devices' own held-out data: their domains
            folder.log({"round": cloud_round, "kind": "device-eval", **_weighted_eval(device_evals)})
        for record in reporter.records(cloud_round, [m for r in train_rounds for m in watched.client_metrics.get(r, [])], merged):
            folder.log(record)
        folder.save_checkpoint(cloud_round, strategy.state_tensors(),
                               {"round": cloud_round, "strategy": cfg.strategy, "strategy-state": strategy.state_meta()})
        if cloud_round == cfg.federation.rounds and cfg.collab.save_specialists and cfg.hierarchy.enabled:
            from aiflow_fl.collab.specialists import save_run_specialists

            saved = save_run_specialists(folder.path, cfg, strategy, cloud_base[0])
            log(INFO, "saved the general member and %d edge specialist(s) under %s", len(saved) - 1, saved[0].parent)
        cloud_base[0] = dict(strategy.base)
        log(INFO, "round %d: held-out loss %.4f, accuracy %.4f (checkpoint saved)", cloud_round,
            metrics["eval-loss"], metrics["eval-accuracy"])
        round_start[0] = time.perf_counter()
        return MetricRecord(metrics)

    train_config = ConfigRecord({"local-steps": cfg.train.local_steps, "lr": cfg.train.lr})
    try:
        strategy.start(grid=watched, initial_arrays=ArrayRecord(), num_rounds=remaining,
                       timeout=cfg.federation.client_timeout_s, train_config=train_config, evaluate_fn=evaluate_fn)
    except Exception as exc:
        folder.log({"round": done, "kind": "failed", "error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        folder.plot()
        plot_run_folder(folder)
    return ServerSummary(folder.path, cfg.federation.rounds, done)


def build_server_app(cfg: AiflowConfig | None = None, progress: Any = None, summaries: list | None = None) -> ServerApp:
    """A ServerApp; ``cfg`` fixes the config (in-process simulation), else it comes from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else from_run_config(dict(context.run_config))
        summary = run_server(grid, run_cfg, progress)
        if summaries is not None:
            summaries.append(summary)

    return app


app = build_server_app()

__all__ = ["ServerSummary", "app", "build_server_app", "run_server"]

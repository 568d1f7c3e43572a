"""The run folder: what a federated run leaves behind, and what resume, benchmarks and users read.

::

    RUN_DIR/
      config.yaml            the effective config (snapshot at start; a resumed run must match it)
      metrics.jsonl          one JSON object per line: {"round": r, "kind": "train"|"eval"|..., ...}
      checkpoints/
        round-0003.safetensors   the global state after round 3 (tensors + JSON metadata)
      summary.png            loss / accuracy per round

Every write that replaces a file goes to a temp file in the same folder first and is renamed
(atomic on POSIX), so a run killed at any moment leaves the previous checkpoint intact. Metrics are
appended a line at a time and fsynced; a torn last line (kill mid-write) is skipped when reading.
"""

from __future__ import annotations

import io
import json
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save

from aiflow_fl.config import AiflowConfig, load_config, to_dict, to_yaml
from aiflow_fl.errors import AiflowError
from aiflow_fl.files import atomic_write_bytes

_CKPT = re.compile(r"^round-(\d+)\.safetensors$")
# Config sections that may differ when a run is resumed (where it lives, how long it runs, resources).
RESUMABLE_CHANGES = ("run", "federation.rounds", "federation.client_cpus", "federation.client_timeout_s")


@dataclass
class Checkpoint:
    """A round's saved server state: ``base/<module>::A|B|scaling`` (the cumulative base) and
    ``adapter/…`` (the global adapter, at its rank), or, from older runs, the merged update unprefixed."""

    server_round: int
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]
    path: Path

    def merged(self):
        """The server's model after that round as one update (base + adapter, exact factors)."""
        from flwr.app import Array, ArrayRecord

        from aiflow_fl.aggregation import lowrank
        from aiflow_fl.aggregation.update import AdapterUpdate
        from aiflow_fl.protocol import arrays_to_update

        def part(prefix: str) -> dict:
            record = ArrayRecord({k[len(prefix):]: Array(v) for k, v in self.tensors.items() if k.startswith(prefix)})
            return arrays_to_update(record).layers

        if not any(k.startswith(("base/", "adapter/")) for k in self.tensors):
            return AdapterUpdate(part(""), 0)
        return AdapterUpdate(lowrank.add([part("base/"), part("adapter/")]), 0)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        full = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], full + ".")
        elif a.get(key) != b.get(key):
            out.append(full)
    return out


class RunFolder:
    """A run's folder: config snapshot, metrics log, atomic checkpoints, summary plot."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @classmethod
    def create(cls, cfg: AiflowConfig) -> "RunFolder":
        """A new run folder (``run.dir`` or ``runs/<UTC time>``) with the config snapshot."""
        path = resolve_run_dir(cfg)
        if path.exists() and any(path.iterdir()):
            raise AiflowError(
                f"Run folder {path} already exists and is not empty. Resume it with run.resume={path}, or choose "
                "another run.dir."
            )
        folder = cls(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder.config_path, to_yaml(cfg).encode())
        return folder

    @classmethod
    def open_for_resume(cls, path: str | Path, cfg: AiflowConfig) -> "RunFolder":
        """An existing run folder; the config must match its snapshot except for RESUMABLE_CHANGES."""
        folder = cls(path)
        if not folder.config_path.is_file():
            raise AiflowError(f"run.resume={path} is not a run folder (no config.yaml in it).")
        saved = to_dict(load_config(config_file=folder.config_path))
        changed = [k for k in _differences(saved, to_dict(cfg)) if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)]
        if changed:
            raise AiflowError(
                f"Cannot resume {path}: the config differs from the run's snapshot in {', '.join(changed)}. Only "
                f"{', '.join(RESUMABLE_CHANGES)} may change on resume; drop those overrides or start a new run."
            )
        return folder

    # --- metrics -------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line (fsynced: a killed run keeps every finished line)."""
        line = json.dumps({"time": round(time.time(), 3), **record}, default=float)
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        out = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if kind is None or record.get("kind") == kind:
                out.append(record)
        return out

    def truncate_after(self, server_round: int) -> None:
        """Drop records of rounds after ``server_round`` (they were not checkpointed: resume redoes them)."""
        kept = [r for r in self.records() if int(r.get("round", 0)) <= server_round]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, server_round: int, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
        """Write ``checkpoints/round-R.safetensors`` atomically (temp file, fsync, rename)."""
        path = self.checkpoint_dir / f"round-{server_round:04d}.safetensors"
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        atomic_write_bytes(path, save(arrays, metadata={"round": str(server_round), "meta": json.dumps(meta)}))
        return path

    def checkpoints(self) -> list[tuple[int, Path]]:
        if not self.checkpoint_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoint_dir.iterdir() if (m := _CKPT.match(p.name))]
        return sorted(found)

    def load_checkpoint(self, path: Path) -> Checkpoint:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            metadata = fh.metadata() or {}
        return Checkpoint(int(metadata["round"]), load_file(str(path)), json.loads(metadata.get("meta", "{}")), path)

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest readable checkpoint (an unreadable newest one is skipped, never trusted)."""
        for _, path in reversed(self.checkpoints()):
            try:
                return self.load_checkpoint(path)
            except Exception:  # corrupt file: fall back to the one before
                continue
        return None

    # --- summary -------------------------------------------------------------------------------
    def plot(self) -> Path:
        """summary.png: training loss, held-out loss / accuracy and (when counted) bytes per link per round."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = self.records("train")
        evals = self.records("eval")
        links = sorted({k for r in train for k in r if k.startswith("bytes/")})
        fig, axes = plt.subplots(1, 3 if links else 2, figsize=(15 if links else 10, 4))
        ax_loss, ax_acc = axes[0], axes[1]
        if train:
            ax_loss.plot([r["round"] for r in train], [r["train-loss"] for r in train], "o-", label="train loss (clients)")
        if evals:
            ax_loss.plot([r["round"] for r in evals], [r["eval-loss"] for r in evals], "s-", label="held-out loss (server)")
            ax_acc.plot([r["round"] for r in evals], [r["eval-accuracy"] for r in evals], "s-", color="C2", label="held-out next-token accuracy (server)")
        device_evals = self.records("device-eval")
        if device_evals:
            ax_acc.plot([r["round"] for r in device_evals], [r["eval-accuracy"] for r in device_evals], "^--", color="C3",
                        label="devices' own held-out accuracy")
        ax_loss.set_xlabel("round")
        ax_loss.set_ylabel("cross-entropy")
        ax_loss.legend()
        ax_acc.set_xlabel("round")
        ax_acc.set_ylabel("accuracy")
        ax_acc.legend()
        if links:  # what each link of the hierarchy carried per cloud round (summed over its edge rounds)
            ax_bytes = axes[2]
            for key in links:
                ax_bytes.plot([r["round"] for r in train], [r.get(key, 0) / 1e6 for r in train], "o-", label=key[len("bytes/"):])
            ax_bytes.set_xlabel("round")
            ax_bytes.set_ylabel("MB per round")
            ax_bytes.legend(fontsize=8)
        fig.suptitle(f"federated run {self.path.name}")
        fig.tight_layout()
        out = self.path / "summary.png"
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(out, png.getvalue())
        return out


def config_for(overrides: list[str]) -> AiflowConfig:
    """The config of a simulation; with ``run.resume=DIR`` the run's own snapshot is the base."""
    resume = [o.split("=", 1)[1] for o in overrides if o.startswith("run.resume=")]
    if resume and resume[-1]:
        snapshot = Path(resume[-1]) / "config.yaml"
        if not snapshot.is_file():
            raise AiflowError(f"run.resume={resume[-1]} is not a run folder (no config.yaml in it).")
        return load_config(overrides, config_file=snapshot)
    return load_config(overrides)


def resolve_run_dir(cfg: AiflowConfig) -> Path:
    """Fix ``run.dir`` to an absolute path (``run.resume`` if resuming, else ``runs/<UTC time>``):
    the ServerApp may run in another working directory (a SuperLink's)."""
    if cfg.run.resume:
        cfg.run.dir = cfg.run.resume
    elif not cfg.run.dir:
        cfg.run.dir = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    cfg.run.dir = str(Path(cfg.run.dir).resolve())
    return Path(cfg.run.dir)


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
        out["round_s_median"] = statistics.median(float(t.get("round-s", 0.0)) for t in trains)
    device_evals = folder.records("device-eval")
    if device_evals:
        out["device_heldout_acc_last"] = device_evals[-1]["eval-accuracy"]
    out["plot"] = str(folder.path / "summary.png")
    return out


def print_summary(figures: dict[str, Any], title: str) -> dict[str, Any]:
    """A rich table of a run's figures, then the figures as one JSON line."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value")
    for key, value in figures.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    print(json.dumps(figures), flush=True)
    return figures

"""The run folder: what a federated run leaves behind, and what resume, benchmarks and users read.

::

    RUN_DIR/
      config.yaml            the effective config (snapshot at start; a resumed run must match it)
      metrics.jsonl          one JSON object per line: {"round": r, "kind": "train"|"eval"|..., ...}
      checkpoints/
        round-0003.safetensors   the global state after round 3 (tensors + JSON metadata)
      eval/
        round-0003.safetensors   per held-out chunk and member: summed NLL, correct top-1, tokens
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

    def save_eval_chunks(self, server_round: int, per_member: dict[str, dict[str, np.ndarray]]) -> Path:
        """``eval/round-R.safetensors``: the central evaluation's per-chunk sums, key ``MEMBER/nll|correct|tokens``."""
        path = self.path / "eval" / f"round-{server_round:04d}.safetensors"
        arrays = {f"{member}/{key}": np.ascontiguousarray(value, dtype=np.float64)
                  for member, values in per_member.items() for key, value in values.items()}
        atomic_write_bytes(path, save(arrays, metadata={"round": str(server_round)}))
        return path

    def eval_chunks(self, server_round: int) -> dict[str, dict[str, np.ndarray]]:
        """What :meth:`save_eval_chunks` wrote for ``server_round`` (empty when that round has none)."""
        path = self.path / "eval" / f"round-{server_round:04d}.safetensors"
        if not path.is_file():
            return {}
        out: dict[str, dict[str, np.ndarray]] = {}
        for key, value in load_file(str(path)).items():
            member, name = key.rsplit("/", 1)
            out.setdefault(member, {})[name] = value
        return out

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
    def title(self) -> str:
        """What ran, from the config snapshot: flat (devices -> server) or hierarchical (-> edges -> cloud)."""
        if not self.config_path.is_file():
            return f"federated run {self.path.name}"
        cfg = load_config(config_file=self.config_path)
        fed = cfg.federation
        if cfg.hierarchy.enabled:
            where = (f"{fed.num_devices} devices -> {fed.num_edges} edges -> cloud, "
                     f"{cfg.hierarchy.edge_rounds} edge round(s) per cloud round")
        else:
            where = f"{fed.num_devices} devices -> server (flat)"
        return f"Federated LoRA fine-tuning ({cfg.strategy}): {where}, {fed.rounds} rounds, data {Path(cfg.data.source).name}"

    def plot(self) -> Path:
        """summary.png (see :func:`draw_summary`), written atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = draw_summary(self)
        out = self.path / "summary.png"
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(out, png.getvalue())
        return out


def fold_run_update(members, run_dir: str | Path) -> int:
    """Fold a federated run's trained global model (its newest checkpoint: the server's base + adapter
    as one low-rank update, :meth:`Checkpoint.merged`) into every member (:meth:`Member.fold`: aligned
    family keys, so layers the members share stay identical). Returns the checkpoint's round.

    Serving and the demo take the family *as the federation left it* this way; the held-out figures
    of the run's last round were measured on exactly these weights (:class:`CentralEvaluator` folds
    the same update)."""
    folder = RunFolder(run_dir)
    checkpoint = folder.latest_checkpoint() if folder.checkpoint_dir.is_dir() else None
    if checkpoint is None:
        raise AiflowError(f"{run_dir} has no readable checkpoint under {folder.checkpoint_dir}: it is not a federated "
                          "run folder (aiflow simulate / deploy / demo write one), or no round finished yet.")
    update = checkpoint.merged()
    for member in members:
        member.fold(update)
    return checkpoint.server_round


def _members_of(evals: list[dict[str, Any]]) -> list[str]:
    return sorted({k.split("/", 1)[1] for r in evals for k in r if k.startswith("eval-accuracy/")})


def draw_summary(folder: RunFolder):
    """The run at a glance, four panels: (a) held-out loss per member and the clients' training loss
    per round, (b) held-out next-token accuracy per member per round, (c) each member's held-out
    accuracy before vs after the federation with the change and its paired bootstrap 95 % interval,
    (d) MB sent per round on each link, uplink and downlink side by side."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train, evals = folder.records("train"), folder.records("eval")
    members = _members_of(evals)
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (ax_loss, ax_acc), (ax_before, ax_bytes) = axes
    for i, name in enumerate(members):
        rounds = [r["round"] for r in evals if f"eval-loss/{name}" in r]
        ax_loss.plot(rounds, [r[f"eval-loss/{name}"] for r in evals if f"eval-loss/{name}" in r], "s-", color=f"C{i}",
                     label=f"held-out loss, {name}")
        ax_acc.plot(rounds, [r[f"eval-accuracy/{name}"] for r in evals if f"eval-accuracy/{name}" in r], "s-",
                    color=f"C{i}", label=name)
    if not members and evals:  # older runs: only the mean
        ax_loss.plot([r["round"] for r in evals], [r["eval-loss"] for r in evals], "s-", label="held-out loss")
        ax_acc.plot([r["round"] for r in evals], [r["eval-accuracy"] for r in evals], "s-", label="mean over members")
    if train:
        ax_loss.plot([r["round"] for r in train], [r["train-loss"] for r in train], "o--", color="gray",
                     label="clients' training loss (mean over steps)")
    device_evals = folder.records("device-eval")
    if device_evals:
        ax_acc.plot([r["round"] for r in device_evals], [r["eval-accuracy"] for r in device_evals], "^--", color="gray",
                    label="devices' own held-out data")
    ax_loss.set_title("(a) loss per round")
    ax_loss.set_ylabel("cross-entropy (nats per token)")
    ax_acc.set_title("(b) held-out next-token accuracy per round (server, every member)")
    ax_acc.set_ylabel("top-1 accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("cloud round (0 = before training)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    figures = heldout_intervals(folder, int(evals[0]["round"]), int(evals[-1]["round"])) if len(evals) > 1 else {}
    shown = [m for m in members if f"heldout_acc_before/{m}" in figures]
    if shown:
        x = np.arange(len(shown))
        before = [figures[f"heldout_acc_before/{m}"] for m in shown]
        after = [figures[f"heldout_acc_after/{m}"] for m in shown]
        ax_before.bar(x - 0.2, before, 0.4, label=f"before (round {evals[0]['round']})", color="lightgray", edgecolor="k")
        ax_before.bar(x + 0.2, after, 0.4, label=f"after (round {evals[-1]['round']})", color="C2", edgecolor="k")
        for xi, m, a in zip(x, shown, after):
            low, high = figures[f"heldout_acc_delta_ci95/{m}"]
            ax_before.annotate(f"{figures[f'heldout_acc_delta/{m}']:+.3f}\n[{low:+.3f}, {high:+.3f}]", (xi + 0.2, a),
                               ha="center", va="bottom", fontsize=8)
        ax_before.set_xticks(x, shown)
        ax_before.set_ylim(0, max(after + before) * 1.3)
        ax_before.legend(fontsize=8, loc="lower right")
        ax_before.set_title(f"(c) held-out accuracy before / after, per member\n(change and paired bootstrap 95 % interval, "
                            f"{figures['heldout_chunks']} chunks = {figures['heldout_tokens']:,} tokens)", fontsize=10)
    else:
        ax_before.text(0.5, 0.5, "no before/after evaluation in this run", ha="center", va="center", transform=ax_before.transAxes)
        ax_before.set_title("(c) held-out accuracy before / after, per member")
    ax_before.set_ylabel("top-1 accuracy")

    from aiflow_fl import comm

    pairs = [(up, down) for up, down in ((comm.DEVICE_TO_EDGE, comm.EDGE_TO_DEVICE), (comm.EDGE_TO_CLOUD, comm.CLOUD_TO_EDGE),
                                         (comm.DEVICE_TO_CLOUD, comm.CLOUD_TO_DEVICE))
             if any(r.get(f"bytes/{up}", 0) or r.get(f"bytes/{down}", 0) for r in train)]
    if pairs:
        rounds = np.array([r["round"] for r in train], dtype=float)
        width = 0.8 / (2 * len(pairs))
        for j, (up, down) in enumerate(pairs):
            for k, (link, hatch) in enumerate(((up, ""), (down, "//"))):
                offset = (2 * j + k - (2 * len(pairs) - 1) / 2) * width
                ax_bytes.bar(rounds + offset, [r.get(f"bytes/{link}", 0) / 1e6 for r in train], width, color=f"C{j}",
                             hatch=hatch, edgecolor="k", label=f"{link} ({'uplink' if k == 0 else 'downlink'})")
        ax_bytes.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_bytes.legend(fontsize=8)
    else:
        ax_bytes.text(0.5, 0.5, "no bytes counted in this run", ha="center", va="center", transform=ax_bytes.transAxes)
    ax_bytes.set_title("(d) bytes per link per cloud round (all devices / edges together)")
    ax_bytes.set_xlabel("cloud round")
    ax_bytes.set_ylabel("MB (10^6 bytes) per round")
    ax_bytes.grid(alpha=0.3, axis="y")
    fig.suptitle(folder.title(), fontsize=11)
    fig.tight_layout()
    return fig


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
        out.update(heldout_intervals(folder, int(evals[0]["round"]), int(evals[-1]["round"])))
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


def heldout_intervals(folder: RunFolder, first: int, last: int, level: float = 0.95) -> dict[str, Any]:
    """Before/after held-out loss and accuracy per member and for their mean, each change with its
    paired chunk-bootstrap interval (:func:`aiflow_fl.stats.paired_bootstrap_delta`), from the
    per-chunk sums the server saved for rounds ``first`` and ``last``. Empty when they are missing."""
    from aiflow_fl.stats import paired_bootstrap_delta

    before, after = folder.eval_chunks(first), folder.eval_chunks(last)
    members = [m for m in before if m in after and len(before[m]["tokens"]) >= 2
               and np.array_equal(before[m]["tokens"], after[m]["tokens"])]
    if not members or first == last:
        return {}
    out: dict[str, Any] = {"heldout_chunks": int(len(before[members[0]]["tokens"])),
                           "heldout_tokens": int(before[members[0]]["tokens"].sum())}
    pct = round(100 * level)

    def add(suffix: str, b: dict[str, np.ndarray], a: dict[str, np.ndarray]) -> None:
        for stat, key in (("acc", "correct"), ("loss", "nll")):
            interval = paired_bootstrap_delta(b[key], a[key], b["tokens"], level=level)
            out[f"heldout_{stat}_before{suffix}"] = round(interval.before, 4)
            out[f"heldout_{stat}_after{suffix}"] = round(interval.after, 4)
            out[f"heldout_{stat}_delta{suffix}"] = round(interval.delta, 4)
            out[f"heldout_{stat}_delta_ci{pct}{suffix}"] = [round(interval.low, 4), round(interval.high, 4)]

    for member in members:
        add(f"/{member}", before[member], after[member])
    if all(np.array_equal(before[m]["tokens"], before[members[0]]["tokens"]) for m in members):
        # The mean over members (what eval-accuracy reports) is a ratio over the same chunks too.
        mean = lambda d, k: np.mean([d[m][k] for m in members], axis=0)  # noqa: E731
        add("", {k: mean(before, k) for k in ("correct", "nll", "tokens")}, {k: mean(after, k) for k in ("correct", "nll", "tokens")})
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

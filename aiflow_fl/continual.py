"""Edge-continual learning: a device's data arrives in stages, an optional replay buffer, forgetting.

**Stages.** A run of R rounds is cut into S stages of (almost) equal length: round r (1-based) belongs
to stage ``(r-1)·S // R``. During stage k a device trains on the data that arrived in stage k: its
partition of the stage's data source, ``continual.domains[k % len]`` (by default pydoc topics first,
then standard-library source code — two genuinely different domains).

**Replay** (experience replay, e.g. Chaudhry et al. 2019 "On Tiny Episodic Memories"): when stage k
ends, a few of its examples are kept on the device in a buffer of ``buffer_size`` examples;
``reservoir`` keeps a uniform sample of every example seen so far (Vitter's algorithm R over the
stream), ``stage`` keeps an equal share per past stage. While training on a later stage, a fraction
``replay_fraction`` of every batch is drawn from the buffer, the rest from the current stage, so a run
with replay costs the same compute per step as one without. The buffer lives in the client's
``context.state`` between rounds (the ClientApp's ``DeviceState.extra``, see :func:`buffer_to_json`).

**Metrics** (Chaudhry et al. 2018, "Riemannian Walk"): after round t, a_{t,j} is the accuracy on
stage j's held-out data for every stage j seen so far; the forgetting of an earlier stage j is
f_{t,j} = max_{l≤t} a_{l,j} − a_{t,j} ≥ 0 (the drop from the best accuracy it ever had), and the run
reports their mean over the earlier stages (stages older than the current one).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aiflow_fl.errors import AiflowError

REPLAY_MODES = ("none", "reservoir", "stage")


# --------------------------------------------------------------------------- schedule


def check_continual(*, stages: int, rounds: int, replay: str, replay_fraction: float, buffer_size: int,
                    domains: Sequence[str] = ("pydoc", "stdlib")) -> None:
    """Errors before any training: a schedule longer than the run, bad replay settings."""
    if stages < 1:
        raise AiflowError(f"continual.stages is {stages}; it must be >= 1.")
    if stages > rounds:
        raise AiflowError(
            f"continual.stages is {stages} but the run has only {rounds} rounds (federation.rounds): every stage "
            f"needs at least one round, so stages must be between 1 and {rounds}."
        )
    if replay not in REPLAY_MODES:
        raise AiflowError(f"continual.replay is '{replay}', which is not one of: {', '.join(REPLAY_MODES)}.")
    if not 0.0 <= replay_fraction < 1.0:
        raise AiflowError(
            f"continual.replay_fraction is {replay_fraction}; it must be in [0, 1) (the share of each batch drawn "
            "from the replay buffer; 1 would never train on the new data)."
        )
    if replay != "none" and replay_fraction > 0 and buffer_size < 1:
        raise AiflowError(f"continual.buffer_size is {buffer_size}; replay needs a buffer of at least 1 example.")
    if not domains:
        raise AiflowError("continual.domains is empty; give at least one data source (e.g. [pydoc, stdlib]).")


def stage_of_round(server_round: int, rounds: int, stages: int) -> int:
    """0-based stage of a 1-based round when ``rounds`` rounds are cut into ``stages`` equal stages."""
    if not 1 <= server_round <= rounds:
        raise AiflowError(f"Round {server_round} is outside the run's rounds 1..{rounds}.")
    return (server_round - 1) * stages // rounds


def stage_source(stage: int, domains: Sequence[str]) -> str:
    return domains[stage % len(domains)]


# --------------------------------------------------------------------------- replay buffer


@dataclass
class ReplayBuffer:
    """Examples kept on a device for replay: reservoir over the stream, or an equal share per stage."""

    capacity: int
    mode: str = "reservoir"
    examples: torch.Tensor | None = None  # (k, seq_len) token ids
    stages: list[int] = field(default_factory=list)  # stage of each kept example
    seen: int = 0  # examples offered so far (reservoir's n)
    seed: int = 0

    def __len__(self) -> int:
        return 0 if self.examples is None else int(self.examples.shape[0])

    def _rng(self) -> np.random.Generator:
        # Derived from (seed, seen): a buffer restored from context.state continues the same stream.
        return np.random.default_rng([self.seed, self.seen])

    def add_stage(self, stage: int, input_ids: torch.Tensor) -> None:
        """Offer every example of a finished stage (in stream order)."""
        if self.capacity < 1 or input_ids.shape[0] == 0:
            self.seen += int(input_ids.shape[0])
            return
        if self.mode == "reservoir":
            self._reservoir(stage, input_ids)
        elif self.mode == "stage":
            self._per_stage(stage, input_ids)
        else:
            raise AiflowError(f"ReplayBuffer mode '{self.mode}' is not one of: reservoir, stage.")

    def _reservoir(self, stage: int, input_ids: torch.Tensor) -> None:
        rng = self._rng()
        rows = list(self.examples) if self.examples is not None else []
        for x in input_ids:
            self.seen += 1
            if len(rows) < self.capacity:
                rows.append(x.clone())
                self.stages.append(stage)
            else:
                j = int(rng.integers(0, self.seen))  # keep x with probability capacity / seen
                if j < self.capacity:
                    rows[j] = x.clone()
                    self.stages[j] = stage
        self.examples = torch.stack(rows)

    def _per_stage(self, stage: int, input_ids: torch.Tensor) -> None:
        rng = self._rng()
        self.seen += int(input_ids.shape[0])
        kept_stages = sorted(set(self.stages) | {stage})
        share = max(1, self.capacity // len(kept_stages))
        rows: list[torch.Tensor] = []
        tags: list[int] = []
        for s in kept_stages:
            if s == stage:
                pool = input_ids
            else:
                assert self.examples is not None
                pool = self.examples[torch.as_tensor([i for i, t in enumerate(self.stages) if t == s])]
            pick = rng.permutation(pool.shape[0])[:share]
            rows += [pool[int(i)].clone() for i in sorted(pick)]
            tags += [s] * len(pick)
        self.examples, self.stages = torch.stack(rows[: self.capacity]), tags[: self.capacity]

    def sample(self, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``k`` examples drawn uniformly with replacement (fewer only if the buffer is empty)."""
        if self.examples is None or k <= 0:
            return torch.empty((0, 0), dtype=torch.long)
        idx = torch.randint(0, len(self), (k,), generator=generator)
        return self.examples[idx]

    # context.state -----------------------------------------------------------------------------
    def to_records(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        config = {"capacity": self.capacity, "mode": self.mode, "seen": self.seen, "seed": self.seed,
                  "stages": [int(s) for s in self.stages]}
        arrays = {} if self.examples is None else {"examples": self.examples.numpy().copy()}
        return config, arrays

    @classmethod
    def from_records(cls, config: Any, arrays: Any) -> "ReplayBuffer":
        examples = None
        if "examples" in arrays:
            value = arrays["examples"]
            examples = torch.from_numpy(np.array(value.numpy() if hasattr(value, "numpy") else value))
        return cls(int(config["capacity"]), str(config["mode"]), examples, [int(s) for s in config["stages"]],
                   int(config["seen"]), int(config["seed"]))


def mixed_batches(current: torch.Tensor, buffer: ReplayBuffer, batch_size: int, steps: int,
                  replay_fraction: float, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """``steps`` batches of ``batch_size``: round(f·b) replayed examples, the rest from ``current``
    (without replacement within an epoch). Same batch size with or without replay: same compute."""
    n_replay = int(round(replay_fraction * batch_size)) if len(buffer) else 0
    n_new = batch_size - n_replay
    order = torch.randperm(current.shape[0], generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor + n_new > len(order):
            order, cursor = torch.randperm(current.shape[0], generator=generator), 0
        new = current[order[cursor:cursor + n_new]]
        cursor += n_new
        yield torch.cat([new, buffer.sample(n_replay, generator)]) if n_replay else new


# --------------------------------------------------------------------------- federated training hooks


def check_config(cfg: Any) -> None:
    """:func:`check_continual` on an :class:`AiflowConfig` (call before the run starts)."""
    c = cfg.continual
    check_continual(stages=c.stages, rounds=cfg.federation.rounds, replay=c.replay, replay_fraction=c.replay_fraction,
                    buffer_size=c.buffer_size, domains=list(c.domains))


def stage_chunks(cfg: Any, profile: Any, stage: int, tokenizer: Any = None) -> Any:
    """The training chunks that arrive on a device in ``stage``: its partition of the stage's source."""
    from dataclasses import replace

    from aiflow_fl.federated.device import load_device_data

    if tokenizer is None:
        tokenizer = _tokenizer(cfg.model.name)
    stage_cfg = replace(cfg, data=replace(cfg.data, source=stage_source(stage, list(cfg.continual.domains))))
    return load_device_data(stage_cfg, profile, tokenizer).train


@functools.lru_cache(maxsize=4)
def _tokenizer(model_name: str) -> Any:
    """The model's tokenizer, loaded once per process (loading takes ~0.8 s, and a device asks for its
    stages' chunks every round)."""
    from aiflow_fl.models import load_tokenizer

    return load_tokenizer(model_name)


def buffer_to_json(buffer: ReplayBuffer, stage_done: int) -> dict[str, Any]:
    config, arrays = buffer.to_records()
    examples = arrays.get("examples")
    return config | {"stage-done": stage_done, "examples": [] if examples is None else examples.tolist()}


def buffer_from_json(obj: dict[str, Any]) -> tuple[ReplayBuffer, int]:
    arrays = {"examples": np.asarray(obj["examples"], dtype=np.int64)} if obj["examples"] else {}
    return ReplayBuffer.from_records(obj, arrays), int(obj["stage-done"])


def add_continual_hooks(hooks: Any, cfg: Any, state: Any, profile: Any) -> Any:
    """Plug staged data and replay into the federated training loop (``TrainingHooks``).

    ``round_data`` returns the current stage's chunks (after putting every finished stage into the
    replay buffer kept in ``state.extra``); without DP, ``prepare`` replaces the loop's batches by
    same-size batches with a ``replay_fraction`` share from the buffer. Under DP the buffer's examples
    join the round's data instead (Poisson sampling draws from stage + buffer), since DP-SGD's
    sampling must cover the whole set it protects.
    """
    from aiflow_fl.data.sources import TokenChunks

    c = cfg.continual
    previous_after = hooks.after_round
    seen: dict[str, Any] = {}

    def round_data(chunks: Any, server_round: int) -> Any:
        stage = stage_of_round(max(1, server_round), cfg.federation.rounds, c.stages)
        if "replay" in state.extra:
            buffer, done = buffer_from_json(state.extra["replay"])
        else:
            buffer, done = ReplayBuffer(c.buffer_size, c.replay if c.replay != "none" else "reservoir",
                                        seed=cfg.run.seed + profile.partition_id), -1
        if c.replay != "none":
            for finished in range(done + 1, stage):
                buffer.add_stage(finished, stage_chunks(cfg, profile, finished).input_ids)
            done = max(done, stage - 1)
        state.extra["replay"] = buffer_to_json(buffer, done)
        current = stage_chunks(cfg, profile, stage)
        seen.update(stage=stage, buffer=buffer, current=current)
        if cfg.privacy.enabled and len(buffer) and c.replay_fraction > 0:
            return TokenChunks(torch.cat([current.input_ids, buffer.examples]),
                               list(current.domains) + ["replay"] * len(buffer))
        return current

    def prepare(model: Any, optimizer: Any, batches: Any) -> tuple:
        steps = len(batches)
        generator = torch.Generator().manual_seed(cfg.run.seed + 7919 * profile.partition_id + seen["stage"])
        mixed = list(mixed_batches(seen["current"].input_ids, seen["buffer"], cfg.train.batch_size, steps,
                                   c.replay_fraction if c.replay != "none" else 0.0, generator))
        return model, optimizer, mixed

    def after_round(result: Any) -> dict[str, float]:
        extra = previous_after(result) if previous_after else {}
        return {**extra, "stage": float(seen["stage"]), "replay-buffer": float(len(seen["buffer"]))}

    hooks.round_data, hooks.after_round = round_data, after_round
    if c.replay != "none" and c.replay_fraction > 0:
        hooks.prepare = prepare
    return hooks


class StageEvaluator:
    """Accuracy of the federation's model on every stage's held-out data (the central held-out chunks of
    the stage's source; never trained on), for the first member in ``federation.members``."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.member = (list(cfg.federation.members) or ["full"])[0]
        self._heldout: dict[str, Any] = {}

    def heldout(self, stage: int, tokenizer: Any) -> Any:
        from aiflow_fl.data import central_heldout, load_chunks

        source = stage_source(stage, list(self.cfg.continual.domains))
        if source not in self._heldout:
            d = self.cfg.data
            chunks = load_chunks(source, tokenizer, d.seq_len)
            self._heldout[source] = central_heldout(chunks, d.heldout_fraction, d.max_heldout_examples, self.cfg.run.seed)
        return self._heldout[source]

    @torch.no_grad()
    def metrics(self, merged: Any, upto_stage: int) -> dict[int, dict[str, float]]:
        """{stage: held-out loss/accuracy} for stages 0..upto_stage, ``merged`` folded into the member."""
        from aiflow_fl.family.member import member_from_config
        from aiflow_fl.federated.local import evaluate

        member = member_from_config(self.cfg, self.member)
        if merged is not None:
            member.fold(merged)
        return {stage: evaluate(member.model, self.heldout(stage, member.tokenizer), self.cfg.train.eval_batch_size)
                for stage in range(upto_stage + 1)}

    def __call__(self, merged: Any, upto_stage: int) -> dict[int, float]:
        """{stage: next-token accuracy} for stages 0..upto_stage."""
        return {stage: m["eval-accuracy"] for stage, m in self.metrics(merged, upto_stage).items()}


# --------------------------------------------------------------------------- metrics


def forgetting(history: Sequence[dict[int, float]]) -> dict[int, float]:
    """Forgetting of each earlier stage after the last entry of ``history``.

    ``history[t][j]`` is the accuracy on stage j after round t (only stages seen by then). For every
    stage j older than the newest stage in ``history[-1]``: best a_j so far − current a_j (≥ 0).
    """
    if not history:
        return {}
    now = history[-1]
    newest = max(now)
    out = {}
    for j, acc in now.items():
        if j >= newest:
            continue
        out[j] = max(h[j] for h in history if j in h) - acc  # best so far (this round included) - now
    return out


def continual_metrics(history: Sequence[dict[int, float]]) -> dict[str, float]:
    """Per-round MetricRecord entries: ``stage``, ``stage-acc-j`` and ``forgetting-j`` / ``forgetting-mean``."""
    now = history[-1]
    out: dict[str, float] = {"stage": float(max(now))}
    for j, acc in sorted(now.items()):
        out[f"stage-acc-{j}"] = float(acc)
    forgot = forgetting(history)
    for j, f in sorted(forgot.items()):
        out[f"forgetting-{j}"] = float(f)
    if forgot:
        out["forgetting-mean"] = float(np.mean(list(forgot.values())))
    return out


# --------------------------------------------------------------------------- run folder (ServerApp)


def check_run_config(cfg: Any) -> None:
    """Every privacy and continual check that needs no device data: the ServerApp calls this before
    the first round, so bad values stop the run before any training."""
    from aiflow_fl import privacy

    privacy.check_config(cfg)
    if cfg.continual.enabled:
        check_config(cfg)


class RoundReporter:
    """Per cloud round, the run-folder lines privacy and continual learning add (``kind`` "privacy":
    one per device with its composed ε; ``kind`` "continual": accuracy per stage and forgetting)."""

    def __init__(self, cfg: Any, previous: Sequence[dict[str, Any]] = ()) -> None:
        self.cfg = cfg
        self.stage_eval = StageEvaluator(cfg) if cfg.continual.enabled else None
        # A resumed run continues the accuracy history from its metrics.jsonl.
        self.history: list[dict[int, float]] = [
            {int(k.rsplit("-", 1)[1]): float(v) for k, v in r.items() if k.startswith("stage-acc-")} for r in previous
        ]

    def records(self, cloud_round: int, client_metrics: Sequence[dict[str, Any]], merged: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in client_metrics:
            if "dp-epsilon" in m:
                out.append({"round": cloud_round, "kind": "privacy", "device": int(m.get("dp-device", -1)),
                            **{k: float(m[k]) for k in ("dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-steps", "dp-sample-rate") if k in m}})
        if self.cfg.privacy.server_side:
            from aiflow_fl.privacy import server_side_epsilon

            p = self.cfg.privacy
            m = max(1, len(client_metrics))  # the devices averaged this round: std σ_s C_s / m (central_dp_method)
            out.append({"round": cloud_round, "kind": "privacy-central", "dp-delta": p.delta,
                        "dp-server-epsilon": server_side_epsilon(p.server_noise_multiplier, cloud_round, p.delta),
                        "dp-server-noise-std": p.server_noise_multiplier * p.server_clipping_norm / m,
                        "devices": m})
        if self.stage_eval is not None:
            stage = stage_of_round(cloud_round, self.cfg.federation.rounds, self.cfg.continual.stages)
            self.history.append(self.stage_eval(merged, stage))
            out.append({"round": cloud_round, "kind": "continual", **continual_metrics(self.history)})
        return out


def plot_run_folder(folder: Any) -> Any:
    """``privacy-continual.png`` in a run folder from its "privacy" / "continual" lines (None if none)."""
    eps: dict[str, list[tuple[int, float]]] = {}
    for r in folder.records("privacy"):
        eps.setdefault(f"device {r['device']}", []).append((int(r["round"]), float(r["dp-epsilon"])))
    acc: dict[int, list[tuple[int, float]]] = {}
    for r in folder.records("continual"):
        for k, v in r.items():
            if k.startswith("stage-acc-"):
                acc.setdefault(int(k.rsplit("-", 1)[1]), []).append((int(r["round"]), float(v)))
    if not eps and not acc:
        return None
    path = folder.path / "privacy-continual.png"
    plot_run(path, eps, acc)
    return path


# --------------------------------------------------------------------------- plots


def plot_run(path: Any, epsilon_by_client: dict[str, list[tuple[int, float]]] | None = None,
             accuracy_by_stage: dict[int, list[tuple[int, float]]] | None = None, title: str = "") -> None:
    """One PNG with up to two panels: ε per client over rounds; accuracy per stage over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (epsilon_by_client, accuracy_by_stage) if p]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    ax_iter = iter(axes[0])
    if epsilon_by_client:
        ax = next(ax_iter)
        for client, points in sorted(epsilon_by_client.items()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=str(client))
        ax.set_xlabel("round")
        ax.set_ylabel("ε (composed over the run)")
        ax.set_title("privacy spent per device")
        ax.legend(fontsize=7)
    if accuracy_by_stage:
        ax = next(ax_iter)
        for stage, points in sorted(accuracy_by_stage.items()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=f"stage {stage}")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out next-token accuracy")
        ax.set_title("accuracy per stage")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

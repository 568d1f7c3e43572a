"""Differential privacy for devices' LoRA training: Opacus DP-SGD with an accountant kept across rounds.

**Client-side DP-SGD** (Abadi et al. 2016, as implemented by Opacus): every local step draws a batch by
Poisson sampling (each of the device's n examples joins independently with probability q = 1/⌈n/b⌉),
computes one gradient *per example* of the LoRA parameters only (the backbone is frozen), clips each to
L2 norm ≤ C (``max_grad_norm``), sums them, adds Gaussian noise N(0, σ²C²) per coordinate and divides by
the expected batch size qn. The protected unit is **one training example (one token chunk) of one
device**: the device's ε bounds how much any single example can change what the device sends.

**Accounting over the whole run.** A device composes every DP step it ever takes: its Opacus
accountant's history (σ, q, steps) lives in Flower's ``context.state`` between rounds (the
ClientApp's ``DeviceState.extra``, see :func:`add_dp_hooks`), so the ε it reports after round R is that of all
R·steps steps, exactly what Opacus's accountant reports for that history. (Flower's own Opacus example
builds a new PrivacyEngine each round and so reports the ε of one round only.) With a target ε the
noise σ is derived once, by Opacus's ``get_noise_multiplier``, for the total number of steps the
device will take in the run, so the final ε is ≤ the target. Known limits: a run resumed from a
checkpoint starts fresh device processes with empty accountants (add the ε logged before the
interruption); with continual stages of different sizes q changes per stage and the accountant
composes the actual (σ, q) history, which can end above a target planned on the first stage's q;
noise comes from torch's default (not cryptographically secure) generator.

**Opacus + PEFT (opacus issue #820).** That report is of LoRA weights that silently never change
under Opacus: hooks and the optimizer held references to parameters that were replaced after they
were registered (lazy materialisation / moving the model after wrapping). Here the peft model is
complete and on its device before anything is wrapped, Opacus attaches hooks to the model in place
(``wrap_model=False``: no wrapper, no renamed parameters), ``make_private`` checks that the optimizer
holds exactly the model's parameters, and the tests compare Opacus's per-example gradients and the
applied update with per-example gradients computed independently by plain autograd.

**Loss.** Opacus's sensitivity argument needs each example's gradient to depend on that example only.
Hugging Face's built-in loss averages over all tokens of the batch, which couples examples through
the token count; :func:`per_example_lm_loss` averages within each example and then over examples.

**Central DP** (``privacy.server_side``): DP-FedAvg (McMahan et al. 2018), the mechanism of Flower's
``DifferentialPrivacyServerSideFixedClipping``, applied inside the aggregation: each device's whole
update (product space, all layers) is clipped to norm C_s and N(0, (σ_s C_s / m)²) is added to the mean
of m updates; the protected unit is **one device**. Why not Flower's wrapper itself: see
:func:`central_dp_method`'s section note.

Pure computation; no Flower I/O beyond (de)serialising the accountant into a ConfigRecord.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aiflow_fl.errors import AiflowError

ACCOUNTANTS = ("rdp", "prv")


# --------------------------------------------------------------------------- checks and planning


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def check_privacy_values(
    *,
    noise_multiplier: float | None,
    target_epsilon: float,
    delta: float,
    max_grad_norm: float,
    accountant: str = "rdp",
) -> None:
    """Data-independent checks of the ``privacy`` section (run before any training)."""
    if noise_multiplier is not None and not noise_multiplier > 0:
        raise AiflowError(
            f"privacy.noise_multiplier is {noise_multiplier}; it must be > 0 (the Gaussian noise's standard "
            "deviation in units of max_grad_norm), or null to derive it from privacy.target_epsilon."
        )
    if noise_multiplier is None and not target_epsilon > 0:
        raise AiflowError(
            f"privacy.target_epsilon is {target_epsilon}; it must be > 0 (typical values 1-10; smaller = more "
            "private). Or give privacy.noise_multiplier directly."
        )
    if not max_grad_norm > 0:
        raise AiflowError(
            f"privacy.max_grad_norm is {max_grad_norm}; it must be > 0 (the per-example gradient clipping "
            "bound C; 0.1-1 is usual for LoRA)."
        )
    if not 0 < delta < 1:
        raise AiflowError(f"privacy.delta is {delta}; it must be in (0, 1) and below 1/(examples on the device).")
    if accountant not in ACCOUNTANTS:
        raise AiflowError(f"privacy.accountant is '{accountant}', which is not one of: {', '.join(ACCOUNTANTS)}.")


@dataclass(frozen=True)
class DPPlan:
    """The DP-SGD settings of one device for the whole run."""

    noise_multiplier: float  # sigma
    max_grad_norm: float  # C
    delta: float
    sample_rate: float  # q = 1 / ceil(n / batch_size), as Opacus derives it from the data loader
    expected_batch_size: int  # int(n q), Opacus's divisor
    num_examples: int
    planned_steps: int  # steps the noise was derived for (rounds x local steps)
    accountant: str = "rdp"

    def to_config(self) -> dict[str, Any]:
        return {f"plan.{k}": v for k, v in self.__dict__.items()}


def check_config(cfg: Any) -> None:
    """The data-independent privacy checks on an :class:`AiflowConfig` (call before the run starts);
    δ against each device's number of examples is checked on the device before it trains."""
    p = cfg.privacy
    if p.enabled:
        check_privacy_values(noise_multiplier=p.noise_multiplier, target_epsilon=p.target_epsilon, delta=p.delta,
                             max_grad_norm=p.max_grad_norm, accountant=p.accountant)
        if p.lr is not None and not p.lr > 0:
            raise AiflowError(f"privacy.lr is {p.lr}; it must be > 0 (the learning rate under DP), or null for train.lr.")
    if p.server_side:
        check_server_side(cfg)


def opacus_sample_rate(num_examples: int, batch_size: int) -> float:
    """q exactly as ``PrivacyEngine.make_private`` computes it: 1 / len(DataLoader(n, batch_size))."""
    return 1.0 / math.ceil(num_examples / batch_size)


def plan_dp(
    *,
    num_examples: int,
    batch_size: int,
    steps_per_round: int,
    rounds: int,
    noise_multiplier: float | None,
    target_epsilon: float,
    delta: float,
    max_grad_norm: float,
    accountant: str = "rdp",
    num_trainable: int | None = None,
) -> DPPlan:
    """Validate a device's DP settings against its data and derive σ (Opacus's ``get_noise_multiplier``).

    Raises :class:`AiflowError` before any training for: σ, ε or C ≤ 0, δ ≥ 1/n, no trainable LoRA
    parameters, or a target ε that no finite noise reaches.
    """
    check_privacy_values(
        noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=delta,
        max_grad_norm=max_grad_norm, accountant=accountant,
    )
    if num_trainable is not None and num_trainable <= 0:
        raise AiflowError(
            "Differential privacy was asked for (privacy.enabled=true) on a member with no trainable LoRA "
            f"parameters ({num_trainable} trainable tensors): check lora.target_modules names modules that "
            "exist in this member (e.g. q_proj, v_proj) and that the member has at least one decoder layer."
        )
    if num_examples < 1:
        raise AiflowError(f"A device with DP must hold at least one training example; it has {num_examples}.")
    if delta >= 1.0 / num_examples:
        raise AiflowError(
            f"privacy.delta is {delta:g} but this device holds {num_examples} examples: delta must be < "
            f"1/{num_examples} = {1.0 / num_examples:.3g} (otherwise a mechanism that publishes one example "
            "in the clear satisfies the guarantee). Use e.g. privacy.delta=1e-5."
        )
    if batch_size < 1 or steps_per_round < 1 or rounds < 1:
        raise AiflowError(
            f"DP needs batch_size, local steps and rounds ≥ 1; got {batch_size}, {steps_per_round}, {rounds}."
        )
    q = opacus_sample_rate(num_examples, batch_size)
    total = steps_per_round * rounds
    if noise_multiplier is None:
        try:
            sigma = noise_for_target(target_epsilon, delta, q, total, accountant)
        except ValueError as exc:
            raise AiflowError(
                f"privacy.target_epsilon={target_epsilon} at delta={delta:g} cannot be reached for {total} steps "
                f"at sample rate {q:.3g} ({exc}); raise the target or train fewer steps."
            ) from None
    else:
        sigma = float(noise_multiplier)
    return DPPlan(
        noise_multiplier=sigma, max_grad_norm=float(max_grad_norm), delta=float(delta), sample_rate=q,
        expected_batch_size=int(num_examples * q), num_examples=num_examples, planned_steps=total,
        accountant=accountant,
    )


@functools.lru_cache(maxsize=64)
def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """σ from Opacus's ``get_noise_multiplier`` (ε within 0.01 below the target).

    Cached in the process and on disk (``noise-multipliers.json`` in the model cache, keyed by every
    argument and Opacus's version): its binary search evaluates the accountant ~15 times (≈ 1.5 s at
    q = 1/64), every device of a federation with equal partitions asks for the same σ, and so does
    every run with the same settings. A cache that cannot be read or written is ignored."""
    import json

    import opacus
    from opacus.accountants.utils import get_noise_multiplier

    from aiflow_fl.files import atomic_write_bytes
    from aiflow_fl.models import cache_dir

    key = f"{accountant}|{target_epsilon!r}|{delta!r}|{sample_rate!r}|{steps}|opacus {opacus.__version__}"
    path = cache_dir() / "noise-multipliers.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), float):
        return known[key]
    sigma = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                       steps=steps, accountant=accountant, epsilon_tolerance=0.01))
    try:  # atomic: concurrent devices never see half a file
        atomic_write_bytes(path, json.dumps({**(known if isinstance(known, dict) else {}), key: sigma}).encode())
    except OSError:
        pass
    return sigma


# --------------------------------------------------------------------------- the accountant across rounds


class ClientAccountant:
    """One device's Opacus accountant; its history (σ, q, steps) survives rounds in ``context.state``
    as the plain lists of :meth:`to_config` (JSON- and ConfigRecord-ready)."""

    def __init__(self, mechanism: str = "rdp", history: list[tuple[float, float, int]] | None = None) -> None:
        from opacus.accountants import create_accountant

        if mechanism not in ACCOUNTANTS:
            raise AiflowError(f"privacy.accountant is '{mechanism}', which is not one of: {', '.join(ACCOUNTANTS)}.")
        self.mechanism = mechanism
        self.accountant = create_accountant(mechanism=mechanism)
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in (history or [])]

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.accountant.history)

    def epsilon(self, delta: float) -> float:
        """ε spent so far at δ, composed over every step in the history (0 before the first step)."""
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=delta))

    def to_config(self) -> dict[str, Any]:
        history = self.accountant.history
        return {
            "mechanism": self.mechanism,
            "noise": [float(s) for s, _, _ in history],
            "sample-rate": [float(q) for _, q, _ in history],
            "steps": [int(n) for _, _, n in history],
        }

    @classmethod
    def from_config(cls, record: Any) -> "ClientAccountant":
        noise, rates, steps = list(record["noise"]), list(record["sample-rate"]), list(record["steps"])
        if not len(noise) == len(rates) == len(steps):
            raise ValueError("accountant record has lists of different lengths")
        return cls(str(record["mechanism"]), list(zip(noise, rates, steps)))


def independent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                        mechanism: str = "rdp") -> float:
    """ε of ``steps`` sampled-Gaussian steps, from a fresh Opacus accountant (the tests' reference)."""
    return ClientAccountant(mechanism, [(noise_multiplier, sample_rate, steps)]).epsilon(delta)


# --------------------------------------------------------------------------- DP-SGD on LoRA


def per_example_lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Next-token cross-entropy of each example, averaged over its own predicted tokens: shape (B,)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return per_example_loss_from_logits(logits, input_ids, attention_mask)


def per_example_loss_from_logits(logits: torch.Tensor, input_ids: torch.Tensor,
                                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    logits = logits[:, :-1]
    targets = input_ids[:, 1:]
    token_loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
    ).view(targets.shape)
    if attention_mask is None:
        return token_loss.mean(dim=1)
    mask = attention_mask[:, 1:].to(token_loss.dtype)
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class PrivateLoraTraining:
    """DP-SGD on a peft model's trainable (LoRA) parameters with Opacus, for one round.

    ``make_private`` attaches Opacus's per-example gradient hooks to ``model`` in place, wraps
    ``optimizer`` in a ``DPOptimizer`` (clip, noise, average) and turns the data into a Poisson-sampled
    loader; the device's ``accountant`` records every step. Call :meth:`close` after the round (removes
    the hooks so evaluation and the next round see a plain model).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        input_ids: torch.Tensor,
        batch_size: int,
        plan: DPPlan,
        accountant: ClientAccountant,
        noise_generator: torch.Generator | None = None,
    ) -> None:
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        params = trainable_parameters(model)
        if not params:
            raise AiflowError("DP-SGD was asked for on a model with no trainable (LoRA) parameters.")
        if accountant.mechanism != plan.accountant:
            raise AiflowError(f"accountant '{accountant.mechanism}' does not match the plan's '{plan.accountant}'.")
        self.model = model
        self.params = params
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure RNG turned off": documented, not a user error
            engine = PrivacyEngine(accountant=plan.accountant)
        engine.accountant = accountant.accountant  # compose onto this device's whole history
        loader = DataLoader(TensorDataset(input_ids), batch_size=batch_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.hooks, self.optimizer, self.loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                poisson_sampling=True, wrap_model=False, noise_generator=noise_generator,
            )
        if abs(1.0 / len(self.loader) - plan.sample_rate) > 1e-12:
            raise AiflowError(
                f"This round's data ({len(input_ids)} examples, batch {batch_size}) gives sample rate "
                f"{1.0 / len(self.loader):.4g}, not the planned {plan.sample_rate:.4g}; plan with the same data."
            )
        self.accountant = accountant
        self.plan = plan

    def batches(self) -> Iterator[torch.Tensor]:
        """Endless Poisson-sampled batches (size varies; possibly 0)."""
        while True:
            for (batch,) in self.loader:
                yield batch

    def step(self, input_ids: torch.Tensor, loss_fn: LossFn = per_example_lm_loss) -> float | None:
        """One DP-SGD step on this batch; returns its mean loss (None for an empty Poisson batch).

        An empty batch is still a step of the mechanism (the released update is pure noise) and is
        accounted: skipping it would reveal that no example was drawn.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss_value: float | None = None
        if input_ids.shape[0] == 0:
            for p in self.params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        else:
            loss = loss_fn(self.model, input_ids).mean()  # mean over examples: Opacus loss_reduction="mean"
            with warnings.catch_warnings():
                # Opacus's full backward hooks fire w.r.t. module outputs (frozen inputs): expected.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            loss_value = float(loss.detach())
        self.optimizer.step()
        return loss_value

    def train(self, steps: int, loss_fn: LossFn = per_example_lm_loss) -> list[float]:
        """``steps`` DP-SGD steps on Poisson batches; returns the losses of the non-empty ones."""
        losses = []
        batches = self.batches()
        for _ in range(steps):
            loss = self.step(next(batches), loss_fn)
            if loss is not None:
                losses.append(loss)
        return losses

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
        self.hooks.cleanup()


class _DPLossView(nn.Module):
    """The model as the federated training loop sees it under DP (``model(input_ids=, labels=).loss``):
    the loss is the mean of per-example losses, and an empty Poisson batch becomes a noise-only step
    (zero per-example gradients, then the DPOptimizer adds noise and the accountant counts the step)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.inner = model
        self._params = params  # a plain list: not registered twice as parameters of this view

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if input_ids.shape[0] == 0:
            from types import SimpleNamespace

            for p in self._params:
                p.grad_sample = p.new_zeros((0, *p.shape))
            return SimpleNamespace(loss=sum((p * 0.0).sum() for p in self._params), logits=None)
        out = self.inner(input_ids=input_ids, **kwargs)
        out.loss = per_example_loss_from_logits(out.logits, input_ids, kwargs.get("attention_mask")).mean()
        return out


def add_dp_hooks(hooks: Any, cfg: Any, state: Any, device: int | None = None) -> Any:
    """Plug DP-SGD into the federated training loop (:class:`aiflow_fl.federated.local.TrainingHooks`).

    * ``make_optimizer`` becomes :func:`dp_optimizer_factory` (``privacy.optimizer``, ``privacy.lr``);
    * ``round_data`` is wrapped to remember the chunks this round trains on (the set Poisson sampling
      draws from: the device's data, or a continual stage plus its replay buffer);
    * ``prepare`` plans the DP settings (σ derived once from the target ε for rounds × local steps and
      then kept in ``state.extra``), restores the device's accountant from ``state.extra``, makes the
      model/optimizer private with Opacus and replaces the loop's batches by as many Poisson batches;
    * ``after_round`` removes the hooks, stores the accountant and reports ``dp-epsilon`` etc.
      (and ``dp-device`` = ``device``, the partition id, so the server can plot ε per device).
    """
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # expected with frozen inputs
    previous_round_data, previous_after = hooks.round_data, hooks.after_round
    seen: dict[str, Any] = {}
    hooks.make_optimizer = dp_optimizer_factory(cfg.privacy, hooks.make_optimizer)

    def round_data(chunks: Any, server_round: int) -> Any:
        chunks = previous_round_data(chunks, server_round) if previous_round_data else chunks
        seen["chunks"] = chunks
        return chunks

    def prepare(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Any) -> tuple:
        chunks = seen["chunks"]
        steps = len(list(batches)) if not isinstance(batches, list) else len(batches)
        p = cfg.privacy
        # A device trains in every Flower round: cloud rounds × edge rounds with a hierarchy.
        h = cfg.hierarchy
        flower_rounds = cfg.federation.rounds * (h.edge_rounds if getattr(h, "enabled", False) else 1)
        plan = plan_dp(
            num_examples=len(chunks), batch_size=cfg.train.batch_size, steps_per_round=steps,
            rounds=flower_rounds, noise_multiplier=state.extra.get("dp-noise", p.noise_multiplier),
            target_epsilon=p.target_epsilon, delta=p.delta, max_grad_norm=p.max_grad_norm,
            accountant=p.accountant, num_trainable=len(trainable_parameters(model)),
        )
        state.extra["dp-noise"] = plan.noise_multiplier
        accountant = ClientAccountant.from_config(state.extra["dp-accountant"]) if "dp-accountant" in state.extra \
            else ClientAccountant(p.accountant)
        training = PrivateLoraTraining(model, optimizer, chunks.input_ids, cfg.train.batch_size, plan, accountant)
        seen.update(training=training, plan=plan)
        poisson = training.batches()
        return _DPLossView(model, training.params), training.optimizer, [next(poisson) for _ in range(steps)]

    def after_round(result: Any) -> dict[str, float]:
        extra = previous_after(result) if previous_after else {}
        training: PrivateLoraTraining = seen["training"]
        training.close()
        state.extra["dp-accountant"] = training.accountant.to_config()
        device_id = {} if device is None else {"dp-device": float(device)}
        return {**extra, **dp_metrics(training.accountant, seen["plan"]), **device_id}

    hooks.round_data, hooks.prepare, hooks.after_round = round_data, prepare, after_round
    return hooks


def dp_optimizer_factory(p: Any, default: Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
                         ) -> Callable[[list[nn.Parameter], float], torch.optim.Optimizer]:
    """The optimizer a device uses under DP (``privacy.optimizer``, ``privacy.lr``).

    ``sgd`` is DP-SGD as in Abadi et al. 2016: the update is −lr·(mean clipped gradient + noise), so
    the noise only adds a random perturbation to the non-private step. ``adamw`` (the training loop's
    default) divides every coordinate by its running RMS: where the noise dominates a coordinate
    (σC/b above its gradient), Adam still moves it by about lr, in a random direction. ``privacy.lr``
    (when set) replaces the round's learning rate, since DP-SGD's step scales with C and the noise.
    """
    if p.optimizer not in ("adamw", "sgd"):
        raise AiflowError(f"privacy.optimizer is '{p.optimizer}', which is not one of: adamw, sgd.")

    def make(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        lr = float(p.lr) if p.lr is not None else lr
        return torch.optim.SGD(params, lr=lr) if p.optimizer == "sgd" else default(params, lr)

    return make


def dp_metrics(accountant: ClientAccountant, plan: DPPlan) -> dict[str, float]:
    """What a device reports each round (MetricRecord-ready)."""
    return {
        "dp-epsilon": accountant.epsilon(plan.delta),
        "dp-delta": plan.delta,
        "dp-noise-multiplier": plan.noise_multiplier,
        "dp-sample-rate": plan.sample_rate,
        "dp-steps": float(accountant.steps),
    }


# --------------------------------------------------------------------------- central (server-side) DP
#
# Flower 1.41's ``DifferentialPrivacyServerSideFixedClipping`` (flwr.serverapp.strategy) wraps a
# Strategy: it computes each reply's update as ``reply arrays − the arrays given to configure_train``
# (zipped by position), clips it, lets the inner strategy aggregate and adds N(0, (σC/m)²) to the
# *returned* arrays. With aiflow-fl's LoraStrategy that is wrong three times over: a reply carries the
# device's LoRA factors at its own rank, not the global arrays plus a delta; the global arrays are
# the merged update whose shapes differ from any reply's; and the next round's messages are built
# from the strategy's internal aggregate, so noise added to the returned arrays would never reach
# the devices (the devices would receive the un-noised aggregate). So central DP is applied where
# the aggregate is formed — the strategy's pure aggregation ``method`` — with the same mechanism and
# Flower's own primitives (``clip_inputs_inplace``, ``compute_stdv``): DP-FedAvg (McMahan et al.
# 2018) on each device's update in product space.

SERVER_DP_STRATEGIES = ("fedavg", "flexlora")


def check_server_side(cfg: Any) -> None:
    """Central DP needs an aggregate that is the mean of the devices' product updates (fedavg /
    flexlora), devices with the same member, and no edge tier (edges aggregate before the cloud)."""
    p = cfg.privacy
    if not p.server_noise_multiplier > 0:
        raise AiflowError(f"privacy.server_noise_multiplier is {p.server_noise_multiplier}; it must be > 0.")
    if not p.server_clipping_norm > 0:
        raise AiflowError(f"privacy.server_clipping_norm is {p.server_clipping_norm}; it must be > 0.")
    if cfg.strategy not in SERVER_DP_STRATEGIES:
        raise AiflowError(
            f"privacy.server_side=true needs a strategy whose aggregate is the mean of the devices' products "
            f"({', '.join(SERVER_DP_STRATEGIES)}); strategy is '{cfg.strategy}'."
        )
    if len(set(cfg.federation.members)) > 1:
        raise AiflowError(
            "privacy.server_side=true needs every device to train the same layers, but federation.members="
            f"{cfg.federation.members}; use one member (or client-side DP, privacy.enabled=true)."
        )
    if getattr(cfg.hierarchy, "enabled", False):
        raise AiflowError("privacy.server_side=true is not supported with hierarchy.enabled=true (edges aggregate first).")


def server_side_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Device-level ε of ``releases`` rounds of the central Gaussian mechanism, no sampling amplification
    (q = 1: Flower samples a fixed number of devices), with Opacus's RDP accountant."""
    return independent_epsilon(noise_multiplier, 1.0, releases, delta, "rdp") if releases else 0.0


def central_dp_method(method: Callable[[list[Any]], Any], *, noise_multiplier: float, clipping_norm: float,
                      seed: int = 0) -> Callable[[list[Any]], Any]:
    """``method`` (an exact product-mean aggregation) made device-level DP.

    Per round, with P the dense global adapter the devices started from (per key) and m devices:
    D_k = s_k B_k A_k − P (device k's update, all keys together), clipped to ‖D_k‖ ≤ C; the new adapter
    is P + (1/m) Σ_k D_k + N(0, (σC/m)²) per entry — the uniform mean, so one device moves it by at
    most C/m — re-factorised to rank Σ_k r_k (post-processing, no privacy cost).
    """
    import numpy as np
    from flwr.supercore.differential_privacy import clip_inputs_inplace, compute_stdv, get_norm

    from aiflow_fl.aggregation import lowrank

    rng = np.random.default_rng(seed)
    previous: dict[str, np.ndarray] = {}

    def aggregate(updates: list[Any]) -> Any:
        template = method(updates)  # counts and flags of the method; its adapter is replaced below
        keys = sorted({k for u in updates for k in u.layers})
        deltas = []
        for u in updates:
            missing = [k for k in keys if k not in u.layers]
            if missing:
                raise AiflowError(f"Central DP: a device's update lacks {missing[:3]}; all devices must train the same layers.")
            arrays = [u.layers[k].delta().double().numpy() - previous.get(k, 0.0) for k in keys]
            if get_norm(arrays) > 0:  # Flower's clip divides by the norm; a zero update needs no clipping
                clip_inputs_inplace(arrays, clipping_norm)
            deltas.append(arrays)
        m = len(updates)
        std = compute_stdv(noise_multiplier, clipping_norm, m)
        rank = sum(max(u.layers[k].rank for k in keys) for u in updates)
        adapter = {}
        for i, key in enumerate(keys):
            mean = sum(d[i] for d in deltas) / m
            dense = previous.get(key, 0.0) + mean + rng.normal(0.0, std, mean.shape)
            adapter[key] = lowrank.refactor_dense(torch.from_numpy(dense), max_rank=rank)
            previous[key] = adapter[key].delta().double().numpy()  # what the devices start from next
        template.adapter = adapter
        template.metrics["dp-server-noise-std"] = std
        return template

    return aggregate


def apply_server_side(strategy: Any, cfg: Any) -> Any:
    """Make a LoraStrategy's aggregation centrally DP (``privacy.server_side``); see the note above."""
    check_server_side(cfg)
    strategy.method = central_dp_method(strategy.method, noise_multiplier=cfg.privacy.server_noise_multiplier,
                                        clipping_norm=cfg.privacy.server_clipping_norm, seed=cfg.run.seed)
    return strategy

"""Client-side DP-SGD on LoRA with Opacus, checked against independent references.

* ε composed over rounds == a fresh Opacus RDPAccountant for (σ, q, total steps);
* a DP step with σ = 0 and a clipping bound that never binds == the plain LoRA SGD step;
* with clipping, the applied update == −lr · Σ_i clip_C(g_i) / B where the g_i are per-example
  gradients computed one example at a time by plain autograd (opacus #820: the DP update is the
  clipped real gradient, not garbage), every clip_C(g_i) has norm ≤ C, and the noise has std σC.
"""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from opacus.accountants import RDPAccountant
from peft import LoraConfig, get_peft_model

from aiflow_fl.errors import AiflowError
from aiflow_fl.models import tiny_model
from aiflow_fl.privacy import (
    ClientAccountant,
    DPPlan,
    PrivateLoraTraining,
    check_server_side,
    per_example_lm_loss,
    plan_dp,
    server_side_epsilon,
    trainable_parameters,
)

SEQ = 12


def lora_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    model = tiny_model(arch, num_layers=2, hidden_size=32, seed=seed)
    # init_lora_weights=False: B is random too, so both factors get non-trivial gradients.
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.train()
    return peft_model


def data(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 2000, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def fixed_plan(n: int, batch: int, sigma: float, clip: float) -> DPPlan:
    plan = plan_dp(num_examples=n, batch_size=batch, steps_per_round=1, rounds=1, noise_multiplier=1.0,
                   target_epsilon=8.0, delta=1e-3 / n, max_grad_norm=clip)
    return DPPlan(**{**plan.__dict__, "noise_multiplier": sigma})  # σ = 0 is allowed here only, for the reference


def per_example_grads(model: torch.nn.Module, x: torch.Tensor) -> list[list[torch.Tensor]]:
    """One plain-autograd backward per example: the independent reference."""
    params = trainable_parameters(model)
    out = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(per_example_lm_loss(model, x[i:i + 1]).sum(), params)
        out.append([g.detach().clone() for g in grads])
    return out


def test_epsilon_composed_over_rounds_equals_opacus_accountant() -> None:
    torch.manual_seed(0)
    n, batch, steps, rounds, delta = 40, 8, 3, 3, 1e-5
    plan = plan_dp(num_examples=n, batch_size=batch, steps_per_round=steps, rounds=rounds, noise_multiplier=1.1,
                   target_epsilon=8.0, delta=delta, max_grad_norm=1.0)
    state = RecordDict()  # what Flower keeps in context.state between rounds
    x = data(n)
    reported = []
    for _ in range(rounds):
        model = lora_model()  # a fresh process per round: nothing survives but context.state
        accountant = ClientAccountant.from_config(state["dp"]) if "dp" in state else ClientAccountant("rdp")
        training = PrivateLoraTraining(model, torch.optim.SGD(trainable_parameters(model), lr=0.1), x, batch,
                                       plan, accountant)
        training.train(steps)
        training.close()
        state["dp"] = ConfigRecord(accountant.to_config())
        reported.append(ClientAccountant.from_config(state["dp"]).epsilon(delta))

    reference = RDPAccountant()
    reference.history = [(1.1, plan.sample_rate, steps * rounds)]
    assert plan.sample_rate == 1 / 5
    assert reported[-1] == pytest.approx(reference.get_epsilon(delta=delta), rel=1e-9)
    # One round's ε (what a fresh PrivacyEngine per round would report) is much smaller.
    one_round = RDPAccountant()
    one_round.history = [(1.1, plan.sample_rate, steps)]
    assert reported[0] == pytest.approx(one_round.get_epsilon(delta=delta), rel=1e-9)
    assert reported[0] < reported[1] < reported[2]


def test_target_epsilon_is_met_over_the_whole_run() -> None:
    plan = plan_dp(num_examples=200, batch_size=10, steps_per_round=20, rounds=5, noise_multiplier=None,
                   target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
    reference = RDPAccountant()
    reference.history = [(plan.noise_multiplier, 0.05, 100)]
    eps = reference.get_epsilon(delta=1e-5)
    assert 3.0 - 0.05 <= eps <= 3.0  # get_noise_multiplier's tolerance is 0.01
    assert plan.planned_steps == 100


def test_dp_step_without_noise_or_clipping_equals_plain_lora_step() -> None:
    torch.manual_seed(1)
    model = lora_model()
    reference = copy.deepcopy(model)
    x = data(8, seed=1)
    plan = fixed_plan(8, 8, sigma=0.0, clip=1e6)  # q = 1: expected batch = 8 = this batch
    training = PrivateLoraTraining(model, torch.optim.SGD(trainable_parameters(model), lr=0.5), x, 8, plan,
                                   ClientAccountant())
    before = [p.detach().clone() for p in trainable_parameters(model)]
    training.step(x)
    training.close()

    plain = torch.optim.SGD(trainable_parameters(reference), lr=0.5)
    per_example_lm_loss(reference, x).mean().backward()
    plain.step()
    for p, r, b in zip(trainable_parameters(model), trainable_parameters(reference), before):
        assert (p - b).abs().max() > 1e-4  # the LoRA weights really moved (#820: they silently did not)
        torch.testing.assert_close(p, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_clipped_update_is_the_clipped_real_gradient(arch: str) -> None:
    torch.manual_seed(2)
    model = lora_model(arch)
    x = data(6, seed=2)
    grads = per_example_grads(model, x)
    norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in gs)) for gs in grads])
    clip = float(norms.median())  # binds for about half of the examples
    assert (norms > clip * 1.01).any() and (norms < clip).any()

    lr = 0.3
    plan = fixed_plan(6, 6, sigma=0.0, clip=clip)
    training = PrivateLoraTraining(model, torch.optim.SGD(trainable_parameters(model), lr=lr), x, 6, plan,
                                   ClientAccountant())
    params = trainable_parameters(model)
    before = [p.detach().clone() for p in params]
    training.optimizer.zero_grad()
    with pytest.warns(UserWarning, match="Full backward hook"):  # Opacus's hooks on frozen-input modules
        per_example_lm_loss(model, x).mean().backward()
    # Opacus's per-example gradients are the real ones.
    for k, p in enumerate(params):
        torch.testing.assert_close(p.grad_sample, torch.stack([g[k] for g in grads]), rtol=1e-4, atol=1e-6)
    training.optimizer.step()
    training.close()

    clipped = [[g * min(1.0, clip / (float(nrm) + 1e-6)) for g in gs] for gs, nrm in zip(grads, norms)]
    for gs in clipped:
        assert float(torch.sqrt(sum((g ** 2).sum() for g in gs))) <= clip * (1 + 1e-5)
    for k, (p, b) in enumerate(zip(params, before)):
        expected = b - lr * sum(gs[k] for gs in clipped) / 6
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6)


def test_noise_has_std_sigma_times_clip() -> None:
    torch.manual_seed(3)
    model = lora_model()
    x = data(4, seed=3)
    sigma, clip, lr = 2.0, 0.01, 1.0
    grads = per_example_grads(model, x)
    plan = fixed_plan(4, 4, sigma=sigma, clip=clip)
    training = PrivateLoraTraining(model, torch.optim.SGD(trainable_parameters(model), lr=lr), x, 4, plan,
                                   ClientAccountant())
    params = trainable_parameters(model)
    before = [p.detach().clone() for p in params]
    training.step(x)
    training.close()
    residual = []
    for k, (p, b) in enumerate(zip(params, before)):
        clipped_sum = sum(g[k] * min(1.0, clip / (float(torch.sqrt(sum((h ** 2).sum() for h in g))) + 1e-6))
                          for g in grads)
        residual.append(((b - p.detach()) / lr * 4 - clipped_sum).flatten())  # = the Gaussian noise
    noise = torch.cat(residual)
    assert noise.numel() > 800
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.08)
    assert abs(float(noise.mean())) < 4 * sigma * clip / noise.numel() ** 0.5


def test_empty_poisson_batch_is_a_noise_only_accounted_step() -> None:
    model = lora_model()
    x = data(4)
    accountant = ClientAccountant()
    training = PrivateLoraTraining(model, torch.optim.SGD(trainable_parameters(model), lr=1.0), x, 4,
                                   fixed_plan(4, 4, sigma=1.0, clip=1.0), accountant)
    before = [p.detach().clone() for p in trainable_parameters(model)]
    assert training.step(x[:0]) is None
    training.close()
    assert accountant.steps == 1
    assert any((p - b).abs().max() > 0 for p, b in zip(trainable_parameters(model), before))


def test_hooks_are_removed_after_the_round() -> None:
    model = lora_model()
    x = data(8)
    training = PrivateLoraTraining(model, torch.optim.SGD(trainable_parameters(model), lr=0.1), x, 4,
                                   fixed_plan(8, 4, sigma=1.0, clip=1.0), ClientAccountant())
    training.train(2)
    training.close()
    per_example_lm_loss(model, x[:2]).mean().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in trainable_parameters(model))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon is 0.0"),
        ({"target_epsilon": -1.0}, "target_epsilon is -1.0"),
        ({"noise_multiplier": 0.0}, "noise_multiplier is 0.0"),
        ({"noise_multiplier": -0.5}, "noise_multiplier is -0.5"),
        ({"max_grad_norm": 0.0}, "max_grad_norm is 0.0"),
        ({"delta": 0.01}, "delta is 0.01"),  # 100 examples: δ must be < 0.01
        ({"num_trainable": 0}, "no trainable LoRA"),
        ({"target_epsilon": 1e-9}, "cannot be reached"),
    ],
)
def test_bad_privacy_input_is_refused_before_training(kwargs: dict, needle: str) -> None:
    args = dict(num_examples=100, batch_size=10, steps_per_round=4, rounds=3, noise_multiplier=None,
                target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0, num_trainable=8)
    args.update(kwargs)
    with pytest.raises(AiflowError, match=needle.replace(".", r"\.")):
        plan_dp(**args)


def test_dp_on_a_member_without_lora_parameters_is_refused() -> None:
    model = tiny_model("llama", num_layers=1, hidden_size=32).requires_grad_(False)
    plan = fixed_plan(8, 4, sigma=1.0, clip=1.0)
    with pytest.raises(AiflowError, match="no trainable"):
        PrivateLoraTraining(model, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), data(8), 4, plan,
                            ClientAccountant())


def test_server_side_checks_and_epsilon() -> None:
    from aiflow_fl.config import load_config

    base = ["federation.members=[eesb-0]", "federation.ranks=[4,8]"]
    check_server_side(load_config(["privacy.server_side=true", "strategy=fedavg", *base]))
    with pytest.raises(AiflowError, match="strategy is 'fedit'"):
        check_server_side(load_config(["strategy=fedit", *base]))
    with pytest.raises(AiflowError, match="federation.members"):
        check_server_side(load_config(["strategy=fedavg", "federation.members=[eesb-0,eesb-1]"]))
    with pytest.raises(AiflowError, match="server_noise_multiplier is 0.0"):
        check_server_side(load_config(["strategy=fedavg", *base, "privacy.server_noise_multiplier=0"]))
    reference = RDPAccountant()
    reference.history = [(1.5, 1.0, 4)]
    assert server_side_epsilon(1.5, 4, 1e-5) == pytest.approx(reference.get_epsilon(delta=1e-5))


def _update(seed: int, rank: int = 4, scale: float = 1.0, shape: tuple[int, int] = (8, 8)):
    from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors

    g = torch.Generator().manual_seed(seed)
    layers = {key: LoraFactors(torch.randn(rank, shape[1], generator=g), scale * torch.randn(shape[0], rank, generator=g), 0.5)
              for key in ("m.q", "m.v")}
    return AdapterUpdate(layers=layers, num_examples=10)


def _dense(layers) -> dict[str, torch.Tensor]:
    return {k: f.delta().double() for k, f in layers.items()}


def test_central_dp_without_noise_is_the_mean_of_the_clipped_device_updates() -> None:
    from aiflow_fl.aggregation import flexlora
    from aiflow_fl.privacy import central_dp_method

    updates = [_update(0), _update(1, scale=50.0)]  # the second one is far larger than C
    exact = _dense(flexlora.aggregate([_update(0), _update(1, scale=50.0)]).adapter)
    dense = [_dense(u.layers) for u in updates]
    norms = [float(torch.sqrt(sum((d ** 2).sum() for d in dd.values()))) for dd in dense]
    clip = (norms[0] + norms[1]) / 2  # binds for the large device only
    dp = central_dp_method(flexlora.aggregate, noise_multiplier=0.0, clipping_norm=clip)
    got = _dense(dp(updates).adapter)
    factor = clip / norms[1]
    for k in got:
        torch.testing.assert_close(got[k], (dense[0][k] + factor * dense[1][k]) / 2, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[k], exact[k])
    # Round 2: updates are measured from the adapter the devices started from.
    start = got
    step = _update(7, scale=0.01)
    round2 = [type(step)(layers={k: type(f)(*_refactor_sum(start[k], f)) for k, f in step.layers.items()}, num_examples=10)]
    got2 = _dense(dp(round2).adapter)
    for k in got2:
        torch.testing.assert_close(got2[k], start[k] + step.layers[k].delta().double(), rtol=1e-5, atol=1e-6)


def _refactor_sum(dense: torch.Tensor, f) -> tuple[torch.Tensor, torch.Tensor, float]:
    from aiflow_fl.aggregation import lowrank

    total = lowrank.refactor_dense(dense + f.delta().double())
    return total.A, total.B, total.scaling


def test_central_dp_noise_has_std_sigma_c_over_m() -> None:
    from aiflow_fl.aggregation import flexlora
    from aiflow_fl.privacy import central_dp_method

    zero = [_update(s, scale=0.0, shape=(16, 16), rank=8) for s in range(2)]  # rank 2·8 = 16: no truncation
    dp = central_dp_method(flexlora.aggregate, noise_multiplier=1.5, clipping_norm=0.2, seed=3)
    noise = torch.cat([d.flatten() for d in _dense(dp(zero).adapter).values()])
    assert float(noise.std()) == pytest.approx(1.5 * 0.2 / 2, rel=0.1)


def test_dp_optimizer_and_lr_come_from_the_privacy_section() -> None:
    """privacy.optimizer=sgd gives the device plain DP-SGD at privacy.lr (or the round's lr); the
    ClientApp's hooks use it only when DP is on; bad values are refused before training."""
    from clients.app import training_hooks
    from aiflow_fl.config import load_config
    from aiflow_fl.federated.device import DeviceState
    from aiflow_fl.federated.local import default_optimizer
    from aiflow_fl.privacy import check_config, dp_optimizer_factory

    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = dp_optimizer_factory(load_config(["privacy.optimizer=sgd", "privacy.lr=0.25"]).privacy, default_optimizer)
    assert type(sgd(params, 1e-3)) is torch.optim.SGD and sgd(params, 1e-3).param_groups[0]["lr"] == 0.25
    round_lr = dp_optimizer_factory(load_config(["privacy.optimizer=sgd"]).privacy, default_optimizer)(params, 1e-3)
    assert round_lr.param_groups[0]["lr"] == 1e-3
    adamw = dp_optimizer_factory(load_config([]).privacy, default_optimizer)(params, 1e-3)
    assert type(adamw) is type(default_optimizer(params, 1e-3))

    on = load_config(["privacy.enabled=true", "privacy.optimizer=sgd", "privacy.lr=0.5"])
    assert type(training_hooks(on, DeviceState()).make_optimizer(params, 1e-3)) is torch.optim.SGD
    off = load_config(["privacy.optimizer=sgd", "privacy.lr=0.5"])  # DP off: the loop's own optimizer
    assert type(training_hooks(off, DeviceState()).make_optimizer(params, 1e-3)) is type(adamw)
    with pytest.raises(AiflowError, match="privacy.lr is -1"):
        check_config(load_config(["privacy.enabled=true", "privacy.lr=-1"]))
    with pytest.raises(AiflowError, match="privacy.optimizer"):
        load_config(["privacy.optimizer=adam"])


def test_noise_multiplier_cache_returns_opacus_own_value(tmp_path, monkeypatch) -> None:
    from opacus.accountants.utils import get_noise_multiplier

    from aiflow_fl.privacy import noise_for_target

    monkeypatch.setenv("AIFLOW_CACHE", str(tmp_path / "cache"))
    reference = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.2, steps=6,
                                     accountant="rdp", epsilon_tolerance=0.01)
    noise_for_target.cache_clear()
    assert noise_for_target(4.0, 1e-5, 0.2, 6, "rdp") == reference  # computed, then written to disk
    assert (tmp_path / "cache" / "noise-multipliers.json").is_file()
    noise_for_target.cache_clear()
    assert noise_for_target(4.0, 1e-5, 0.2, 6, "rdp") == reference  # read back from disk
    noise_for_target.cache_clear()

"""Strategies: config selection, per-node messages, fault exclusion, and a real Flower simulation.

The end-to-end test runs ``flwr.simulation.run_simulation`` (Ray backend) with a small real peft
client (``benchmarks/_lora_client.py``); the server's model after each round is fingerprinted by
``evaluate_fn`` and compared with the model every device reports it started the next round from.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from aiflow_fl.aggregation import AdapterUpdate, LoraFactors, lowrank
from aiflow_fl.config import load_config
from aiflow_fl.errors import AiflowError
from aiflow_fl.protocol import BASE, CONFIG, EDGE_BASE, LORA, METRICS, NUM_EXAMPLES, PROFILE, arrays_to_update, device_start, update_to_arrays
from strategies import STRATEGIES, Hierarchical, build_strategy

ROOT = Path(__file__).resolve().parent.parent
KEYS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def load_client_module():
    name = "aiflow_bench_lora_client"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "_lora_client.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(module)  # Ray workers cannot import it by name
    return module


@pytest.fixture
def task_identity():
    """Messages need the identity a ServerApp process has; set one for hand-built replies."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def reply(node_id: int, layers: dict[str, LoraFactors] | None, n: int | None = 10, rank: int = 2, edge: str = "edge-0", error: str = "") -> Message:
    request = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node_id)
    if error:
        return Message(Error(code=1, reason=error), reply_to=request)
    content = RecordDict({PROFILE: ConfigRecord({"member": "m", "edge-id": edge, "lora-rank": rank, "lora-alpha": 4.0})})
    if layers is not None:
        content[LORA] = update_to_arrays(AdapterUpdate(layers, 0))
    content[METRICS] = MetricRecord({NUM_EXAMPLES: n} if n is not None else {"train-loss": 1.0})
    return Message(content, reply_to=request)


def factors(seed: int, keys=KEYS, rank: int = 2, out: int = 6, inp: int = 5) -> dict[str, LoraFactors]:
    gen = torch.Generator().manual_seed(seed)
    return {k: LoraFactors(torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen), 2.0) for k in keys}


def test_build_strategy_from_config() -> None:
    for name, cls in STRATEGIES.items():
        strategy = build_strategy(load_config([f"strategy={name}"]))
        assert isinstance(strategy, cls) and strategy.hierarchy is None
    hier = build_strategy(load_config(["strategy=flora", "hierarchy.enabled=true", "hierarchy.edge_rounds=2", "hierarchy.edge_rank=8"]))
    assert isinstance(hier, Hierarchical) and hier.hierarchy.edge_rounds == 2 and hier.hierarchy.edge_rank == 8
    assert build_strategy(load_config(["strategy=ffa"])).freeze_lora_a
    with pytest.raises(AiflowError, match="edge_rounds"):
        build_strategy(load_config(["hierarchy.enabled=true", "hierarchy.edge_rounds=0"]))
    with pytest.raises(AiflowError, match="bandwidth"):
        build_strategy(load_config(["hierarchy.device_edge_mbps=0"]))
    with pytest.raises(AiflowError, match="not one of"):
        load_config(["strategy=krum"])


def test_faulty_replies_are_excluded_and_too_few_is_an_error(task_identity) -> None:
    strategy = build_strategy(load_config(["strategy=flexlora", "federation.min_clients=2"]))
    good = [reply(1, factors(1)), reply(2, factors(2), n=30)]
    nan = factors(3)
    nan[KEYS[0]].B[0, 0] = float("nan")
    bad = [
        reply(3, nan),
        reply(4, factors(4, out=7)),  # wrong shape for a known key (shapes learned from good replies)
        reply(5, factors(5), n=None),  # no num-examples
        reply(6, None),  # no lora record
        reply(7, None, error="client crashed"),
    ]
    strategy._round = {"bytes": {}, "down": {}, "up": {}, "t0": 0.0}
    from aiflow_fl import comm

    strategy._round["bytes"] = {link: 0 for link in comm.LINKS}
    arrays, metrics = strategy.aggregate_train(1, good + bad)
    assert metrics["clients-ok"] == 2 and metrics["clients-failed"] == 5
    merged = lowrank.dense(arrays_to_update(arrays).layers)
    ref = {k: (10 * factors(1)[k].delta().double() + 30 * factors(2)[k].delta().double()) / 40 for k in KEYS}
    assert all(torch.allclose(merged[k], ref[k], atol=1e-4) for k in KEYS)
    with pytest.raises(AiflowError, match="min_clients"):
        strategy.aggregate_train(2, [good[0]] + bad)


def device_side(strategy, node_id: int, rank: int, alpha: float = 4.0, held: dict | None = None, held_version: int = -1):
    """What a node is sent (``node_content``) and what it starts from by the protocol's device side."""
    content, view = strategy.node_content(node_id, ConfigRecord())
    strategy._sent[node_id] = view  # what configure_train records for the node
    config = content[CONFIG]
    layers = lambda name: arrays_to_update(content[name]).layers if name in content else {}  # noqa: E731
    start = device_start(
        held_base=held or {}, held_version=held_version, base=layers(BASE), base_mode=config["base-mode"],
        base_from=int(config["base-from"]), base_version=int(config["base-version"]), edge_base=layers(EDGE_BASE),
        adapter=layers(LORA), truncation=config["truncation"], fold_remainder=bool(config["fold-remainder"]),
        reinit_lora=bool(config["reinit-lora"]), rank=rank, alpha=alpha,
    )
    return content, start


def test_messages_carry_only_the_nodes_keys_and_every_node_starts_from_the_server_model(task_identity) -> None:
    strategy = build_strategy(load_config(["strategy=fedexlora"]))
    from aiflow_fl import comm

    strategy._round = {"bytes": {link: 0 for link in comm.LINKS}, "down": {}, "up": {}, "t0": 0.0}
    strategy.aggregate_train(1, [reply(1, factors(1)), reply(2, factors(2, keys=KEYS[:1], rank=4), rank=4)])
    content, start = device_side(strategy, 2, rank=4)
    assert {k.split("::")[0] for k in content[LORA].keys()} == {KEYS[0]}
    assert {k.split("::")[0] for k in (content[BASE].keys() if BASE in content else [])} <= {KEYS[0]}
    assert all(f.rank == 4 for f in start.lora.values())
    server = lowrank.dense(strategy.merged())
    # a node never heard of gets every key; whatever its rank, it starts from exactly the server's model
    for rank in (1, 2, 8):
        content, start = device_side(strategy, 99, rank=rank)
        assert {k.split("::")[0] for k in content[LORA].keys()} == set(KEYS)
        model = lowrank.dense(lowrank.add([start.fold, {k: f for k, f in start.lora.items()}]))
        assert all(torch.allclose(model[k], server[k], atol=1e-4) for k in KEYS), rank


def test_downlink_sends_the_change_of_the_base_not_the_cumulative_base(task_identity) -> None:
    """FedEx-LoRA folds a residual into the base every round. From round 2 on, a node that holds the
    base of the round before receives only the last round's change (in round 2 that is all the base
    there is); from round 3 on, the bytes of that change (the real serialized record) are fewer than
    those of the cumulative base, and the node still holds exactly the server's cumulative base."""
    from aiflow_fl import comm

    strategy = build_strategy(load_config(["strategy=fedexlora", "federation.ranks=[2]"]))
    nodes = {1: None, 2: None, 3: None}  # node -> (held base, version)
    gen = torch.Generator().manual_seed(5)  # the devices' "training": new directions every round
    for rnd in (1, 2, 3, 4):
        strategy._round = {"bytes": {link: 0 for link in comm.LINKS}, "down": {}, "up": {}, "t0": 0.0}
        replies, sizes = [], {}
        for n in nodes:
            held, version = nodes[n] or ({}, -1)
            content, start = device_side(strategy, n, rank=2, held=held, held_version=version)
            sizes[n] = (comm.serialized_bytes(RecordDict({BASE: content[BASE]} if BASE in content else {})), comm.serialized_bytes(content))
            assert content[CONFIG]["base-mode"] == ("replace" if rnd == 1 else "add"), rnd
            nodes[n] = (start.held_base, start.base_version)
            trained = {k: LoraFactors(f.A + torch.randn(f.A.shape, generator=gen), f.B + torch.randn(f.B.shape, generator=gen), f.scaling)
                       for k, f in start.lora.items()} or factors(n, out=64, inp=48)
            r = reply(n, trained, n=10 * n)
            r.content[PROFILE]["base-version"] = start.base_version
            replies.append(r)
        if rnd >= 3:
            cumulative = comm.serialized_bytes(RecordDict({BASE: update_to_arrays(AdapterUpdate(strategy.base, 0))}))
            assert all(base < cumulative for base, _ in sizes.values()), (rnd, sizes, cumulative)
            # the whole message too is smaller than one carrying the cumulative base (the previous protocol)
            assert all(total - base + cumulative > total for base, total in sizes.values())
            # and the base the node holds is the server's cumulative base, exactly
            held = lowrank.dense(nodes[1][0])
            server = lowrank.dense(strategy.base)
            assert all(torch.allclose(held[k], server[k], atol=1e-4) for k in KEYS)
        strategy.aggregate_train(rnd, replies)


def test_the_global_adapter_keeps_its_rank_and_lean_downlink_is_no_larger_than_uplink(task_identity) -> None:
    """FlexLoRA's exact product of k rank-r updates has rank k·r; the cloud cuts it back to the
    configured rank every round. exact: the cut goes into the base (the model is unchanged); lean: it is
    dropped, and a node's message is then no larger than its reply."""
    from aiflow_fl import comm

    cumulative_bytes: dict[str, int] = {}
    for downlink in ("exact", "lean"):
        strategy = build_strategy(load_config(["strategy=flexlora", "federation.ranks=[2]", f"federation.downlink={downlink}"]))
        for rnd in (1, 2, 3):
            strategy._round = {"bytes": {link: 0 for link in comm.LINKS}, "down": {}, "up": {}, "t0": 0.0}
            replies = [reply(n, factors(n + 10 * rnd)) for n in (1, 2, 3)]
            reference = {k: sum(f[k].delta().double() for f in [factors(n + 10 * rnd) for n in (1, 2, 3)]) / 3 for k in KEYS}
            before = lowrank.dense(strategy.merged()) if strategy.cloud else {k: 0.0 for k in KEYS}
            strategy._sent = {}
            strategy.aggregate_train(rnd, replies)
            assert all(f.rank == 2 for f in strategy.cloud.adapter.values()), (downlink, rnd)
            if downlink == "exact" and rnd == 1:  # nothing was lost: the merge is the exact mean
                merged = lowrank.dense(strategy.merged())
                assert all(torch.allclose(merged[k], reference[k], atol=1e-4) for k in KEYS)
            assert before is not None
        content, _ = device_side(strategy, 1, rank=2)
        # the arrays each way, serialized as Flower sends them (the config and profile records are
        # a fixed few dozen bytes that do not grow with the model)
        down = comm.serialized_bytes(RecordDict({name: content[name] for name in (BASE, EDGE_BASE, LORA) if name in content}))
        up = comm.serialized_bytes(RecordDict({LORA: replies[0].content[LORA]}))
        assert (down <= up) == (downlink == "lean"), (downlink, down, up)
        cumulative_bytes[downlink] = comm.serialized_bytes(RecordDict({BASE: update_to_arrays(AdapterUpdate(strategy.base, 0))}))
        if downlink == "lean":  # the whole message of round 4 is smaller than the exact run's cumulative base alone
            assert comm.serialized_bytes(content) < cumulative_bytes["exact"], (comm.serialized_bytes(content), cumulative_bytes)
        state = strategy.state_tensors()
        assert {k.split("/")[0] for k in state} <= {"base", "adapter"}
        assert all(v.shape[0] == 2 for k, v in state.items() if k.startswith("adapter/") and k.endswith("::A"))


def test_real_flower_simulation_hierarchical_edge_rounds() -> None:
    """Flower's simulation engine: 4 devices on 2 edges, heterogeneous ranks, a shallow member, one
    device that sends NaN from round 2 on; 2 cloud rounds of κ2 = 2 edge rounds (4 Flower rounds).
    With an exact method every device starts each round from exactly the model of the tier that
    aggregated last: its edge's after an edge round, the cloud's after a cloud round."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    lc = load_client_module()
    devices = [
        lc.DeviceSpec(rank=2, alpha=4.0, edge_id="edge-0", domains=(0,)),
        lc.DeviceSpec(rank=4, alpha=8.0, edge_id="edge-0", domains=(1,), layers=(0,)),  # shallow member
        lc.DeviceSpec(rank=8, alpha=8.0, edge_id="edge-1", domains=(2,)),
        lc.DeviceSpec(rank=4, alpha=16.0, edge_id="edge-1", domains=(3,)),
    ]
    client = lc.make_client_app(devices, steps=3, fail_node=3)
    seen: dict = {"models": {}}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = load_config(
            ["strategy=flexlora", "hierarchy.enabled=true", "hierarchy.edge_rank=0", "hierarchy.edge_rounds=2", "federation.min_clients=3"]
        )
        strategy = build_strategy(cfg)
        seen["strategy"] = strategy

        def evaluate_fn(rnd: int, arrays: ArrayRecord):
            """After each Flower round: the model each edge's devices start the next round from."""
            if rnd == 0:
                return None
            if rnd % 2 == 0:  # a cloud round ended: everyone starts from the server's merged model
                server_model = arrays_to_update(arrays).layers
                seen["models"][rnd] = {e: server_model for e in strategy.edges}
            else:
                # the cloud's cumulative base (it holds what the global-rank cut left out), the edge's, its adapter
                seen["models"][rnd] = {e: lowrank.add([dict(strategy.base), edge.base(), edge.last.adapter]) for e, edge in strategy.edges.items()}
            return None

        seen["result"] = strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=2, evaluate_fn=evaluate_fn)

    run_simulation(server_app=server, client_app=client, num_supernodes=4, backend_config={"client_resources": {"num_cpus": 1}})
    strategy, result = seen["strategy"], seen["result"]
    metrics = result.train_metrics_clientapp
    assert sorted(metrics) == [1, 2, 3, 4]
    assert [metrics[r]["clients-ok"] for r in metrics] == [4, 3, 3, 3]
    assert [metrics[r]["clients-failed"] for r in metrics] == [0, 1, 1, 1]
    for rnd in metrics:  # devices talk to their edge every round, edges to the cloud once per cloud round
        assert metrics[rnd]["bytes/device->edge"] > 0 and metrics[rnd]["bytes/device->cloud"] == 0
        assert (metrics[rnd]["bytes/edge->cloud"] > 0) == (rnd % 2 == 0), rnd
        assert (metrics[rnd]["bytes/cloud->edge"] > 0) == (rnd % 2 == 1), rnd
    checked = 0
    for rnd in (2, 3, 4):
        for node_id, m in strategy.reply_metrics[rnd].items():
            profile = strategy.profiles[node_id]
            model = seen["models"][rnd - 1][profile.edge_id]
            expected = lc.probe({k: f for k, f in model.items() if k in profile.keys})
            assert m["start-probe"] == pytest.approx(expected, rel=1e-4, abs=1e-6), (rnd, profile.member)
            checked += 1
    assert checked == 9
    # the two edges diverge within a cloud round and meet again after it
    after_edge_round = [lc.probe(model) for model in seen["models"][3].values()]
    assert abs(after_edge_round[0] - after_edge_round[1]) > 1e-6
    shallow = [p for p in strategy.profiles.values() if p.rank == 4 and p.edge_id == "edge-0"]
    assert len(shallow) == 1 and all(k.startswith("model.layers.0.") for k in shallow[0].keys), "layer 0 only"
    assert len(shallow[0].keys) == len(lc.TARGETS)


def test_ffa_shares_a_after_the_first_round_and_stays_exact(task_identity) -> None:
    """Round 1: clients drew their own A (exact residual folded); from round 2 they get the shared A
    (a rank-r client its first r rows, the rest folded into its base) and keep it frozen, so the
    merge is a plain average of B with nothing folded, and still exact."""
    from aiflow_fl import comm

    strategy = build_strategy(load_config(["strategy=ffa"]))
    assert strategy.freeze_lora_a
    ranks = {1: 2, 2: 4}
    strategy._round = {"bytes": {link: 0 for link in comm.LINKS}, "down": {}, "up": {}, "t0": 0.0}
    strategy.aggregate_train(1, [reply(n, factors(n, rank=r), n=10 * n, rank=r) for n, r in ranks.items()])
    assert strategy.cloud.metrics["ffa-keys-with-unshared-a"] == len(KEYS)
    base_after_1 = lowrank.dense(strategy.base)
    replies, expected = [], {k: torch.zeros(6, 5, dtype=torch.float64) for k in KEYS}
    gen = torch.Generator().manual_seed(11)
    for n, r in ranks.items():
        _, start_point = device_side(strategy, n, rank=r)
        received = start_point.lora
        trained = {k: LoraFactors(f.A.clone(), torch.randn(6, r, generator=gen), f.scaling) for k, f in received.items()}
        replies.append(reply(n, trained, n=10 * n, rank=r))
        start = lowrank.dense(start_point.fold)
        for k in KEYS:  # the device's model minus the shared base: its base extra plus its trained LoRA
            expected[k] += (10 * n / 30) * (start[k] - base_after_1[k] + trained[k].delta().double())
    strategy.aggregate_train(2, replies)
    assert strategy.cloud.metrics["ffa-keys-with-unshared-a"] == 0 and not strategy.cloud.base
    merged = lowrank.dense(strategy.merged())
    for k in KEYS:
        assert torch.allclose(merged[k], base_after_1[k] + expected[k], atol=1e-4)

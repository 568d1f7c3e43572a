"""Edge-continual learning: stage schedule, replay buffer, forgetting — against equations and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from aiflow_fl.continual import (
    ReplayBuffer,
    check_continual,
    buffer_from_json,
    buffer_to_json,
    continual_metrics,
    forgetting,
    mixed_batches,
    stage_of_round,
)
from aiflow_fl.errors import AiflowError


def test_stages_split_the_run_evenly() -> None:
    assert [stage_of_round(r, 6, 2) for r in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert [stage_of_round(r, 5, 3) for r in range(1, 6)] == [0, 0, 1, 1, 2]
    assert [stage_of_round(r, 3, 3) for r in range(1, 4)] == [0, 1, 2]
    for rounds in range(1, 12):
        for stages in range(1, rounds + 1):
            seq = [stage_of_round(r, rounds, stages) for r in range(1, rounds + 1)]
            assert sorted(set(seq)) == list(range(stages)) and seq == sorted(seq)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"stages": 4, "rounds": 3}, "stages is 4 but the run has only 3 rounds"),
        ({"stages": 0}, "stages is 0"),
        ({"replay": "fifo"}, "replay is 'fifo'"),
        ({"replay_fraction": 1.0}, "replay_fraction is 1.0"),
        ({"replay_fraction": -0.1}, "replay_fraction is -0.1"),
        ({"buffer_size": 0}, "buffer_size is 0"),
        ({"domains": []}, "domains is empty"),
    ],
)
def test_bad_continual_input(kwargs: dict, needle: str) -> None:
    args = dict(stages=2, rounds=4, replay="reservoir", replay_fraction=0.25, buffer_size=8, domains=["pydoc"])
    args.update(kwargs)
    with pytest.raises(AiflowError, match=needle.replace(".", r"\.")):
        check_continual(**args)


def test_reservoir_keeps_every_example_with_probability_capacity_over_n() -> None:
    n, capacity, trials = 60, 6, 400
    stream = torch.arange(n).unsqueeze(1)  # example i is the token id i
    counts = np.zeros(n)
    for seed in range(trials):
        buffer = ReplayBuffer(capacity, "reservoir", seed=seed)
        buffer.add_stage(0, stream[:25])
        buffer.add_stage(1, stream[25:])  # two stages: the reservoir spans both
        assert len(buffer) == capacity and buffer.seen == n
        counts[buffer.examples[:, 0].numpy()] += 1
    freq = counts / trials
    expected = capacity / n  # Vitter's algorithm R: uniform inclusion
    # binomial std of a frequency: sqrt(p(1-p)/trials) = 0.015; allow 4.5 std per item
    assert np.abs(freq - expected).max() < 4.5 * np.sqrt(expected * (1 - expected) / trials)
    assert abs(freq[:25].mean() - freq[25:].mean()) < 0.02


def test_stage_buffer_keeps_an_equal_share_per_stage() -> None:
    buffer = ReplayBuffer(9, "stage", seed=1)
    for stage in range(3):
        buffer.add_stage(stage, torch.full((20, 4), stage))
        assert sorted(set(buffer.stages)) == list(range(stage + 1))
    assert [buffer.stages.count(s) for s in range(3)] == [3, 3, 3]
    assert all(int(buffer.examples[i, 0]) == s for i, s in enumerate(buffer.stages))


def test_buffer_survives_context_state() -> None:
    import json

    buffer = ReplayBuffer(5, "reservoir", seed=3)
    buffer.add_stage(0, torch.arange(40).view(10, 4))
    state = RecordDict({"extra": ConfigRecord({"json": json.dumps({"replay": buffer_to_json(buffer, 0)})})})
    again, done = buffer_from_json(json.loads(str(state["extra"]["json"]))["replay"])
    assert done == 0 and again.seen == 10 and again.stages == buffer.stages
    assert torch.equal(again.examples, buffer.examples)
    # continuing the restored buffer gives what continuing the original gives
    nxt = torch.arange(100, 140).view(10, 4)
    buffer.add_stage(1, nxt)
    again.add_stage(1, nxt)
    assert torch.equal(again.examples, buffer.examples)


def test_replay_batches_have_the_same_size_and_the_configured_share() -> None:
    current = torch.zeros((30, 4), dtype=torch.long)
    buffer = ReplayBuffer(8, "reservoir")
    buffer.add_stage(0, torch.ones((8, 4), dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    batches = list(mixed_batches(current, buffer, batch_size=8, steps=10, replay_fraction=0.25, generator=g))
    assert len(batches) == 10 and all(b.shape == (8, 4) for b in batches)
    assert all(int((b[:, 0] == 1).sum()) == 2 for b in batches)
    plain = list(mixed_batches(current, ReplayBuffer(8), batch_size=8, steps=4, replay_fraction=0.25, generator=g))
    assert all(b.shape == (8, 4) and int(b.sum()) == 0 for b in plain)  # empty buffer: all new data


def test_forgetting_by_hand() -> None:
    history = [
        {0: 0.30},
        {0: 0.40},
        {0: 0.35, 1: 0.20},
        {0: 0.25, 1: 0.30, 2: 0.10},
    ]
    assert forgetting(history[:2]) == {}  # no earlier stage yet
    assert forgetting(history[:3]) == pytest.approx({0: 0.05})
    assert forgetting(history) == pytest.approx({0: 0.15, 1: 0.0})
    m = continual_metrics(history)
    assert m["stage"] == 2 and m["stage-acc-1"] == 0.30
    assert m["forgetting-mean"] == pytest.approx(0.075)

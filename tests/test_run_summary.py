"""The run folder's summary: per-chunk evaluations, before/after intervals per member, summary.png."""

import numpy as np
import pytest

from aiflow_fl.config import load_config
from aiflow_fl.federated.run import RunFolder, draw_summary, heldout_intervals, summarize
from aiflow_fl.stats import paired_bootstrap_delta


def _folder(tmp_path, *overrides):
    cfg = load_config([f"run.dir={tmp_path / 'run'}", "strategy=flexlora", "federation.rounds=2", *overrides])
    folder = RunFolder.create(cfg)
    rng = np.random.default_rng(0)
    tokens = np.full(40, 63.0)
    per_round = {}
    for r, p in ((0, 0.15), (1, 0.2), (2, 0.25)):
        per_round[r] = {m: {"correct": rng.binomial(63, p + 0.02 * i, 40).astype(float),
                            "nll": rng.normal(6.0 - r, 0.3, 40) * 63, "tokens": tokens}
                        for i, m in enumerate(("eesb-0", "eesb-1"))}
        folder.save_eval_chunks(r, per_round[r])
        rec = {"round": r, "kind": "eval"}
        for m, v in per_round[r].items():
            rec[f"eval-accuracy/{m}"] = v["correct"].sum() / tokens.sum()
            rec[f"eval-loss/{m}"] = v["nll"].sum() / tokens.sum()
        rec["eval-accuracy"] = np.mean([rec[f"eval-accuracy/{m}"] for m in per_round[r]])
        rec["eval-loss"] = np.mean([rec[f"eval-loss/{m}"] for m in per_round[r]])
        if r:
            folder.log({"round": r, "kind": "train", "train-loss": 5.0 - r, "clients-ok": 4,
                        "bytes/device->edge": 1e6, "bytes/edge->device": 3e6 * r, "bytes/edge->cloud": 4e5, "bytes/cloud->edge": 8e5})
        folder.log(rec)
    return folder, per_round


def test_intervals_per_member_and_for_the_mean(tmp_path):
    folder, per_round = _folder(tmp_path, "hierarchy.enabled=true")
    out = heldout_intervals(folder, 0, 2)
    ref = paired_bootstrap_delta(per_round[0]["eesb-1"]["correct"], per_round[2]["eesb-1"]["correct"], per_round[0]["eesb-1"]["tokens"])
    assert out["heldout_acc_delta_ci95/eesb-1"] == [round(ref.low, 4), round(ref.high, 4)]
    assert out["heldout_acc_before/eesb-1"] == round(ref.before, 4) and out["heldout_chunks"] == 40
    mean_before = np.mean([per_round[0][m]["correct"].sum() for m in ("eesb-0", "eesb-1")]) / (40 * 63)
    assert out["heldout_acc_before"] == round(mean_before, 4)
    low, high = out["heldout_acc_delta_ci95"]
    assert low < out["heldout_acc_delta"] < high
    assert out["heldout_loss_delta_ci95/eesb-0"][1] < 0  # loss fell by 2 nats per token
    figures = summarize(folder.path)
    assert figures["heldout_acc_delta_ci95"] == out["heldout_acc_delta_ci95"]
    assert heldout_intervals(folder, 0, 0) == {} and heldout_intervals(folder, 0, 7) == {}


@pytest.mark.parametrize("hierarchical, expected", [(True, "4 devices -> 2 edges -> cloud"), (False, "4 devices -> server (flat)")])
def test_summary_plot_title_ticks_and_panels(tmp_path, hierarchical, expected):
    folder, _ = _folder(tmp_path, f"hierarchy.enabled={str(hierarchical).lower()}")
    assert expected in folder.title() and "2 rounds" in folder.title()
    fig = draw_summary(folder)
    ax_loss, ax_acc, ax_before, ax_bytes = fig.axes[:4]
    assert all(float(t).is_integer() for t in ax_acc.get_xticks())
    assert [t.get_text() for t in ax_before.get_xticklabels()] == ["eesb-0", "eesb-1"]
    labels = [t.get_text() for t in ax_bytes.get_legend().get_texts()]
    assert "device->edge (uplink)" in labels and "edge->device (downlink)" in labels
    assert "MB" in ax_bytes.get_ylabel() and fig._suptitle.get_text() == folder.title()
    assert folder.plot().stat().st_size > 10_000


def test_members_worse_than_uniform_guessing_are_named():
    import math

    from aiflow_fl.federated.central import worse_than_uniform

    metrics = {"eval-loss/exit-10": 20.3, "eval-loss/eesb-0": 6.7, "eval-loss": 13.5, "eval-accuracy/exit-10": 0.0}
    assert worse_than_uniform(metrics, 49152) == {"exit-10": 20.3}
    assert math.log(49152) < 20.3 and worse_than_uniform({"eval-loss/full": 3.2}, 49152) == {}

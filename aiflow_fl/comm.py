"""Communication accounting for federated rounds: serialized sizes and a simple link model.

Bytes are counted from what Flower would really put on the wire: the protobuf serialization of a
``RecordDict`` (``flwr.common.serde.recorddict_to_proto(...).ByteSize()``), so array headers,
record names and config values are included, not just ``numel × 4``.

A :class:`Link` turns bytes into time as ``latency + 8·bytes / bandwidth`` (no jitter or loss: the
simulated time is a lower bound that makes configurations comparable). A path over several links
(device → edge → cloud when there is no edge aggregator) adds the latencies and is limited by the
slowest bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import RecordDict
from flwr.common.serde import recorddict_to_proto

# Link names used in metrics (``bytes/<link>``) and in the benchmark.
DEVICE_TO_EDGE, EDGE_TO_DEVICE = "device->edge", "edge->device"
EDGE_TO_CLOUD, CLOUD_TO_EDGE = "edge->cloud", "cloud->edge"
DEVICE_TO_CLOUD, CLOUD_TO_DEVICE = "device->cloud", "cloud->device"
LINKS = (DEVICE_TO_EDGE, EDGE_TO_DEVICE, EDGE_TO_CLOUD, CLOUD_TO_EDGE, DEVICE_TO_CLOUD, CLOUD_TO_DEVICE)
CLOUD_LINKS = (EDGE_TO_CLOUD, CLOUD_TO_EDGE, DEVICE_TO_CLOUD, CLOUD_TO_DEVICE)


def serialized_bytes(content: RecordDict) -> int:
    """Size in bytes of a RecordDict as Flower serializes it for the wire."""
    return recorddict_to_proto(content).ByteSize()


@dataclass(frozen=True)
class Link:
    """One network hop: bandwidth in megabits per second, one-way latency in milliseconds."""

    bandwidth_mbps: float
    latency_ms: float

    def seconds(self, num_bytes: int) -> float:
        if num_bytes <= 0:
            return 0.0
        return self.latency_ms / 1000.0 + 8.0 * num_bytes / (self.bandwidth_mbps * 1e6)

    def then(self, other: "Link") -> "Link":
        """The path through this link and then ``other`` (store-and-forward is ignored)."""
        return Link(min(self.bandwidth_mbps, other.bandwidth_mbps), self.latency_ms + other.latency_ms)


def check_link(name: str, bandwidth_mbps: float, latency_ms: float) -> Link:
    from aiflow_fl.errors import AiflowError

    if not bandwidth_mbps > 0:
        raise AiflowError(f"hierarchy.{name}_mbps is {bandwidth_mbps}; a link's bandwidth must be > 0 Mbit/s.")
    if latency_ms < 0:
        raise AiflowError(f"hierarchy.{name}_latency_ms is {latency_ms}; latency must be ≥ 0 ms.")
    return Link(bandwidth_mbps, latency_ms)


def draw_communication(ax, train_records: list[dict]) -> None:
    """Draw bytes per link per round (stacked bars, KiB) and the simulated round time (line, right
    axis) from a run's ``train`` records (``metrics.jsonl``: ``bytes/<link>``, ``sim-round-s``)."""
    rounds = [r["round"] for r in train_records]
    bottom = [0.0] * len(rounds)
    for link in LINKS:
        values = [float(r.get(f"bytes/{link}", 0)) / 1024 for r in train_records]
        if any(values):
            ax.bar(rounds, values, bottom=bottom, label=link)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("round")
    ax.set_ylabel("KiB per round")
    ax.legend(fontsize=7, loc="upper left")
    if any("sim-round-s" in r for r in train_records):
        twin = ax.twinx()
        twin.plot(rounds, [float(r.get("sim-round-s", 0.0)) for r in train_records], "k.-", label="simulated round s")
        twin.set_ylabel("simulated round time (s)")

"""Held-out split and partitioning of token chunks across devices with flwr-datasets partitioners.

* ``iid``          — ``IidPartitioner``: every device sees the same mix of domains.
* ``dirichlet``    — ``DirichletPartitioner(partition_by="domain", alpha)``: each device's domain mix is
  drawn from Dir(alpha); small alpha -> each device dominated by a few domains.
* ``pathological`` — ``PathologicalPartitioner(partition_by="domain", num_classes_per_partition)``:
  each device holds only ``classes_per_partition`` domains.

The held-out split is taken per domain *before* partitioning (the same ``heldout_fraction`` of every
domain, at least one chunk of each domain that has two or more), so central evaluation covers every
domain and no held-out chunk is ever trained on. A device's held-out data is the held-out chunks of
the domains it trains on ("its domains").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from aiflow_fl.data.sources import TokenChunks
from aiflow_fl.errors import AiflowError

PARTITIONERS = ("iid", "dirichlet", "pathological")


def split_heldout(chunks: TokenChunks, fraction: float, seed: int) -> tuple[TokenChunks, TokenChunks]:
    """(train, heldout): ``fraction`` of each domain's chunks, chosen with ``seed``, go to heldout."""
    if not 0.0 < fraction < 1.0:
        raise AiflowError(f"data.heldout_fraction is {fraction}; it must be strictly between 0 and 1.")
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    domains = np.asarray(chunks.domains)
    for domain in sorted(set(chunks.domains)):
        index = np.flatnonzero(domains == domain)
        rng.shuffle(index)
        n_held = int(round(fraction * len(index)))
        if len(index) >= 2:
            n_held = min(max(n_held, 1), len(index) - 1)
        else:
            n_held = 0
        heldout += index[:n_held].tolist()
        train += index[n_held:].tolist()
    return chunks.subset(sorted(train)), chunks.subset(sorted(heldout))


def partition_indices(
    domains: list[str],
    num_partitions: int,
    partitioner: str = "dirichlet",
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
    only: int | None = None,
) -> list[list[int]]:
    """Row indices of each of ``num_partitions`` partitions, by a flwr-datasets partitioner
    (``only``: just that partition's, as a one-element list; with ``iid`` its cost then does not grow
    with the number of partitions, which matters for simulations of thousands of devices)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    n = len(domains)
    if num_partitions < 1 or num_partitions > n:
        raise AiflowError(
            f"Cannot split {n} training chunks into {num_partitions} partitions: the number of devices must "
            f"be between 1 and {n} (use more data or a smaller data.seq_len)."
        )
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        if alpha <= 0:
            raise AiflowError(f"data.dirichlet_alpha is {alpha}; it must be > 0 (small = more skewed).")
        # min_partition_size: every device must get something to train on, but a strict minimum
        # can make the resampling loop fail on small data sets.
        part = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="domain", alpha=alpha,
            min_partition_size=max(1, min(10, n // (4 * num_partitions))), self_balancing=False, seed=seed,
        )
    elif partitioner == "pathological":
        n_domains = len(set(domains))
        if not 1 <= classes_per_partition <= n_domains:
            raise AiflowError(
                f"data.classes_per_partition is {classes_per_partition}; it must be between 1 and the "
                f"number of domains ({n_domains})."
            )
        part = PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="domain",
            num_classes_per_partition=classes_per_partition, class_assignment_mode="first-deterministic", seed=seed,
        )
    else:
        raise AiflowError(f"data.partitioner is '{partitioner}', which is not one of: {', '.join(PARTITIONERS)}.")
    # Chunks arrive sorted by domain and IidPartitioner shards contiguously: shuffle first.
    part.dataset = Dataset.from_dict({"domain": list(domains), "row": list(range(n))}).shuffle(seed=seed)
    wanted = range(num_partitions) if only is None else [only]
    try:
        with warnings.catch_warnings():
            # PathologicalPartitioner warns that some domains go unused when devices x classes < domains.
            warnings.simplefilter("ignore", UserWarning)
            return [sorted(part.load_partition(i)["row"]) for i in wanted]
    except ValueError as exc:
        raise AiflowError(
            f"The {partitioner} partitioner could not split {n} chunks of {len(set(domains))} domains into "
            f"{num_partitions} partitions ({str(exc).splitlines()[0]}); use fewer devices, more data or a "
            "larger data.dirichlet_alpha."
        ) from None


@dataclass
class DeviceData:
    """What one device holds: its training chunks and the held-out chunks of its domains."""

    train: TokenChunks
    heldout: TokenChunks
    partition_id: int
    num_partitions: int

    @property
    def domain_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self.train.domains:
            counts[d] = counts.get(d, 0) + 1
        return counts


def _cap(chunks: TokenChunks, limit: int, seed: int) -> TokenChunks:
    if limit <= 0 or len(chunks) <= limit:
        return chunks
    rng = np.random.default_rng(seed)
    return chunks.subset(sorted(rng.choice(len(chunks), size=limit, replace=False).tolist()))


def device_data(
    chunks: TokenChunks,
    partition_id: int,
    num_partitions: int,
    *,
    partitioner: str = "dirichlet",
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    heldout_fraction: float = 0.1,
    max_train: int = 0,
    max_heldout: int = 0,
    seed: int = 0,
) -> DeviceData:
    """Split, partition and pick device ``partition_id``'s data; identical in every process for a seed."""
    if not 0 <= partition_id < num_partitions:
        raise AiflowError(f"partition-id is {partition_id}; it must be in [0, {num_partitions - 1}] (num-partitions={num_partitions}).")
    train, heldout = split_heldout(chunks, heldout_fraction, seed)
    (rows,) = partition_indices(train.domains, num_partitions, partitioner, alpha, classes_per_partition, seed, only=partition_id)
    mine = train.subset(rows)
    my_domains = set(mine.domains)
    held = heldout.subset([i for i, d in enumerate(heldout.domains) if d in my_domains])
    return DeviceData(
        train=_cap(mine, max_train, seed + partition_id),
        heldout=_cap(held, max_heldout, seed + 1000 + partition_id),
        partition_id=partition_id,
        num_partitions=num_partitions,
    )


def central_heldout(chunks: TokenChunks, heldout_fraction: float, max_heldout: int, seed: int) -> TokenChunks:
    """The server's held-out set: the held-out chunks of all domains (capped, spread over domains)."""
    _, heldout = split_heldout(chunks, heldout_fraction, seed)
    return _cap(heldout, max_heldout, seed + 999)

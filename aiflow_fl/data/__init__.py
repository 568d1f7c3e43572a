"""Private data of federated devices: sources, tokenization into domain-labelled chunks, partitions."""

from aiflow_fl.data.partition import (
    PARTITIONERS,
    DeviceData,
    central_heldout,
    device_data,
    partition_indices,
    split_heldout,
)
from aiflow_fl.data.sources import Document, TokenChunks, load_chunks, load_documents, tokenize_documents

__all__ = [
    "PARTITIONERS", "DeviceData", "Document", "TokenChunks", "central_heldout", "device_data",
    "load_chunks", "load_documents", "partition_indices", "split_heldout", "tokenize_documents",
]

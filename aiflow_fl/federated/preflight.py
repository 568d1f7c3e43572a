"""Checks a federated run makes in the driver process before Flower, Ray or a run folder exist.

The config schema (``aiflow_fl.config.check_values``) already refuses values out of range. What it
cannot see is the world outside the config: whether ``data.source`` can be read and tokenized, whether
every name in ``federation.members`` is a member of the family (or an early exit of the backbone), and
whether ``run.dir`` is free. :func:`check_before_start` does exactly what a device and the server's
central evaluation will do first — load each distinct member and the data through the same functions
(both are cached per process, so the central evaluator reuses them) — so that a mistake stops
``aiflow simulate`` / ``aiflow deploy`` with a clear :class:`AiflowError` and nothing left behind.
"""

from __future__ import annotations

from pathlib import Path

from aiflow_fl.config import AiflowConfig
from aiflow_fl.errors import AiflowError


def check_run_dir(cfg: AiflowConfig) -> None:
    """A new run needs an empty (or absent) ``run.dir``; a resumed one an existing run folder."""
    if cfg.run.resume:
        if not (Path(cfg.run.resume) / "config.yaml").is_file():
            raise AiflowError(f"run.resume={cfg.run.resume} is not a run folder (no config.yaml in it).")
        return
    path = Path(cfg.run.dir) if cfg.run.dir else None
    if path is not None and path.exists() and any(path.iterdir()):
        raise AiflowError(f"Run folder {path} already exists and is not empty. Resume it with run.resume={path}, or choose another run.dir.")


def check_members_and_data(cfg: AiflowConfig) -> None:
    """Load every distinct member of ``federation.members`` and the chunks of ``data.source``."""
    from aiflow_fl.data import load_chunks
    from aiflow_fl.family.member import member_from_config

    tokenizer = None
    for name in dict.fromkeys(cfg.federation.members or ["full"]):
        try:
            member = member_from_config(cfg, name)
        except AiflowError as exc:
            raise AiflowError(f"federation.members names '{name}', which cannot be loaded: {exc}") from None
        tokenizer = member.tokenizer
    sources = [cfg.data.source] + (list(cfg.continual.domains) if cfg.continual.enabled else [])
    for source in dict.fromkeys(sources):
        chunks = load_chunks(source, tokenizer, cfg.data.seq_len)
        if len(chunks) == 0:
            raise AiflowError(f"data.source '{source}' gives no chunk of {cfg.data.seq_len} tokens; use more data or a shorter data.seq_len.")


def check_before_start(cfg: AiflowConfig) -> None:
    """Everything above, cheapest first (see the module docstring)."""
    check_run_dir(cfg)
    check_members_and_data(cfg)

"""The benchmark harness behind ``aiflow bench NAME [--quick]``.

A benchmark is a module ``benchmarks/NAME.py`` (imported as ``aiflow_benchmarks.NAME``) with ``run(quick: bool) -> dict``. It prints its own
human table (rich) and may save plots under :func:`results_dir`; the harness prints the returned
figures as one JSON object on the very last line of output, so scripts can read it with
``tail -n 1``. Benchmarks measure; tests assert. Comparisons are made side by side within one run.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from aiflow_fl.errors import AiflowError


def results_dir(name: str) -> Path:
    """Folder for a benchmark's plots and raw data: ``$AIFLOW_RESULTS`` or ``./results``, then ``bench/NAME``."""
    root = Path(os.environ.get("AIFLOW_RESULTS", "results"))
    path = root / "bench" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


# The folder benchmarks/ is the package ``aiflow_benchmarks`` (repository root's aiflow_benchmarks.py):
# the name ``benchmarks`` is taken in site-packages (opacus ships one).
PACKAGE = "aiflow_benchmarks"


def bench_dir() -> Path:
    """The folder holding the benchmark modules."""
    return Path(importlib.import_module(PACKAGE).__path__[0])


def available() -> list[str]:
    return sorted(p.stem for p in bench_dir().glob("*.py") if not p.stem.startswith("_"))


def _load(name: str) -> ModuleType:
    """``aiflow_benchmarks.NAME``, i.e. ``benchmarks/NAME.py``."""
    return importlib.import_module(f"{PACKAGE}.{name}")


def run_benchmark(name: str, quick: bool) -> dict[str, Any]:
    names = available()
    if name not in names:
        raise AiflowError(f"No benchmark named '{name}'. Available: {', '.join(names)}.")
    module = _load(name)
    start = time.perf_counter()
    result = module.run(quick=quick)
    result.setdefault("bench", name)
    result.setdefault("quick", quick)
    result.setdefault("wall_s", round(time.perf_counter() - start, 2))
    sys.stdout.flush()
    sys.stderr.flush()
    print(json.dumps(result, default=_jsonable), flush=True)
    return result


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")

"""The benchmarks (``benchmarks/NAME.py``) as the importable package ``aiflow_benchmarks``.

The folder keeps the project layout's name ``benchmarks/``, but it is never imported as ``benchmarks``:
opacus installs a top-level package of that name, so ``import benchmarks.specdec`` would find opacus's
(or nothing). Giving this module a ``__path__`` makes it a package whose submodules are the files of that
folder, so ``import aiflow_benchmarks.specdec`` works wherever the repository root is importable: an
editable install (``py-modules`` in pyproject.toml), ``PYTHONPATH=$PWD`` in a checkout, pytest from the
root. ``aiflow bench NAME`` imports ``aiflow_benchmarks.NAME`` (see :mod:`aiflow_fl.bench`).
"""

from __future__ import annotations

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent / "benchmarks")]

"""Familial models (paper §III): whitened-SVD decomposition, EESB early-exit members, HPCD members.

Public API (stable names other packages call):

* :class:`Member` — THE family member every consumer takes (clients, server evaluation, serving tiers,
  demo, benchmarks): causal LM + spec (kind, exit layer, shared layers) + tokenizer, ``key_of``,
  ``fold(update)``; built only by :func:`load_family_member` ``(folder or Family, name, dtype)`` and
  :func:`early_exit_member` ``(backbone, name)``; :func:`member_from_config` picks one from a config
  (see :mod:`aiflow_fl.family.member`).
* :func:`align_key` ``(spec, module_path) -> key`` and :func:`module_path` ``(spec, key, num_layers)`` —
  family-wide alignment keys of modules (see :mod:`aiflow_fl.family.spec`).
* :class:`Family`, :func:`family_from_backbone`, :func:`empty_family`, :func:`load_family`,
  :func:`describe_folder`, :func:`head_member`, :class:`MemberSpec`, :class:`DecomposedLinear`.
* Split inference: :mod:`aiflow_fl.family.split` (``run_prefix``, ``resume``, ``SplitState``).
* Training: :mod:`aiflow_fl.family.train`; evaluation: :mod:`aiflow_fl.family.evaluate`.

Names are imported lazily so ``aiflow --help`` (which registers the ``family`` commands) stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Family": "family", "add_branch": "family", "add_hpcd": "family", "describe_folder": "family",
    "empty_family": "family", "family_from_backbone": "family", "head_member": "family",
    "load_family": "family",
    "Member": "member", "early_exit_member": "member", "early_exit_members": "member",
    "load_family_member": "member", "member_from_config": "member",
    "MemberSpec": "spec", "align_key": "spec", "module_path": "spec",
    "DecomposedLinear": "svd",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"aiflow_fl.family.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'aiflow_fl.family' has no attribute '{name}'")

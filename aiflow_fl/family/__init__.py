"""Familial models (paper §III): whitened-SVD decomposition, EESB early-exit members, HPCD members.

Public API (stable names other packages call):

* :func:`load_member` ``(family_dir, name) -> (model, tokenizer, spec)`` — one member, reading only its tensors.
* :func:`align_key` ``(spec, module_path) -> key`` and :func:`module_path` ``(spec, key, num_layers)`` —
  family-wide alignment keys of modules (see :mod:`aiflow_fl.family.members`).
* :class:`Family`, :func:`family_from_backbone`, :func:`empty_family`, :func:`load_family`,
  :func:`describe_folder`, :class:`MemberSpec`, :class:`DecomposedLinear`.
* Split inference: :mod:`aiflow_fl.family.split`.
"""

from aiflow_fl.family.family import (
    Family,
    add_branch,
    add_hpcd,
    describe_folder,
    empty_family,
    family_from_backbone,
    head_member,
    load_family,
    load_member,
)
from aiflow_fl.family.members import MemberSpec, align_key, module_path
from aiflow_fl.family.svd import DecomposedLinear

__all__ = [
    "DecomposedLinear",
    "Family",
    "MemberSpec",
    "add_branch",
    "add_hpcd",
    "align_key",
    "describe_folder",
    "empty_family",
    "family_from_backbone",
    "head_member",
    "load_family",
    "load_member",
    "module_path",
]

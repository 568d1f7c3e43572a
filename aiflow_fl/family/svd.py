"""Whitened SVD (SVD-LLM; AI Flow paper §III-A1, eq. 1-3) and the low-rank linear it produces.

Calibration runs text through the model with forward hooks that accumulate, for every ``nn.Linear``
of the decoder layers, the Gram matrix ``G = X Xᵀ`` of its inputs (X: in_features × tokens). Linears
fed by the same tensor (q/k/v, gate/up) share one Gram matrix.

Decomposition of ``W`` (out × in) at rank h, all in float64:

* Cholesky ``S Sᵀ = G`` (if ``G`` is not positive definite, add ``(-λ_min + 1e-6)·I``),
* ``W S = U Σ Vᵀ``; ``W_u = U_h Σ_h^½`` (out × h), ``W_v = Σ_h^½ V_hᵀ S⁻¹`` (h × in).

Because ``S⁻¹ X`` has orthonormal rows, the output error on the calibration inputs is exactly the
sum of the dropped squared singular values (eq. 3): ``‖WX − W_u W_v X‖_F² = Σ_{i>h} σ_i²``. The
plain-SVD baseline is the same with ``S = I``.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aiflow_fl.errors import AiflowError

# ----------------------------------------------------------------------------------------------------
# The low-rank linear
# ----------------------------------------------------------------------------------------------------


_NO_DENSE_WRITE = (
    "A DecomposedLinear (a low-rank member's linear) has no dense weight to write into: merging a LoRA "
    "adapter into a decomposed member (peft merge / merge_and_unload) is not supported. Keep the adapter "
    "unmerged, or merge it into the 'full' member."
)


class _ReadOnlyWeight(torch.Tensor):
    """The dense product U V handed out as ``.weight``: reading works, any in-place write raises, so
    peft's merge cannot silently write into a temporary."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "__set__" or name.startswith("__i") or (name.endswith("_") and not name.endswith("__")):
            raise AiflowError(_NO_DENSE_WRITE)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class DecomposedLinear(nn.Linear):
    """``y = Σ_c U_c (V_c x) + b``: a linear stored as one or more low-rank components.

    One component is a whitened-SVD factorization (EESB branch); several are HPCD's residual
    components ``W ≈ Σ_c U_c V_c``. Components are separate parameters (``us.c``, ``vs.c``) so
    progressive training can freeze the earlier ones. ``active_rank`` (None: all) keeps only a prefix
    of the concatenated factors: a *partial* branch.

    It subclasses ``nn.Linear`` (with ``in_features``/``out_features`` but no dense parameter) so
    peft's LoRA wraps it like any linear: ``target_modules=["q_proj", ...]`` works unchanged and the
    LoRA update is added to the low-rank output. ``weight`` is the dense product computed on demand
    (read-only): peft's ``merge_and_unload`` cannot write into it, so merging LoRA into a decomposed
    member raises an AiflowError instead of silently doing nothing.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: Sequence[int],
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # skip nn.Linear's dense weight allocation
        self.in_features = in_features
        self.out_features = out_features
        kw = {"dtype": dtype, "device": device}
        self.us = nn.ParameterList([nn.Parameter(torch.zeros(out_features, r, **kw)) for r in ranks])
        self.vs = nn.ParameterList([nn.Parameter(torch.zeros(r, in_features, **kw)) for r in ranks])
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        self.active_rank: int | None = None

    @classmethod
    def from_factors(cls, us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], bias: torch.Tensor | None = None) -> "DecomposedLinear":
        layer = cls(vs[0].shape[1], us[0].shape[0], [u.shape[1] for u in us], bias=bias is not None, dtype=us[0].dtype)
        with torch.no_grad():
            for p, u in zip(layer.us, us):
                p.copy_(u)
            for p, v in zip(layer.vs, vs):
                p.copy_(v)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @property
    def rank(self) -> int:
        total = sum(u.shape[1] for u in self.us)
        return total if self.active_rank is None else min(self.active_rank, total)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) of the active rank: the components concatenated, then the prefix kept."""
        u = torch.cat(list(self.us), dim=1) if len(self.us) > 1 else self.us[0]
        v = torch.cat(list(self.vs), dim=0) if len(self.vs) > 1 else self.vs[0]
        h = self.rank
        return u[:, :h], v[:h]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        # peft reads .weight often (device/dtype checks): cache the product until a factor changes
        # (in-place updates bump a tensor's _version; replacing a parameter changes its id; .to() and
        # `param.data = …` change its storage pointer or dtype).
        key = (self.active_rank, tuple((id(p), p._version, p.data_ptr(), p.dtype) for p in [*self.us, *self.vs]))
        cached = self.__dict__.get("_dense_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                u, v = self.factors()
                cached = (key, (u @ v).detach().as_subclass(_ReadOnlyWeight))
            self.__dict__["_dense_cache"] = cached
        return cached[1]

    def __getstate__(self) -> dict:
        # the cached dense product is derived data: never copied or pickled (deepcopy, torch.save, Ray)
        state = dict(super().__getstate__())
        state.pop("_dense_cache", None)
        return state

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":
            raise AiflowError(_NO_DENSE_WRITE)
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.factors()
        return F.linear(F.linear(x, v), u, self.bias)

    def num_parameters(self) -> int:
        return self.rank * (self.in_features + self.out_features) + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, components={len(self.us)}"


# ----------------------------------------------------------------------------------------------------
# Rank choice
# ----------------------------------------------------------------------------------------------------


def check_ratio(ratio: float, what: str = "ratio") -> float:
    if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) <= 1.0):
        raise AiflowError(
            f"The parameter {what} {ratio!r} is outside the allowed range (0, 1]: it is h(m+n)/(mn), the "
            "parameters a rank-h factorization of an m×n linear keeps (1 = as many as the dense linear)."
        )
    return float(ratio)


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Largest rank h with h(m+n)/(mn) ≤ ratio (at least 1, at most min(m, n))."""
    check_ratio(ratio)
    m, n = out_features, in_features
    return max(1, min(min(m, n), math.floor(ratio * m * n / (m + n) + 1e-9)))


def ranks_for_budget(spectra: dict[str, tuple[torch.Tensor, int, int]], budget: int) -> dict[str, int]:
    """Per-linear ranks that fit ``budget`` parameters and minimise eq. 3's total loss Σ dropped σ².

    ``spectra[name] = (σ (descending), out_features, in_features)``. Keeping singular value i of a
    linear costs (m+n) parameters and removes σ_i² from the loss, so greedily keeping the values with
    the largest σ²/(m+n) is optimal (σ² decreases within a linear, so each keeps a prefix). Every
    linear keeps at least rank 1.
    """
    ranks = {name: 1 for name in spectra}
    spent = sum(m + n for _, m, n in spectra.values())
    if spent > budget:
        raise AiflowError(
            f"A total budget of {budget:,} parameters is below the minimum {spent:,} (rank 1 for each of the "
            f"{len(spectra)} linears); allowed: at least {spent:,}."
        )
    candidates = []
    for name, (sigma, m, n) in spectra.items():
        gains = sigma[1:].double() ** 2 / (m + n)
        candidates.extend((float(g), name, m + n) for g in gains)
    candidates.sort(key=lambda c: -c[0])
    for _, name, cost in candidates:
        if spent + cost > budget:
            continue
        ranks[name] += 1
        spent += cost
    return ranks


# ----------------------------------------------------------------------------------------------------
# Decomposition
# ----------------------------------------------------------------------------------------------------


def whitening_factor(gram: torch.Tensor) -> torch.Tensor:
    """Lower-triangular S with S Sᵀ = G (float64); jitter ``(-λ_min + 1e-6)·I`` if G is not PD."""
    g = gram.double()
    g = (g + g.T) / 2
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        lam_min = torch.linalg.eigvalsh(g)[0]
        g = g + (-lam_min + 1e-6) * torch.eye(g.shape[0], dtype=g.dtype)
        factor = torch.linalg.cholesky(g)
    return factor


@dataclass
class Factorization:
    """The full whitened (or plain) SVD of one linear; :meth:`factors` cuts it at any rank."""

    u: torch.Tensor  # U, out × r (float64)
    sigma: torch.Tensor  # Σ, r
    vt_sinv: torch.Tensor  # Vᵀ S⁻¹, r × in (float64); S = I for plain SVD

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.sigma[:rank].sqrt()
        w_u = self.u[:, :rank] * root
        w_v = root[:, None] * self.vt_sinv[:rank]
        return w_u.to(dtype), w_v.to(dtype)

    def dropped_energy(self, rank: int) -> float:
        """Eq. 3's prediction of ‖WX − W_u W_v X‖_F² on the calibration inputs."""
        return float((self.sigma[rank:] ** 2).sum())


@contextmanager
def single_thread():
    """Run LAPACK calls on one thread: on a busy machine, multi-threaded SVD/Cholesky of these small
    matrices is dozens of times slower (threads wait for each other), measured here 0.2 s vs 8 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def factorize(weight: torch.Tensor, gram: torch.Tensor | None) -> Factorization:
    """Whitened SVD of ``weight`` with calibration Gram matrix ``gram`` (None: plain SVD)."""
    with single_thread():
        return _factorize(weight, gram)


def _factorize(weight: torch.Tensor, gram: torch.Tensor | None) -> Factorization:
    w = weight.detach().double()
    if gram is None:
        u, sigma, vt = torch.linalg.svd(w, full_matrices=False)
        return Factorization(u, sigma, vt)
    s = whitening_factor(gram)
    u, sigma, vt = torch.linalg.svd(w @ s, full_matrices=False)
    # Vᵀ S⁻¹ without forming S⁻¹: solve Y S = Vᵀ (S lower triangular).
    vt_sinv = torch.linalg.solve_triangular(s, vt, upper=False, left=False)
    return Factorization(u, sigma, vt_sinv)


def decompose_linear(linear: nn.Linear, gram: torch.Tensor | None, rank: int) -> DecomposedLinear:
    """A one-component DecomposedLinear of rank ``rank`` (whitened if ``gram`` is given)."""
    fac = factorize(linear.weight, gram)
    w_u, w_v = fac.factors(rank, linear.weight.dtype)
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return DecomposedLinear.from_factors([w_u], [w_v], bias)


def residual_components(
    weight: torch.Tensor, gram: torch.Tensor | None, rank: int, count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """HPCD initialisation: component c = whitened SVD (rank ``rank``) of W − Σ_{c'<c} U_c' V_c'.

    With untrained earlier components, the residual's whitened SVD is the rest of W S's: (W − U_hΣ_h
    V_hᵀS⁻¹) S = Σ_{i>h} σ_i u_i v_iᵀ, so component c is singular triplets [c·h, (c+1)·h) of one SVD
    (computed once). After training earlier components, :func:`aiflow_fl.family.train` re-factorizes
    the actual residual instead.
    """
    fac = factorize(weight, gram)
    root = fac.sigma.sqrt()
    out = []
    for c in range(count):
        lo, hi = c * rank, min((c + 1) * rank, fac.sigma.numel())
        if lo >= hi:
            raise AiflowError(
                f"HPCD component {c + 1} of rank {rank} does not fit a {tuple(weight.shape)} linear (rank ≤ "
                f"{fac.sigma.numel()}); use fewer components (at most {fac.sigma.numel() // rank}) or a smaller ratio."
            )
        w_u = fac.u[:, lo:hi] * root[lo:hi]
        w_v = root[lo:hi, None] * fac.vt_sinv[lo:hi]
        out.append((w_u.to(weight.dtype), w_v.to(weight.dtype)))
    return out


# ----------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------

_LAYER_LINEAR = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


def decoder_linears(model: nn.Module, layers: Iterable[int] | None = None) -> dict[str, nn.Linear]:
    """``{module path: nn.Linear}`` for the linears inside decoder layers (optionally only some)."""
    wanted = None if layers is None else set(layers)
    out = {}
    for name, module in model.named_modules():
        match = _LAYER_LINEAR.match(name)
        if match and isinstance(module, nn.Linear) and not isinstance(module, DecomposedLinear):
            if wanted is None or int(match.group(1)) in wanted:
                out[name] = module
    return out


def calibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    layers: Iterable[int] | None = None,
    total: int | None = None,
    description: str = "calibrating",
) -> dict[str, torch.Tensor]:
    """``{linear path: X Xᵀ}`` (float64) over all tokens of ``batches`` (each (B, T) token ids).

    Linears that read the very same input tensor (q/k/v; gate/up) share one Gram matrix object, so
    memory is one matrix per distinct input. Padding is not masked: pass unpadded batches.
    """
    from aiflow_fl.progress import progress_bar

    linears = decoder_linears(model, layers)
    if not linears:
        raise AiflowError(f"No decoder linears to calibrate in layers {sorted(layers) if layers else 'all'}.")
    grams: dict[str, torch.Tensor] = {}
    # (layer, id(input)) -> (first linear that read it, the input kept alive so its id is not reused)
    seen: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}

    def hook(name: str, layer: int):
        def accumulate(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            for key in [k for k in seen if k[0] != layer]:
                del seen[key]  # a new layer started: earlier inputs may be freed and their ids reused
            first = seen.get((layer, id(x)))
            if first is not None and first[0] != name:
                grams[name] = grams[first[0]]  # same input as a sibling: share its Gram matrix
                return
            seen[(layer, id(x))] = (name, x)
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            if name not in grams:
                grams[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
            grams[name].addmm_(flat.T, flat)

        return accumulate

    handles = [
        m.register_forward_hook(hook(name, int(_LAYER_LINEAR.match(name).group(1))))  # type: ignore[union-attr]
        for name, m in linears.items()
    ]
    try:
        with torch.no_grad(), progress_bar(transient=True) as progress:
            task = progress.add_task(description, total=total)
            for batch in batches:
                model(input_ids=batch, use_cache=False)
                seen.clear()
                progress.advance(task)
    finally:
        for h in handles:
            h.remove()
    return grams


def output_error(linear: nn.Module, approx: nn.Module, inputs: torch.Tensor) -> float:
    """Measured ‖W X − Ŵ X‖_F² on real inputs (N, in): the left side of eq. 3."""
    with torch.no_grad():
        diff = linear(inputs) - approx(inputs)
    return float(diff.double().pow(2).sum())


def decompose_model(
    model: nn.Module,
    grams: dict[str, torch.Tensor] | None,
    ratio: float,
    layers: Iterable[int] | None = None,
) -> nn.Module:
    """A copy of ``model`` with every decoder linear (of ``layers``; default all) replaced by a
    rank-``rank_for_ratio(ratio)`` DecomposedLinear: whitened SVD when ``grams`` holds the linear's
    Gram matrix, plain SVD when ``grams`` is None (the baseline at the same parameter ratio)."""
    import copy

    from aiflow_fl.progress import progress_bar

    check_ratio(ratio)
    out = copy.deepcopy(model)
    linears = decoder_linears(out, layers)
    with progress_bar(transient=True) as progress:
        task = progress.add_task(f"{'whitened' if grams is not None else 'plain'} SVD at ratio {ratio}", total=len(linears))
        for name, linear in linears.items():
            gram = None if grams is None else grams[name]
            rank = rank_for_ratio(linear.out_features, linear.in_features, ratio)
            parent_path, child = name.rsplit(".", 1)
            setattr(out.get_submodule(parent_path), child, decompose_linear(linear, gram, rank))
            progress.advance(task)
    return out

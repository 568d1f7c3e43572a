"""Typed configuration: OmegaConf structured configs loaded from ``conf/*.yaml`` plus dotlist overrides.

``load_config(["federation.rounds=5", "strategy=flexlora"])`` merges, in order, the schema's
defaults, ``conf/config.yaml`` (or a recipe given as ``recipe=NAME`` / ``--config FILE``) and the
overrides. A key that is not in the schema, or a value of the wrong type or outside its allowed set,
raises :class:`AiflowError` naming the key and what is allowed.

The same values reach a Flower run flattened (``federation.rounds``) through
``flwr run . --run-config``; :func:`from_run_config` rebuilds the typed config from them.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from aiflow_fl.errors import AiflowError
from aiflow_fl.models import DEFAULT_MODEL

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Values restricted to a set: dotted key -> allowed values.
ALLOWED: dict[str, tuple[str, ...]] = {
    "strategy": ("fedavg", "fedit", "ffa", "flora", "flexlora", "hetlora", "fedexlora", "median", "trimmed_mean"),
    "data.partitioner": ("iid", "dirichlet", "pathological"),
    "family.kind": ("eesb", "hpcd", "both"),
    "family.branch_training.main": ("frozen", "lora", "full"),
    "family.branch_training.subset": ("all", "random", "sequential", "loss_adaptive"),
    "family.branch_training.data": ("text", "self"),
    "privacy.accountant": ("rdp", "prv"),
    "privacy.optimizer": ("adamw", "sgd"),
    "continual.replay": ("none", "reservoir", "stage"),
    "serving.on_verifier_loss": ("fail", "device"),
    "federation.downlink": ("exact", "lean"),
    "federation.attack": ("scale", "signflip"),
    "collab.synthesis": ("prompt", "fusion"),
}


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL  # embedded name, local folder or cached HF id
    dtype: str = "float32"


@dataclass
class BranchTrainingConfig:
    steps: int = 0  # optimizer steps; 0: keep the whitened-SVD initialisation
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 128
    main: str = "frozen"  # frozen | lora | full
    subset: str = "all"  # branches trained per step: all | random | sequential | loss_adaptive
    subset_size: int = 1  # branches per subset when subset != all
    accumulate: int = 1  # subsets whose gradients are accumulated before one optimizer step
    kl_weight: float = 0.0  # weight of KL(full model ‖ branch) added to the CE
    lora_rank: int = 8  # main=lora: rank of the LoRA on the shared layers (merged after training)
    hpcd_steps: int = 0  # progressive HPCD training steps per component (0: SVD initialisation only)
    hpcd_kl_weight: float = 0.4  # HPCD loss = CE + λ·KL(teacher ‖ student), λ from the paper
    # Branch data: text (data.source chunks) | self (the backbone's own greedy answers to generic chat
    # instructions, loss on the answers only: what drafts face when serving; cached in $AIFLOW_CACHE)
    data: str = "text"
    self_prompts: int = 256  # data=self: instructions answered (0: all ~760 built-in ones)
    self_max_new_tokens: int = 64  # data=self: answer length


@dataclass
class FamilyConfig:
    dir: str = "runs/family"  # where `aiflow family build` writes the family
    kind: str = "eesb"  # members to build: eesb | hpcd | both
    # EESB members as fractions of the backbone's parameters; HPCD as numbers of components.
    budgets: list[float] = field(default_factory=lambda: [0.35, 0.6])
    # Explicit EESB members instead of budgets: exit layers and branch ratios (same length).
    exits: list[int] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    hpcd_components: int = 3
    hpcd_ratio: float = 0.2  # parameter ratio of each HPCD component
    calibration_samples: int = 32
    calibration_seq_len: int = 256
    whitening: bool = True
    branch_training: BranchTrainingConfig = field(default_factory=BranchTrainingConfig)


@dataclass
class DataConfig:
    source: str = "pydoc"  # pydoc | stdlib | path to a .jsonl/.txt file
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    seq_len: int = 128
    heldout_fraction: float = 0.1
    max_examples_per_client: int = 256
    max_heldout_examples: int = 64  # per device and for the server's central evaluation
    classes_per_partition: int = 2  # pathological partitioner: domains per device


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TrainConfig:
    local_steps: int = 4
    batch_size: int = 4
    lr: float = 3e-4
    eval_batch_size: int = 8
    keep_optimizer_state: bool = True  # AdamW moments carried across rounds in context.state


@dataclass
class FederationConfig:
    rounds: int = 3
    num_devices: int = 4
    num_edges: int = 2
    min_clients: int = 1  # the run fails only when fewer than this many clients report
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0  # share of devices that also evaluate on their own held-out data each round
    client_cpus: float = 1.0
    client_timeout_s: float = 600.0
    # Per-device member and LoRA rank, cycled over devices (device i gets members[i % len]).
    members: list[str] = field(default_factory=lambda: ["eesb-0", "eesb-1"])
    ranks: list[int] = field(default_factory=lambda: [4, 8])
    memory_budget_mb: float = 0.0  # per device; 0: no budget (a node config's memory-budget-mb wins)
    # Rank the cloud keeps its global adapter at after every aggregation (truncated SVD; what is cut goes
    # to the cumulative base with downlink=exact, is dropped with downlink=lean); 0: max(ranks).
    global_rank: int = 0
    # exact: every device starts from exactly the server's model (what its rank cannot hold is folded
    # into its base each round); lean: a device gets the global adapter at its own rank only.
    downlink: str = "exact"
    # Poisoned devices (for robustness studies): this fraction of the devices, chosen per partition id
    # by a hash of run.seed, sends a corrupted update (attack: scale | signflip) every round.
    attack_fraction: float = 0.0
    attack: str = "signflip"
    attack_scale: float = 10.0


@dataclass
class HierarchyConfig:
    enabled: bool = False  # edge aggregators between devices and the cloud (strategies/edge.py)
    edge_rounds: int = 1  # HierFAVG kappa2: edge aggregations per cloud round
    edge_rank: int = 16  # rank of the factors an edge sends to the cloud; 0: exact (no truncation)
    trim_fraction: float = 0.2  # strategy=trimmed_mean: share of values cut at each end per coordinate
    # Link model for communication accounting (aiflow_fl/comm.py): bandwidth and one-way latency.
    device_edge_mbps: float = 20.0
    device_edge_latency_ms: float = 20.0
    edge_cloud_mbps: float = 100.0
    edge_cloud_latency_ms: float = 40.0


@dataclass
class PrivacyConfig:
    # Client-side DP-SGD with Opacus on the LoRA parameters (unit protected: one training example).
    enabled: bool = False
    noise_multiplier: Optional[float] = None  # sigma; null: derived from target_epsilon for the whole run
    target_epsilon: float = 8.0  # used only when noise_multiplier is null
    delta: float = 1e-5  # must be < 1 / (examples on the device)
    max_grad_norm: float = 1.0  # per-example clipping bound C
    accountant: str = "rdp"  # rdp | prv (Opacus accountants)
    # Device optimizer under DP: adamw (the training loop's own) or sgd (plain DP-SGD: the noise enters the
    # update linearly, where Adam would scale every noisy coordinate to a full step).
    optimizer: str = "adamw"
    lr: Optional[float] = None  # learning rate under DP; null: the round's train.lr
    # Central DP: Flower's DifferentialPrivacyServerSideFixedClipping around the strategy
    # (unit protected: one device's whole update per round).
    server_side: bool = False
    server_noise_multiplier: float = 1.0
    server_clipping_norm: float = 1.0


@dataclass
class ContinualConfig:
    enabled: bool = False
    stages: int = 2  # a device's data arrives in this many stages, spread evenly over the rounds
    # Domains (data sources, see data.source) of the stages, cycled: stage k reads domains[k % len].
    domains: list[str] = field(default_factory=lambda: ["pydoc", "stdlib"])
    replay: str = "none"  # none | reservoir (uniform over everything seen) | stage (equal share per past stage)
    replay_fraction: float = 0.0  # share of every training batch drawn from the replay buffer
    buffer_size: int = 64  # examples kept on the device for replay


@dataclass
class LinkConfig:
    latency_ms: float = 0.0
    bandwidth_mbps: float = 0.0  # 0: infinite
    jitter_ms: float = 0.0


@dataclass
class ApiConfig:
    """``aiflow serve``'s OpenAI-compatible HTTP API (aiflow_fl/serving/api/)."""

    max_tokens_cap: int = 1024  # a request asking for more completion tokens gets a 400
    default_max_tokens: int = 256  # when a request names none (never above the context left)
    max_model_len: int = 0  # context length of every member; 0: the member's max_position_embeddings
    max_body_bytes: int = 1_000_000  # /v1/* request bodies above this get a 413
    max_tier_body_bytes: int = 64_000_000  # tier protocol bodies (hidden states of a re-sent prefix)
    max_batch: int = 8  # sequences one member decodes together (iteration-level batching)
    max_sessions: int = 8  # verifier sessions a tier keeps (KV caches); an evicted one is an explicit error
    chain_workers: int = 8  # chain requests running at once (each its own sessions)


@dataclass
class ServingConfig:
    tiers: list[str] = field(default_factory=lambda: ["device", "edge"])  # device[, edge[, cloud]]
    draft_len: int = 4
    max_new_tokens: int = 64
    adaptive: bool = False  # grow/shrink the draft (sequential) or match the verifier's time (pipelined)
    min_draft_len: int = 1
    max_draft_len: int = 12
    cloud_block: int = 8  # edge-approved tokens the cloud verifies at once
    reuse: bool = True  # familial reuse: verifiers resume from the lower tier's hidden states
    # a federated run folder: its trained global update (newest checkpoint) is folded into every member
    # served (aiflow_fl.federated.run.fold_run_update); empty: the family as built
    adapter: str = ""
    draft_vocab: int = 0  # reduced device head over the first N ids (0: full vocabulary)
    pipelined: bool = False  # the device drafts while the verifier works
    draft_confidence: float = 0.0  # end a draft block after a token the device gives less than this probability
    # choose each draft length (0 = the verifier decodes alone) maximising expected tokens/s from this run's
    # measured draft / verify costs and acceptance (sequential chains; overrides adaptive)
    # on by default so a plain `aiflow generate`/`serve`/demo is never slower than its last tier alone:
    # the last tier then reads token ids and decodes alone whenever drafting does not pay
    cost_aware: bool = True
    probe_every: int = 16  # cost_aware: measured windows of N tokens; the other mode is probed for N/2 (gap doubles on a loss)
    # cost_aware: the share of decoding time probes may lose (the first probe of drafting waits until a lost
    # one would cost at most this: 400 tokens of 3 tiers, 208 of 2 at the defaults; later gaps from measured losses)
    probe_budget: float = 0.02
    # 2-tier chains: a feature-level draft head (EAGLE; `aiflow bench specdec` trains one) as the device.
    # auto: the head trained for the last tier's weights if one is in $AIFLOW_CACHE/draft-head; off; or a file
    draft_head: str = "auto"
    temperature: float = 0.0  # 0: greedy
    seed: int = 0
    exits: list[int] = field(default_factory=list)  # early-exit tiers of model.name when there is no family
    members: list[str] = field(default_factory=list)  # family members per tier (default: smallest .. largest)
    timeout_s: float = 10.0  # a remote tier silent this long is lost (see on_verifier_loss)
    # A verifier that is lost mid-request: fail (an error; the default, since no measured criterion in a
    # family folder says a device member can answer alone) or device (the device member finishes alone,
    # and the answer is marked unverified: response field, warning, CLI exit status 3).
    on_verifier_loss: str = "fail"
    # Chains `aiflow serve` offers as models, members joined by '>' (e.g. "eesb-0>full"); empty: the
    # smallest early-exit member drafting for the full member, and a 3-tier chain when there are 3 or more.
    chains: list[str] = field(default_factory=list)
    api: ApiConfig = field(default_factory=ApiConfig)
    edge_link: LinkConfig = field(default_factory=LinkConfig)  # device <-> edge
    cloud_link: LinkConfig = field(default_factory=LinkConfig)  # edge <-> cloud


@dataclass
class CollabConfig:
    """Device-server collaboration (aiflow_fl/collab/, paper §IV-A)."""

    # A hierarchical run saves one specialist per edge (cloud base + the edge's merged adapter) and the
    # general member under RUN_DIR/specialists/.
    save_specialists: bool = False
    descriptions: list[str] = field(default_factory=list)  # edge i's description; missing/empty: derived from its data
    run: str = ""  # `aiflow collaborate`: the run folder whose specialists answer
    top_k: int = 2  # specialists selected per query
    threshold: float = 0.5  # cosine similarity a route needs (semantic-router's default for all-MiniLM-L6-v2)
    temperature: float = 0.05  # fusion weights = softmax(router score / temperature)
    top_m: int = 5  # a route's score = mean of its top-m utterance similarities
    lexical_weight: float = 0.0  # hybrid routing: (1 - w) * dense + w * TF-IDF cosine (0: MiniLM alone)
    rounds: int = 1  # broadcast + revise rounds (0: none)
    synthesis: str = "prompt"  # prompt (Mixture-of-Agents aggregator) | fusion (token-level, router-weighted)
    timeout_s: float = 120.0  # a specialist silent this long in a step is dropped (with a warning)
    max_new_tokens: int = 96
    max_query_chars: int = 4000
    processes: bool = False  # each specialist in its own worker process (else threads in this process)


@dataclass
class TofcConfig:
    """Task-oriented feature compression (paper §II-B1): see aiflow_fl/tofc."""

    member: str = "exit-12"  # the family's language member on the edge (member_from_config: exit-k, eesb-i, full, or a built family's member)
    merged_tokens: int = 8  # n_c, DPC-KNN clusters of the 64 encoder tokens (8 answered as well as 64 here)
    knn: int = 5  # k of DPC-KNN's densities
    latent: int = 32  # D, the codec's latent per merged token
    hyper: int = 4  # Dz, the hyperlatent per merged token
    experts: int = 4  # entropy models behind the router
    temperature: float = 1.0  # router softmax temperature in training
    balance_weight: float = 0.1  # α of the balance loss Σ(mean w_e − 1/E)²
    lambdas: list[float] = field(default_factory=lambda: [0.0005, 0.003, 0.02])  # rate weights (per bit), one codec each
    lora_rank: int = 8  # LoRA on the edge member, trained with the projector (LLaVA stage 2); 0 = projector only
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    projector_steps: int = 700
    codec_warmup_steps: int = 200  # reconstruction (MSE) steps without the member before the task loss
    codec_steps: int = 80
    # weight of the reconstruction MSE kept in the task steps (CE + λ·bits + this·MSE + balance): the frozen
    # edge then reads features near the ones it was trained on; on 1,000 test questions at λ=0.0005,
    # three seeds each, accuracy 0.791 with 1.0 vs 0.773 without, at the same bytes (~40 B)
    codec_mse_weight: float = 1.0
    batch_size: int = 16
    lr: float = 3e-3
    eval_questions: int = 1000  # test questions scored per method, one per test image (all 1,000; seeded)
    seed: int = 0


@dataclass
class RunConfig:
    dir: str = ""  # empty: runs/<timestamp>
    seed: int = 0
    resume: str = ""  # run folder to resume from


@dataclass
class AiflowConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    family: FamilyConfig = field(default_factory=FamilyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: str = "fedavg"
    hierarchy: HierarchyConfig = field(default_factory=HierarchyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    collab: CollabConfig = field(default_factory=CollabConfig)
    tofc: TofcConfig = field(default_factory=TofcConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Value ranges, checked on every loaded config (so a bad value stops `aiflow simulate`/`deploy` before
# Flower, Ray or a run folder exist): dotted key -> (predicate, what is allowed).
_POSITIVE = (lambda v: v > 0, "> 0")
_AT_LEAST_1 = (lambda v: v >= 1, "≥ 1")
_NON_NEGATIVE = (lambda v: v >= 0, "≥ 0")
RANGES: dict[str, tuple] = {
    "federation.rounds": _AT_LEAST_1,
    "federation.num_devices": _AT_LEAST_1,
    "federation.num_edges": _AT_LEAST_1,
    "federation.min_clients": _AT_LEAST_1,
    "federation.fraction_train": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "federation.fraction_evaluate": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "federation.client_cpus": _POSITIVE,
    "federation.client_timeout_s": _POSITIVE,
    "federation.ranks": (lambda v: all(r >= 1 for r in v), "a list of ranks ≥ 1"),
    "federation.members": (lambda v: all(str(m).strip() for m in v), "a list of non-empty member names"),
    "federation.memory_budget_mb": _NON_NEGATIVE,
    "federation.global_rank": _NON_NEGATIVE,
    "federation.attack_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.local_steps": _AT_LEAST_1,
    "train.batch_size": _AT_LEAST_1,
    "train.eval_batch_size": _AT_LEAST_1,
    "train.lr": _POSITIVE,
    "lora.rank": _AT_LEAST_1,
    "lora.alpha": _POSITIVE,
    "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lora.target_modules": (lambda v: len(v) > 0, "a non-empty list of module names"),
    "data.seq_len": (lambda v: v >= 2, "≥ 2 (next-token prediction needs two tokens)"),
    "data.heldout_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "data.max_examples_per_client": _AT_LEAST_1,
    "data.max_heldout_examples": _AT_LEAST_1,
    "data.dirichlet_alpha": _POSITIVE,
    "data.classes_per_partition": _AT_LEAST_1,
    "data.source": (lambda v: bool(str(v).strip()), "pydoc, stdlib or a path to a .jsonl/.txt file"),
    "hierarchy.edge_rounds": (lambda v: v >= 1, "≥ 1 (HierFAVG κ2)"),
    "hierarchy.edge_rank": (lambda v: v >= 0, "≥ 0 (0 means exact, no truncation)"),
    "hierarchy.trim_fraction": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "hierarchy.device_edge_mbps": (lambda v: v > 0, "> 0 Mbit/s (a link's bandwidth)"),
    "hierarchy.edge_cloud_mbps": (lambda v: v > 0, "> 0 Mbit/s (a link's bandwidth)"),
    "hierarchy.device_edge_latency_ms": (lambda v: v >= 0, "≥ 0 ms (latency)"),
    "hierarchy.edge_cloud_latency_ms": (lambda v: v >= 0, "≥ 0 ms (latency)"),
    "serving.probe_every": _AT_LEAST_1,
    "tofc.lora_rank": (lambda v: v >= 0, ">= 0 (0: the projector alone learns)"),
    "tofc.codec_mse_weight": (lambda v: v >= 0, ">= 0 (0: the task steps drop the reconstruction term)"),
    "serving.probe_budget": (lambda v: 0 < v <= 1, "in (0, 1] (the share of decoding time probes may lose)"),
}


def check_values(cfg: "AiflowConfig") -> None:
    """Every value range of the schema (``RANGES``), then the privacy and continual checks that need no
    data; raises AiflowError naming the key, its value and what is allowed."""
    for key, (ok, allowed) in RANGES.items():
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        try:
            good = bool(ok(node))
        except TypeError:
            good = False
        if not good:
            raise AiflowError(f"Config key '{key}' is {node!r}; it must be {allowed}.")
    if cfg.federation.min_clients > cfg.federation.num_devices:
        raise AiflowError(
            f"federation.min_clients is {cfg.federation.min_clients} but federation.num_devices is only "
            f"{cfg.federation.num_devices}; lower min_clients."
        )
    from aiflow_fl import privacy

    privacy.check_config(cfg)
    if cfg.continual.enabled:
        from aiflow_fl.continual import check_config as check_continual_config

        check_continual_config(cfg)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_all_keys(type(default), key + "."))
    return keys


def _unknown_key_error(key: str) -> AiflowError:
    keys = _all_keys(AiflowConfig)
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [k for k in keys if k.startswith(parent) and "." not in k[len(parent):]]
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return AiflowError(
        f"Unknown config key '{key}'.{hint} Allowed keys here: {', '.join(sorted(siblings))}."
    )


def _check_allowed(cfg: DictConfig) -> None:
    for key, allowed in ALLOWED.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise AiflowError(f"Config key '{key}' is '{value}', which is not one of: {', '.join(allowed)}.")


def _merge(base: DictConfig, other: Any, what: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as exc:
        raise _unknown_key_error(str(exc.full_key or exc.key)) from None
    except ValidationError as exc:
        raise AiflowError(
            f"Bad value for config key '{exc.full_key}' in {what}: {str(exc.msg).splitlines()[0]}"
        ) from None
    except OmegaConfBaseException as exc:
        raise AiflowError(f"Could not read {what}: {str(exc).splitlines()[0]}") from None


def load_config(overrides: list[str] | None = None, config_file: str | Path | None = None) -> AiflowConfig:
    """Schema defaults <- YAML file <- dotlist overrides, validated. Returns the typed config."""
    overrides = list(overrides or [])
    recipe = [o for o in overrides if o.startswith("recipe=")]
    overrides = [o for o in overrides if not o.startswith("recipe=")]
    if recipe:
        config_file = CONF_DIR / "recipes" / f"{recipe[-1].split('=', 1)[1]}.yaml"
    path = Path(config_file) if config_file else CONF_DIR / "config.yaml"
    cfg = OmegaConf.structured(AiflowConfig)
    if path.is_file():
        cfg = _merge(cfg, OmegaConf.load(path), str(path))
    elif config_file is not None:
        available = sorted(p.stem for p in (CONF_DIR / "recipes").glob("*.yaml"))
        raise AiflowError(f"Config file {path} does not exist. Recipes: {', '.join(available) or 'none'}.")
    for item in overrides:
        if "=" not in item:
            raise AiflowError(f"Override '{item}' is not of the form key=value (e.g. federation.rounds=5).")
    try:
        dotlist = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as exc:
        raise AiflowError(f"Could not parse overrides {overrides}: {str(exc).splitlines()[0]}") from None
    cfg = _merge(cfg, dotlist, "the command-line overrides")
    _check_allowed(cfg)
    typed: AiflowConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    check_values(typed)
    return typed


def to_dict(cfg: AiflowConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: AiflowConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: AiflowConfig) -> dict[str, Any]:
    """Dotted keys -> scalar values, as Flower's run config holds them (lists as JSON strings)."""
    out: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif value is None:
                continue  # a run config cannot hold null; an absent key reads back as the schema default
            else:
                out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value

    walk(to_dict(cfg), "")
    return out


def from_run_config(run_config: dict[str, Any]) -> AiflowConfig:
    """Typed config from a Flower run config (dotted keys; lists as JSON strings), validated."""
    nested: dict[str, Any] = {}
    for key, value in run_config.items():
        if isinstance(value, str) and value.startswith("["):
            value = json.loads(value)
        node = nested
        *parents, leaf = str(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    cfg = _merge(OmegaConf.structured(AiflowConfig), nested, "the Flower run config")
    _check_allowed(cfg)
    typed: AiflowConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    check_values(typed)
    return typed

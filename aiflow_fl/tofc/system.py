"""Training, caching and evaluating a TOFC system: encoder statistics, edge projector, one codec per λ.

Stages (the encoder stays frozen; the member's own weights too, it learns through LoRA only):

1. **Tokens**: easy-VQA images → EfficientNet-Lite0 tokens, cached once (:mod:`.data`); standardized
   per channel with the train split's mean and std.
2. **Edge model**: the projector and LoRA on the member (``tofc.lora_rank``; 0 = the projector
   alone), answer cross-entropy of the member on [projected visual; question],
   one step in three on all 64 tokens (what JPEG/WebP/uncompressed deliver) and on the n_c DPC-KNN
   merged tokens (what TOFC delivers), so one edge model serves every method.
3. **Codec per λ**: a short reconstruction warm-up (MSE + λ·bits, no member), then the paper's loss
   L = CE(answer) + λ·bits + α·balance with the projector and member frozen.

Trained weights are cached under ``$AIFLOW_CACHE/tofc/models/<recipe hash>/`` (safetensors + JSON),
so a rerun with the same recipe loads them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from aiflow_fl.errors import AiflowError
from aiflow_fl.files import atomic_write_bytes
from aiflow_fl.models import cache_dir
from aiflow_fl.tofc.entropy import CodecConfig, TofcCodec
from aiflow_fl.tofc.merge import dpc_knn_merge

RECIPE_FORMAT = 1
Progress = Callable[[str], None]


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


@dataclass
class TokenStats:
    """Per-channel mean and std of the train tokens (device and edge share them)."""

    mean: torch.Tensor
    std: torch.Tensor

    def standardize(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens.float() - self.mean) / self.std


@dataclass
class TofcSystem:
    """Everything both sides need: the config, token statistics, edge model and codecs by λ."""

    cfg: object  # aiflow_fl.config.TofcConfig
    stats: TokenStats
    edge: object  # aiflow_fl.tofc.edge.EdgeModel
    codecs: dict[float, TofcCodec] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    encoder: object = None  # TokenEncoder, loaded on first use

    def codec(self, lam: float | None = None) -> tuple[float, TofcCodec]:
        if not self.codecs:
            raise AiflowError("This TOFC system has no trained codec; run `aiflow tofc train`.")
        if lam is None:
            lam = min(self.codecs)
        matches = [k for k in self.codecs if abs(k - lam) <= 1e-12 * max(1.0, abs(lam))]
        if not matches:
            raise AiflowError(f"No codec for λ={lam}; trained: {', '.join(f'{k:g}' for k in sorted(self.codecs))}.")
        return matches[0], self.codecs[matches[0]]

    def token_encoder(self):
        if self.encoder is None:
            from aiflow_fl.tofc.encoder import load_encoder

            self.encoder = load_encoder()
        return self.encoder


def codec_config(cfg) -> CodecConfig:
    from aiflow_fl.tofc.encoder import TOKEN_CHANNELS

    return CodecConfig(channels=TOKEN_CHANNELS, latent=cfg.latent, hyper=cfg.hyper, experts=cfg.experts,
                       temperature=cfg.temperature)


def _plain(cfg) -> dict:
    if hasattr(cfg, "__dataclass_fields__"):
        return asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


# Settings only the codecs read: they key each codec's file, not the folder, so changing them retrains
# the codecs (~30 s each) and keeps the projector and LoRA (minutes).
CODEC_FIELDS = ("latent", "hyper", "experts", "temperature", "balance_weight", "codec_warmup_steps", "codec_steps",
                "codec_mse_weight")


def recipe_key(config) -> str:
    """Hash of everything that changes the edge's trained weights: the TOFC recipe (not the evaluation
    settings, the λ list or the codec-only settings: each codec is its own file, :func:`codec_path`)
    and the language member it feeds."""
    from aiflow_fl.family.member import family_built

    recipe = {k: v for k, v in _plain(config.tofc).items() if k not in ("eval_questions", "lambdas", *CODEC_FIELDS)}
    recipe["format"] = RECIPE_FORMAT
    recipe["model"] = [str(config.model.name), str(config.model.dtype)]
    recipe["family"] = str(Path(config.family.dir).resolve()) if family_built(config) else ""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def model_dir(config) -> Path:
    return cache_dir() / "tofc" / "models" / recipe_key(config)


def codec_path(folder: Path, cfg, lam: float) -> Path:
    """The file of λ's codec trained with ``cfg``'s (the tofc section's) codec settings, in ``folder``."""
    plain = _plain(cfg)
    key = hashlib.sha256(json.dumps({k: plain[k] for k in CODEC_FIELDS}, sort_keys=True).encode()).hexdigest()[:8]
    return folder / f"codec-{lam:g}-{key}.safetensors"


def member_for(config):
    """The edge model: a fresh projector (seeded) in front of the family member ``tofc.member``."""
    from aiflow_fl.tofc.data import answer_names
    from aiflow_fl.tofc.edge import EdgeModel, language_member
    from aiflow_fl.tofc.encoder import TOKEN_CHANNELS

    member = language_member(config)
    torch.manual_seed(config.tofc.seed)
    edge = EdgeModel(member, answer_names(), TOKEN_CHANNELS)
    if config.tofc.lora_rank > 0:
        edge.add_lora(config.tofc.lora_rank, list(config.tofc.lora_targets), config.tofc.seed)
    return edge


@dataclass
class TrainData:
    """Standardized train tokens (N, 64, C), their merged tokens (N, n_c, C), and the questions."""

    tokens: torch.Tensor
    merged: torch.Tensor
    questions: list[str]
    answers: torch.Tensor
    image_index: torch.Tensor


def merge_tokens(tokens: torch.Tensor, n_c: int, k: int, batch: int = 256) -> torch.Tensor:
    return torch.cat([dpc_knn_merge(tokens[i:i + batch], n_c, k) for i in range(0, len(tokens), batch)])


def train_data(cfg, progress: Progress | None = None) -> tuple[TrainData, TokenStats]:
    from aiflow_fl.tofc.data import cached_tokens, load_split

    split = load_split("train")
    _say(progress, f"tokens: {len(split.images)} train images through EfficientNet-Lite0 (cached)")
    raw, _ = cached_tokens("train", "png", split.images)
    flat = raw.float().reshape(-1, raw.shape[-1])
    stats = TokenStats(flat.mean(0), flat.std(0).clamp(min=1e-3))
    tokens = stats.standardize(raw)
    merged = merge_tokens(tokens, cfg.merged_tokens, cfg.knn)
    return TrainData(tokens, merged, split.questions, split.answers, split.image_index), stats


def _batches(n: int, batch_size: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=gen)


def train_projector(edge, data: TrainData, cfg, progress: Progress | None = None) -> list[float]:
    """Stage 2: the projector (and the member's LoRA, if any) on the answer CE (full and merged tokens
    on alternate steps)."""
    lora = [p for p in edge.trainable_parameters() if not any(p is q for q in edge.projector.parameters())]
    # LoRA moves a pretrained member: a third of the projector's rate (the projector starts from scratch).
    groups = [{"params": list(edge.projector.parameters()), "lr": cfg.lr}] + ([{"params": lora, "lr": cfg.lr / 3}] if lora else [])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=max(1, cfg.projector_steps), pct_start=0.1)
    losses = []
    edge.projector.train()
    for step, rows in enumerate(_batches(len(data.questions), cfg.batch_size, cfg.projector_steps, cfg.seed)):
        images = data.image_index[rows]
        # Full-token steps cost ~3× merged ones (64 vs n_c visual positions): one in three.
        visual = data.tokens[images] if step % 3 == 0 else data.merged[images]
        loss = edge.loss(visual, [data.questions[i] for i in rows.tolist()], data.answers[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == cfg.projector_steps:
            what = "projector + member LoRA" if edge.has_lora else "projector"
            _say(progress, f"edge ({what}) step {step + 1}/{cfg.projector_steps}: CE {np.mean(losses[-50:]):.3f}")
    edge.freeze()
    return losses


def train_codec(lam: float, edge, data: TrainData, cfg, progress: Progress | None = None) -> tuple[TofcCodec, dict]:
    """Stage 3 for one λ: warm-up on reconstruction, then CE + λ·bits + α·balance (paper §II-B1) +
    ``codec_mse_weight``·MSE (the reconstruction stays a term: the frozen edge reads features near its own)."""
    torch.manual_seed(cfg.seed)
    codec = TofcCodec(codec_config(cfg)).train()
    opt = torch.optim.AdamW(codec.parameters(), lr=cfg.lr * 3, weight_decay=0.0)
    n_images = len(data.merged)
    history: dict[str, list[float]] = {"warmup_mse": [], "ce": [], "bits": []}
    for step, rows in enumerate(_batches(n_images, 64, cfg.codec_warmup_steps, cfg.seed + 1)):
        x = data.merged[rows]
        out = codec(x)
        mse = (out.reconstruction - x).square().mean()
        loss = mse + lam * out.bits.mean() + cfg.balance_weight * out.balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["warmup_mse"].append(mse.item())
    _say(progress, f"codec λ={lam:g} warm-up: MSE {np.mean(history['warmup_mse'][-50:] or [0]):.3f}")
    opt = torch.optim.AdamW(codec.parameters(), lr=cfg.lr, weight_decay=0.0)
    for step, rows in enumerate(_batches(len(data.questions), cfg.batch_size, cfg.codec_steps, cfg.seed + 2)):
        images = data.image_index[rows]
        x = data.merged[images]
        out = codec(x)
        ce = edge.loss(out.reconstruction, [data.questions[i] for i in rows.tolist()], data.answers[rows])
        mse = (out.reconstruction - x).square().mean()
        loss = ce + lam * out.bits.mean() + cfg.balance_weight * out.balance + cfg.codec_mse_weight * mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["ce"].append(ce.item())
        history["bits"].append(out.bits.mean().item())
        if (step + 1) % 50 == 0 or step + 1 == cfg.codec_steps:
            _say(progress, f"codec λ={lam:g} step {step + 1}/{cfg.codec_steps}: CE {np.mean(history['ce'][-50:]):.3f}, "
                 f"{np.mean(history['bits'][-50:]):.0f} bits/image")
    codec.eval()
    for p in codec.parameters():
        p.requires_grad_(False)
    return codec, history


def _save(system: TofcSystem, folder: Path) -> None:
    from safetensors.torch import save

    lora = system.edge.lora_state()
    if lora:
        atomic_write_bytes(folder / "edge-lora.safetensors", save({k: v.contiguous() for k, v in lora.items()}))
    atomic_write_bytes(folder / "projector.safetensors", save({k: v.contiguous() for k, v in system.edge.projector.state_dict().items()}))
    atomic_write_bytes(folder / "stats.safetensors", save({"mean": system.stats.mean.contiguous(), "std": system.stats.std.contiguous()}))
    for lam, codec in system.codecs.items():
        atomic_write_bytes(codec_path(folder, system.cfg, lam), save({k: v.contiguous() for k, v in codec.state_dict().items()}))
    atomic_write_bytes(folder / "info.json", json.dumps(system.info, indent=1).encode())


def load_system(config, lambdas: list[float] | None = None) -> TofcSystem:
    """The trained system of this recipe (``config``: the whole AiflowConfig) from the cache
    (AiflowError if it was never trained)."""
    from safetensors.torch import load_file

    cfg = config.tofc
    folder = model_dir(config)
    if not (folder / "projector.safetensors").is_file():
        raise AiflowError(f"No trained TOFC system for this recipe in {folder}; run `aiflow tofc train` first.")
    edge = member_for(config)
    edge.projector.load_state_dict(load_file(str(folder / "projector.safetensors")))
    if edge.has_lora:
        if not (folder / "edge-lora.safetensors").is_file():
            raise AiflowError(f"The TOFC system in {folder} lacks edge-lora.safetensors (its recipe has LoRA); retrain it.")
        edge.load_lora_state(load_file(str(folder / "edge-lora.safetensors")))
    edge.freeze()
    s = load_file(str(folder / "stats.safetensors"))
    info = json.loads((folder / "info.json").read_text()) if (folder / "info.json").is_file() else {}
    system = TofcSystem(cfg, TokenStats(s["mean"], s["std"]), edge, info=info)
    for lam in lambdas if lambdas is not None else list(cfg.lambdas):
        path = codec_path(folder, cfg, lam)
        if path.is_file():
            codec = TofcCodec(codec_config(cfg))
            codec.load_state_dict(load_file(str(path)))
            system.codecs[float(lam)] = codec.eval().requires_grad_(False)
    return system


def train_system(config, progress: Progress | None = None, retrain: bool = False) -> TofcSystem:
    """Train what the cache lacks (projector, then each λ's codec) and return the whole system."""
    cfg = config.tofc
    folder = model_dir(config)
    system = None
    if not retrain:
        try:
            system = load_system(config)  # the cached edge and whichever codecs of cfg.lambdas exist
            if all(float(l) in system.codecs for l in cfg.lambdas):
                _say(progress, f"TOFC system loaded from {folder}")
                return system
        except AiflowError:
            if (folder / "projector.safetensors").is_file():
                raise  # a cached edge that does not load (e.g. another LoRA shape): say why, never retrain over it
    data, stats = train_data(cfg, progress)
    start = time.perf_counter()
    if system is not None:
        system.stats = stats
        previous = dict(system.codecs)
    else:
        edge = member_for(config)
        system = TofcSystem(cfg, stats, edge, info={"recipe": recipe_key(config), "member": edge.member.name, "train_s": {}})
        system.info["projector_ce"] = train_projector(edge, data, cfg, progress)[-50:]
        system.info.setdefault("train_s", {})["projector"] = round(time.perf_counter() - start, 1)
        _save(system, folder)
        previous = load_system(config).codecs if not retrain else {}
    system.info.setdefault("train_s", {})
    for lam in cfg.lambdas:
        lam = float(lam)
        if lam in previous:
            system.codecs[lam] = previous[lam]
            continue
        t0 = time.perf_counter()
        system.codecs[lam], history = train_codec(lam, system.edge, data, cfg, progress)
        system.info["train_s"][f"codec-{lam:g}"] = round(time.perf_counter() - t0, 1)
        system.info[f"codec-{lam:g}"] = {k: v[-50:] for k, v in history.items()}
        _save(system, folder)
    return system


@torch.no_grad()
def accuracy(edge, visual: torch.Tensor, questions: list[str], answers: torch.Tensor, image_index: torch.Tensor,
             batch_size: int = 32) -> tuple[float, torch.Tensor]:
    """Answer accuracy of the edge model given per-image visual tokens (N_images, n, C)."""
    preds = []
    for i in range(0, len(questions), batch_size):
        rows = slice(i, i + batch_size)
        preds.append(edge.predict(visual[image_index[rows]].float(), questions[rows]))
    pred = torch.cat(preds)
    return float((pred == answers).float().mean()), pred


def eval_questions(split, count: int, seed: int) -> torch.Tensor:
    """Indices of ``count`` test questions, at most one per image first (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split.questions), generator=gen)
    seen, first, rest = set(), [], []
    for q in order.tolist():
        img = int(split.image_index[q])
        (rest if img in seen else first).append(q)
        seen.add(img)
    return torch.tensor((first + rest)[:count])


def test_set(system: TofcSystem, count: int, variant: str = "png", progress: Progress | None = None):
    """The easy-VQA test questions scored (``count``, one per image first, seeded) and the standardized
    tokens of every test image in ``variant`` (``png``, ``jpeg-Q``, ``webp-Q``; cached); also the
    real bytes per image of that variant."""
    from aiflow_fl.tofc.data import cached_tokens, load_split
    from aiflow_fl.tofc.evaluate import TestSet

    split = _test_split()
    q = eval_questions(split, count, system.cfg.seed)
    _say(progress, f"tokens: {len(split.images)} test images ({variant}) through EfficientNet-Lite0 (cached)")
    raw, sizes = cached_tokens("test", variant, split.images)
    tokens = system.stats.standardize(raw)
    merged = merge_tokens(tokens, system.cfg.merged_tokens, system.cfg.knn)
    test = TestSet(tokens, merged, [split.questions[i] for i in q.tolist()], split.answers[q], split.image_index[q])
    return test, sizes


_TEST_SPLIT = None


def _test_split():
    global _TEST_SPLIT
    if _TEST_SPLIT is None:
        from aiflow_fl.tofc.data import load_split

        _TEST_SPLIT = load_split("test")
    return _TEST_SPLIT


def evaluate_system(system: TofcSystem, count: int, progress: Progress | None = None) -> list:
    """Points (bytes/image, accuracy) of uncompressed float16 tokens, merge-only and every λ's codec."""
    from aiflow_fl.tofc.evaluate import fp16_point, tofc_point

    test, _ = test_set(system, count, progress=progress)
    points = [fp16_point(system.edge, "uncompressed", test.tokens, test), fp16_point(system.edge, "merge-only", test.merged, test)]
    for lam in sorted(system.codecs):
        point, _ = tofc_point(system.edge, system.codecs[lam], lam, test)
        points.append(point)
        _say(progress, f"{point.method}: {point.bytes:.1f} bytes/image, accuracy {point.accuracy:.3f}")
    return points

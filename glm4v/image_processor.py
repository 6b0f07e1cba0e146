"""Image preprocessing for GLM-4V (spec §5), without torchvision.

Any Pillow-readable image → EXIF orientation applied → RGB → bicubic stretch to N×N (no crop, no padding, aspect
ratio not kept, exactly as the reference) → [0, 1] → CLIP mean/std → float32 tensor (3, N, N).

Large inputs are shrunk cheaply first (JPEG DCT-domain draft decoding, then Pillow's integer ``reduce`` inside
``resize(reducing_gap=3)``, which only kicks in for sources at least 6× the target side) so a 12 MP photo does not
cost a full-size decode. Other images take exactly the reference's plain bicubic path.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_MAX_PIXELS = 50_000_000  # decompression-bomb guard: width × height before decoding
MIN_SIDE = 2


class ImageError(ValueError):
    """The bytes are not an image we accept; the message is safe to show to the client."""


def open_image(
    data: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, target: int | None = None
) -> Image.Image:
    """Decode bytes (or a path) into an RGB PIL image, enforcing a pixel cap before decoding the pixels.

    ``target`` lets JPEG decoding skip straight to a scale ≥ target×target (the draft mode).
    """
    try:
        im = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from None
    except (OSError, ValueError, SyntaxError):
        raise ImageError("data is not an image in a format Pillow can read") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(f"image is {w}×{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"image is {w}×{h}; both sides must be at least {MIN_SIDE} pixels")
    try:
        if target and im.format == "JPEG":
            im.draft("RGB", (target, target))  # decoded at 1/2, 1/4 or 1/8 scale when still ≥ target
        im = ImageOps.exif_transpose(im)  # applies the orientation tag; loads the pixels
        if im.mode != "RGB":
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # Composite transparency on white rather than letting convert() turn it black.
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"image could not be decoded: {e}") from None
    return im


class ImageProcessor:
    def __init__(self, image_size: int = 1120, mean=CLIP_MEAN, std=CLIP_STD, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.image_size = image_size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.max_pixels = max_pixels

    def resize(self, image: Image.Image, size: int) -> Image.Image:
        return image.resize((size, size), Image.BICUBIC, reducing_gap=3.0)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        # numpy, not torch: this runs on request threads, and a torch op big enough to go parallel would give each
        # of them an OpenMP team, which throttles the spin-waiting of the engine thread's team (docs/PERFORMANCE.md).
        arr = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # (N, N, 3) in [0, 1]
        arr = (arr - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, N, N)

    def __call__(self, image: Image.Image | bytes | str | Path, size: int | None = None) -> torch.Tensor:
        """One image → (3, size, size) float32; ``size`` defaults to the processor's vision size."""
        size = size or self.image_size
        if not isinstance(image, Image.Image):
            image = open_image(image, self.max_pixels, target=size)
        elif image.mode != "RGB":
            image = image.convert("RGB")
        return self.to_tensor(self.resize(image, size))

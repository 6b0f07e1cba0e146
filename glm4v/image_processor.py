"""Image preprocessing for GLM-4V (docs/MODEL.md §5), without torchvision.

An image in an accepted format → EXIF orientation applied → RGB → bicubic stretch to N×N (no crop, no padding,
aspect ratio not kept, exactly as the reference) → [0, 1] → CLIP mean/std → float32 tensor (3, N, N).

Untrusted bytes are opened defensively (:func:`open_image`):

* only the decoders in :data:`ALLOWED_FORMATS` (PNG, JPEG, WebP, GIF, BMP, TIFF) ever see the data. Pillow's other
  plugins are never tried: EPS would hand the bytes to Ghostscript, ICO/ICNS decode their frames while *opening*
  (before any size check), and the long tail of rarely used decoders is attack surface we do not need. Anything else
  is refused with a message naming the accepted formats; the MIME type a client claims is ignored.
* the pixel count is checked from the header before any pixel is decoded: ``Image.open`` of these formats only
  parses headers, and WebP's canvas size is read from its RIFF header first because libwebp allocates the canvas
  when its decoder is created. Pillow's own ``Image.MAX_IMAGE_PIXELS`` guard (``DecompressionBombError``) stays in
  force as a backstop and is reported as "too large" as well; our limit is ``max_pixels``. A TIFF's tile size is
  bounded too, since libtiff allocates a whole tile even for a tiny image.
* multi-frame images (animated GIF/WebP/PNG, multi-page TIFF) use the first frame only; no other frame is decoded.
* messages in :class:`ImageError` are fixed, safe text: Pillow's exception text (which can hold server paths) is
  logged at debug level, never passed on.

Large inputs are shrunk cheaply first (JPEG DCT-domain draft decoding, then Pillow's integer ``reduce`` inside
``resize(reducing_gap=3)``, which only kicks in for sources at least 6× the target side) so a 12 MP photo does not
cost a full-size decode. Other images take exactly the reference's plain bicubic path.
"""

from __future__ import annotations

import io
import logging
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_MAX_PIXELS = 50_000_000  # decompression-bomb guard: width × height before decoding
MIN_SIDE = 2

# The only Pillow decoders untrusted bytes may reach (``Image.open(..., formats=ALLOWED_FORMATS)``).
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_FORMATS_TEXT = "PNG, JPEG, WebP, GIF, BMP or TIFF"
_MAX_TILE_FLOOR = 1 << 20  # TIFF tiles up to 1024×1024 pass even under a smaller max_pixels (ordinary tiles do)


class ImageError(ValueError):
    """The bytes are not an image we accept; the message is safe to show to the client."""


class ImageTooLarge(ImageError):
    """The image has more pixels than allowed (found from its header, before decoding)."""


def _webp_canvas_size(head: bytes) -> tuple[int, int] | None:
    """A WebP file's canvas size from its first 30 bytes; None when the header does not say (not a valid WebP)."""
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", head, 26)
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _too_large(w: int, h: int, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(f"image is {w}×{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")


def _not_accepted() -> ImageError:
    return ImageError(f"data is not an image in an accepted format ({ACCEPTED_FORMATS_TEXT})")


def _bomb(max_pixels: int) -> ImageTooLarge:
    limit = max_pixels if Image.MAX_IMAGE_PIXELS is None else min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)
    return ImageTooLarge(f"image is over the limit of {limit:,} pixels")


def _open_checked(fp, max_pixels: int) -> Image.Image:
    """Open with the allowed decoders only (headers, no pixels) and check the size; the caller closes the image."""
    head = fp.read(30)
    fp.seek(0)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":  # libwebp allocates the canvas at open: check it first
        size = _webp_canvas_size(head)
        if size is None:
            raise _not_accepted()
        if size[0] * size[1] > max_pixels:
            raise _too_large(*size, max_pixels)
    try:
        im = Image.open(fp, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        log.debug("image refused by Pillow's decompression-bomb guard: %s", e)
        raise _bomb(max_pixels) from None
    except Exception as e:  # UnidentifiedImageError for other formats, or a broken header
        log.debug("image could not be opened: %r", e)
        raise _not_accepted() from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise _too_large(w, h, max_pixels)
    if min(w, h) < MIN_SIDE:
        im.close()
        raise ImageError(f"image is {w}×{h}; both sides must be at least {MIN_SIDE} pixels")
    if im.format == "TIFF":  # libtiff allocates a whole tile, however small the image: a tiny file, a huge buffer
        tw, th = im.tag_v2.get(322), im.tag_v2.get(323)  # TileWidth, TileLength
        if isinstance(tw, int) and isinstance(th, int) and tw * th > max(max_pixels, _MAX_TILE_FLOOR):
            im.close()
            raise ImageTooLarge(f"TIFF tiles are {tw}×{th} = {tw * th:,} pixels, over the limit of {max_pixels:,}")
    return im


def open_image(
    data: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, target: int | None = None
) -> Image.Image:
    """Decode bytes (or a path) into an RGB PIL image of the first frame, enforcing the format allow-list and a pixel
    cap before decoding any pixel. Raises :class:`ImageError` (:class:`ImageTooLarge` for the pixel cap) with a
    message that is safe to show to a client.

    ``target`` lets JPEG decoding skip straight to a scale ≥ target×target (the draft mode).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(data)
    else:
        try:
            fp = open(data, "rb")  # noqa: SIM115 — closed below
        except (OSError, ValueError) as e:
            log.debug("image file could not be read: %r", e)
            raise ImageError("image file could not be read") from None
    with fp:
        src = _open_checked(fp, max_pixels)
        with src:
            try:
                if target and src.format in ("JPEG", "MPO"):  # MPO: a JPEG with extra frames
                    src.draft("RGB", (target, target))  # decoded at 1/2, 1/4 or 1/8 scale when still ≥ target
                im = ImageOps.exif_transpose(src)  # loads the first frame only; applies the orientation tag; a copy
                if im.mode != "RGB":
                    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                        # Composite transparency on white rather than letting convert() turn it black.
                        im = im.convert("RGBA")
                        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                        im = Image.alpha_composite(bg, im)
                    im = im.convert("RGB")
            except Image.DecompressionBombError as e:
                log.debug("image refused by Pillow's decompression-bomb guard: %s", e)
                raise _bomb(max_pixels) from None
            except Exception as e:  # truncated or corrupt data; Pillow's text may hold paths, so it stays in the log
                log.debug("image could not be decoded: %r", e)
                raise ImageError("image data is corrupt or truncated and could not be decoded") from None
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

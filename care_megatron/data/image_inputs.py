"""What both image backends compute before decoding: the encoded bytes of an image reference, its
size after EXIF orientation, and the Qwen-VL resize rule's target size.

Kept apart from :mod:`care_megatron.data.images` (the PIL pipeline and the backend choice) so that
the DALI backend (:mod:`care_megatron.data.dali_images`) and the PIL one both build on it without
importing each other.
"""
from __future__ import annotations

import io
import math
import os
from typing import Optional, Union

from PIL import Image

from care_megatron.data.schema import ImageRef

MAX_ASPECT_RATIO = 200
"""The Qwen processors reject images more elongated than this."""


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Target ``(height, width)`` of the Qwen-VL resize rule.

    Each side is rounded to the nearest multiple of ``factor``; if the area then exceeds
    ``max_pixels`` both sides shrink by ``sqrt(area / max_pixels)`` and round down to multiples of
    ``factor``; if it falls below ``min_pixels`` both grow by ``sqrt(min_pixels / area)`` and round
    up. Aspect ratio is kept as closely as that allows. Python's ``round`` (half to even) matches the
    Hugging Face processors exactly.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.1f} exceeds {MAX_ASPECT_RATIO}")
    target_h = round(height / factor) * factor
    target_w = round(width / factor) * factor
    if target_h * target_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        target_h = max(factor, math.floor(height / beta / factor) * factor)
        target_w = max(factor, math.floor(width / beta / factor) * factor)
    elif target_h * target_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        target_h = math.ceil(height * beta / factor) * factor
        target_w = math.ceil(width * beta / factor) * factor
    return target_h, target_w


def encoded_bytes(ref: ImageRef, base_dir: Optional[Union[str, os.PathLike]] = None) -> bytes:
    """The encoded file bytes of ``ref`` (a decoded PIL image is re-encoded losslessly as PNG)."""
    if isinstance(ref, bytes):
        return ref
    if isinstance(ref, Image.Image):
        buffer = io.BytesIO()
        ref.save(buffer, format="PNG")
        return buffer.getvalue()
    path = os.fspath(ref)
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    with open(path, "rb") as handle:
        return handle.read()


def oriented_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` of an encoded image after its EXIF orientation, reading only the header."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block: the decoders ignore it too
        orientation = 1
    if orientation in (5, 6, 7, 8):  # transposed / rotated by 90 or 270 degrees
        width, height = height, width
    return height, width

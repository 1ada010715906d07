"""Image loading for the Qwen-VL processors: decode, RGB, orientation, resize to the pixel budget.

Two backends produce the same thing, a list of ``uint8`` arrays ``[H, W, 3]`` whose sides are
multiples of ``factor = patch_size * spatial_merge_size`` (28 for Qwen2.5-VL, 32 for Qwen3-VL)
and whose area lies in ``[min_pixels, max_pixels]``:

* ``pil`` (:class:`PilImagePipeline`): CPU, PIL decode + bicubic resize, the reference;
* ``dali`` (``care_megatron.data.dali_images.DaliImagePipeline``): NVIDIA DALI, decode on the GPU
  (``device="mixed"``) and resize there; needs the ``[dali]`` extra.

:func:`build_image_pipeline` picks one from ``data.image_backend``. Resizing to the rule here means
the processor's own resize is then the identity, so both backends feed it identical shapes.
"""
from __future__ import annotations

import os
from typing import Optional, Protocol, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

# The resize rule and byte helpers live in image_inputs (shared with the DALI backend); kept importable from here.
from care_megatron.data.image_inputs import MAX_ASPECT_RATIO, encoded_bytes, oriented_size, smart_resize  # noqa: F401
from care_megatron.data.schema import ImageRef, open_image_ref

IMAGE_BACKENDS = ("pil", "dali")


def decode_image(ref: ImageRef, base_dir: Optional[Union[str, os.PathLike]] = None) -> Image.Image:
    """Decode ``ref`` to an RGB PIL image with its EXIF orientation applied (camera photos come rotated)."""
    image = open_image_ref(ref, base_dir)
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        # Plain conversion (alpha dropped, palette expanded), as the HF processors and DALI's RGB decode do.
        image = image.convert("RGB")
    return image


def resize_to_rule(image: Image.Image, factor: int, min_pixels: int, max_pixels: int) -> Image.Image:
    """Bicubic resize of an RGB image to :func:`smart_resize`'s target (no-op when already there)."""
    target_h, target_w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    if (target_h, target_w) == (image.height, image.width):
        return image
    return image.resize((target_w, target_h), Image.BICUBIC)


class ImagePipeline(Protocol):
    """Decode and resize a batch of images: ``refs`` -> list of ``uint8`` arrays ``[H, W, 3]``."""

    factor: int
    min_pixels: int
    max_pixels: int

    def __call__(self, refs: Sequence[ImageRef]) -> list[np.ndarray]:
        ...


class PilImagePipeline:
    """CPU reference pipeline: PIL decode, RGB, EXIF transpose, bicubic resize to the rule."""

    def __init__(self, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
                 base_dir: Optional[Union[str, os.PathLike]] = None):
        if factor < 1 or min_pixels < 1 or max_pixels < min_pixels:
            raise ValueError(f"bad resize rule: factor={factor}, min_pixels={min_pixels}, max_pixels={max_pixels}")
        self.factor, self.min_pixels, self.max_pixels, self.base_dir = factor, min_pixels, max_pixels, base_dir

    def load(self, ref: ImageRef) -> Image.Image:
        """One image as a resized RGB PIL image."""
        return resize_to_rule(decode_image(ref, self.base_dir), self.factor, self.min_pixels, self.max_pixels)

    def __call__(self, refs: Sequence[ImageRef]) -> list[np.ndarray]:
        return [np.asarray(self.load(ref), dtype=np.uint8) for ref in refs]


def build_image_pipeline(backend: str = "pil", factor: int = 28, min_pixels: int = 56 * 56,
                         max_pixels: int = 28 * 28 * 1280, **backend_kwargs) -> ImagePipeline:
    """The image pipeline named by ``data.image_backend``.

    ``dali`` imports NVIDIA DALI lazily (only ``care_megatron.data.dali_images`` imports it) and
    raises ``ImportError`` naming the ``[dali]`` extra when it is missing. ``backend_kwargs`` go to the
    backend (``device``, ``device_id``, ``max_batch_size``, ``num_threads`` for DALI; ``base_dir`` for both).
    """
    if backend == "pil":
        return PilImagePipeline(factor, min_pixels, max_pixels, base_dir=backend_kwargs.get("base_dir"))
    if backend == "dali":
        from care_megatron.data.dali_images import DaliImagePipeline  # lazy: the optional dependency

        return DaliImagePipeline(factor, min_pixels, max_pixels, **backend_kwargs)
    raise ValueError(f"unknown image backend {backend!r}; valid: {', '.join(IMAGE_BACKENDS)}")


def image_pipeline_from_config(data_config, patch_size: int = 14, spatial_merge_size: int = 2,
                               **backend_kwargs) -> ImagePipeline:
    """:func:`build_image_pipeline` from a ``DataConfig`` (backend, min / max pixels) and the vision
    tower's patch and merge sizes (factor = patch_size * spatial_merge_size)."""
    return build_image_pipeline(data_config.image_backend, patch_size * spatial_merge_size,
                                data_config.min_pixels, data_config.max_pixels, **backend_kwargs)


def local_device_id() -> int:
    """This process's accelerator index on its node: ``LOCAL_RANK`` (set by torchrun, and by the
    sbatch scripts for every task), 0 for a single process."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def run_image_pipeline(data_config, image_processor) -> Optional[ImagePipeline]:
    """The image pipeline a run's prompt building uses, from ``data.image_backend``.

    ``pil`` returns None: :func:`care_megatron.data.prompting.build_prompt` then lets the PIL image
    processor decode and resize, which is the same rule as :class:`PilImagePipeline` (the reference).
    ``dali`` returns a :class:`~care_megatron.data.dali_images.DaliImagePipeline` sized by the
    processor's patch and merge sizes and ``data.min_pixels`` / ``data.max_pixels``: GPU decode on this
    rank's own device (``LOCAL_RANK``; every rank decoding on GPU 0 would crowd one card), or DALI's
    CPU operators when no CUDA device is visible.
    """
    if data_config.image_backend == "pil":
        return None
    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    return image_pipeline_from_config(data_config, int(image_processor.patch_size), int(image_processor.merge_size),
                                      device=device, device_id=local_device_id())

"""NVIDIA DALI image pipeline: decode on the GPU, resize there, same rule as the PIL reference.

The only module that imports ``nvidia.dali`` (``pip install care_megatron[dali]``, i.e.
``nvidia-dali-cuda130``). :class:`DaliImagePipeline` has the interface of
``care_megatron.data.images.PilImagePipeline``: encoded images in, ``uint8`` arrays ``[H, W, 3]``
out, resized to :func:`care_megatron.data.image_inputs.smart_resize`'s target.

How it works: target sizes are computed on the host from each file's header (with the EXIF
orientation applied, as the decoder applies it), then fed per sample beside the encoded bytes;
``fn.decoders.image(device="mixed")`` decodes with nvJPEG / nvImageCodec on the GPU and
``fn.resize`` resamples with a bicubic filter and antialiasing on downscale. ``device="cpu"`` runs
the same graph on DALI's CPU operators (used by the tests on machines without a GPU).

Agreement with PIL: the decoded pixels of lossless formats (PNG) are identical; JPEG decoders differ
by a few levels (IDCT and chroma upsampling implementations), and DALI's cubic kernel differs from
PIL's slightly, so resized outputs agree within a tolerance rather than exactly (see
tests/data/test_images.py for the bounds asserted).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np

from care_megatron.data.image_inputs import encoded_bytes, oriented_size, smart_resize
from care_megatron.data.schema import ImageRef

try:
    import nvidia.dali as dali
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
except ImportError as exc:  # raised with the fix when a config selects the dali backend
    raise ImportError(
        "data.image_backend='dali' needs NVIDIA DALI: pip install care_megatron[dali] "
        "(or pip install nvidia-dali-cuda130)"
    ) from exc


def _build_graph(device: str, max_batch_size: int, num_threads: int, device_id: Optional[int]):
    decode_device = "mixed" if device == "gpu" else "cpu"

    @dali.pipeline_def(batch_size=max_batch_size, num_threads=num_threads, device_id=device_id,
                       prefetch_queue_depth=1, exec_dynamic=True)
    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        width = fn.external_source(name="width", dtype=types.FLOAT, ndim=0)
        height = fn.external_source(name="height", dtype=types.FLOAT, ndim=0)
        decoded = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, adjust_orientation=True)
        return fn.resize(decoded, resize_x=width, resize_y=height, interp_type=types.INTERP_CUBIC,
                         antialias=True, dtype=types.UINT8)

    pipe = graph()
    pipe.build()
    return pipe


class DaliImagePipeline:
    """Batch image decode + resize on DALI. ``device="gpu"``: mixed (GPU) decode; ``"cpu"``: CPU operators."""

    def __init__(self, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
                 device: str = "gpu", device_id: int = 0, max_batch_size: int = 64, num_threads: int = 4,
                 base_dir: Optional[Union[str, os.PathLike]] = None):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"DaliImagePipeline device must be gpu or cpu, got {device!r}")
        if factor < 1 or min_pixels < 1 or max_pixels < min_pixels:
            raise ValueError(f"bad resize rule: factor={factor}, min_pixels={min_pixels}, max_pixels={max_pixels}")
        self.factor, self.min_pixels, self.max_pixels = factor, min_pixels, max_pixels
        self.device, self.max_batch_size, self.base_dir = device, max_batch_size, base_dir
        self.device_id = device_id  # the CUDA device decoding runs on (unused by the CPU operators)
        self._pipe = _build_graph(device, max_batch_size, num_threads, device_id if device == "gpu" else None)

    def _run_chunk(self, blobs: list[bytes]) -> list[np.ndarray]:
        sizes = [smart_resize(*oriented_size(blob), self.factor, self.min_pixels, self.max_pixels) for blob in blobs]
        self._pipe.feed_input("encoded", [np.frombuffer(blob, dtype=np.uint8) for blob in blobs])
        self._pipe.feed_input("width", [np.float32(w) for _, w in sizes])
        self._pipe.feed_input("height", [np.float32(h) for h, _ in sizes])
        try:
            (output,) = self._pipe.run()
        except RuntimeError as exc:  # a corrupt file: an unreadable record (skipped by the caller), not a crash
            raise OSError(f"DALI could not decode an image: {str(exc).splitlines()[0]}") from exc
        if self.device == "gpu":
            output = output.as_cpu()
        arrays = [np.array(output.at(i), dtype=np.uint8) for i in range(len(blobs))]
        for array, (h, w) in zip(arrays, sizes):
            if array.shape != (h, w, 3):  # the resize rule is the contract the processor relies on
                raise RuntimeError(f"DALI produced {array.shape}, expected {(h, w, 3)}")
        return arrays

    def __call__(self, refs: Sequence[ImageRef]) -> list[np.ndarray]:
        blobs = [encoded_bytes(ref, self.base_dir) for ref in refs]
        out: list[np.ndarray] = []
        for start in range(0, len(blobs), self.max_batch_size):
            out.extend(self._run_chunk(blobs[start:start + self.max_batch_size]))
        return out

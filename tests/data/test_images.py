"""Image pipelines: the resize rule against transformers', PIL decode details, DALI against PIL.

Tolerances of the DALI-vs-PIL comparison (measured with DALI 2.4.0's CPU operators on these images):
decoding alone is exact for PNG and for baseline JPEG (both use libjpeg-turbo-compatible IDCTs here;
at most 4 levels allowed); after a bicubic resize the kernels differ slightly: mean absolute
difference measured <= 0.3 levels, max 17 at hard colour edges; asserted mean <= 1.0, max <= 32.
"""
import importlib
import io
import itertools
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from care_megatron.config.schema import DataConfig
from care_megatron.data.images import (
    PilImagePipeline,
    build_image_pipeline,
    decode_image,
    image_pipeline_from_config,
    smart_resize,
)

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali not installed (pip install care_megatron[dali])")


def _picture(height, width, seed=0):
    """Smooth gradients plus a hard-edged rectangle: both kinds of content a chart has."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 3)
    array = np.stack([127 + 120 * np.sin(x / 7.0 + phase), 127 + 120 * np.cos(y / 5.0), (x * 3 + y * 2) % 256], -1)
    image = Image.fromarray(array.astype(np.uint8))
    ImageDraw.Draw(image).rectangle([width // 8, height // 8, width // 3, height // 2], fill=(255, 0, 0))
    return image


def _encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


SIZES = [1, 13, 27, 28, 29, 42, 55, 56, 57, 100, 150, 333, 1000, 2001]


@pytest.mark.parametrize("factor,min_pixels,max_pixels", [
    (28, 56 * 56, 28 * 28 * 1280), (28, 56 * 56, 56 * 56), (32, 32 * 32 * 4, 32 * 32 * 256), (28, 100, 28 * 28 * 16),
])
def test_smart_resize_matches_transformers(factor, min_pixels, max_pixels):
    for height, width in itertools.product(SIZES, SIZES):
        if max(height, width) / min(height, width) > 200:
            with pytest.raises(ValueError, match="aspect"):
                smart_resize(height, width, factor, min_pixels, max_pixels)
            continue
        ours = smart_resize(height, width, factor, min_pixels, max_pixels)
        assert ours == hf_smart_resize(height, width, factor, min_pixels, max_pixels), (height, width)
        assert ours[0] % factor == 0 and ours[1] % factor == 0


def test_pil_pipeline_makes_the_processor_resize_an_identity():
    """Pre-resized images give the Qwen2-VL PIL processor exactly the pixel values it makes from the original."""
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64, patch_size=14, merge_size=2)
    pipeline = PilImagePipeline(factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    originals = [_picture(100, 150), _picture(300, 500, 1), _picture(20, 90, 2), _picture(56, 56, 3)]
    ours = pipeline([_encode(image, "PNG") for image in originals])
    reference = processor(images=originals, return_tensors="pt")
    mine = processor(images=[Image.fromarray(a) for a in ours], return_tensors="pt")
    assert torch.equal(mine["image_grid_thw"], reference["image_grid_thw"])
    assert torch.equal(mine["pixel_values"], reference["pixel_values"])


def test_decode_applies_exif_orientation_and_converts_to_rgb():
    image = _picture(40, 70)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90 degrees clockwise
    decoded = decode_image(_encode(image, "PNG", exif=exif.tobytes()))
    assert decoded.size == (40, 70)
    assert np.array_equal(np.asarray(decoded), np.asarray(image.transpose(Image.ROTATE_270)))
    grey = decode_image(_encode(image.convert("L"), "PNG"))
    assert grey.mode == "RGB" and np.array_equal(np.asarray(grey)[..., 0], np.asarray(image.convert("L")))
    rgba = image.convert("RGBA")
    rgba.putalpha(128)
    assert np.array_equal(np.asarray(decode_image(rgba)), np.asarray(image))
    palette = decode_image(_encode(image.convert("P"), "PNG"))
    assert palette.mode == "RGB" and palette.size == image.size


def test_pil_pipeline_identity_at_target_size_and_shapes():
    image = _picture(56, 56)
    (out,) = PilImagePipeline(28, 56 * 56, 56 * 56)([image])
    assert np.array_equal(out, np.asarray(image))
    outs = PilImagePipeline(28, 56 * 56, 56 * 56)([_picture(200, 120), _picture(10, 10)])
    for array in outs:
        assert array.dtype == np.uint8 and array.shape[2] == 3 and array.shape[0] * array.shape[1] <= 56 * 56


def test_backend_dispatch_and_errors(monkeypatch):
    pipeline = image_pipeline_from_config(DataConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 16))
    assert isinstance(pipeline, PilImagePipeline) and pipeline.factor == 28 and pipeline.max_pixels == 28 * 28 * 16
    with pytest.raises(ValueError, match="unknown image backend"):
        build_image_pipeline("opencv")
    # DALI missing: the error names the extra to install.
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.delitem(sys.modules, "care_megatron.data.dali_images", raising=False)
    with pytest.raises(ImportError, match=r"care_megatron\[dali\]"):
        build_image_pipeline("dali")
    monkeypatch.delitem(sys.modules, "care_megatron.data.dali_images", raising=False)


def test_only_dali_module_imports_dali():
    import pathlib

    root = pathlib.Path(importlib.import_module("care_megatron").__file__).parent
    importers = [p.relative_to(root).as_posix() for p in root.rglob("*.py") if "nvidia.dali" in p.read_text()
                 and "import nvidia.dali" in p.read_text()]
    assert importers == ["data/dali_images.py"]


def _compare(pil_out, dali_out):
    diffs = []
    for a, b in zip(pil_out, dali_out):
        assert a.shape == b.shape
        diffs.append(np.abs(a.astype(int) - b.astype(int)))
    return diffs


@needs_dali
def test_dali_cpu_decode_matches_pil_without_resize():
    from care_megatron.data.dali_images import DaliImagePipeline

    images = [_picture(56, 56, s) for s in range(3)] + [_picture(56, 112, 4)]
    pil = PilImagePipeline(28, 56 * 56, 56 * 112)
    dali = DaliImagePipeline(28, 56 * 56, 56 * 112, device="cpu", max_batch_size=2, num_threads=1)
    png = [_encode(i, "PNG") for i in images]
    for diff in _compare(pil(png), dali(png)):
        assert diff.max() == 0
    jpeg = [_encode(i, "JPEG", quality=92) for i in images]
    for diff in _compare(pil(jpeg), dali(jpeg)):
        assert diff.max() <= 4


@needs_dali
def test_dali_cpu_resize_matches_pil_within_tolerance():
    from care_megatron.data.dali_images import DaliImagePipeline

    images = [_picture(100, 150), _picture(300, 500, 1), _picture(20, 90, 2), _picture(131, 77, 3)]
    exif = Image.Exif()
    exif[0x0112] = 6
    refs = [_encode(i, "PNG") for i in images] + [_encode(i, "JPEG", quality=95) for i in images]
    refs.append(_encode(_picture(60, 100, 5), "JPEG", quality=95, exif=exif.tobytes()))
    pil = PilImagePipeline(28, 56 * 56, 28 * 28 * 64)
    dali = build_image_pipeline("dali", 28, 56 * 56, 28 * 28 * 64, device="cpu", max_batch_size=3, num_threads=1)
    outputs = dali(refs)
    assert outputs[-1].shape[:2] == smart_resize(100, 60, 28, 56 * 56, 28 * 28 * 64)  # EXIF rotation applied
    for diff in _compare(pil(refs), outputs):
        assert diff.mean() <= 1.0 and diff.max() <= 32


@pytest.mark.gpu
@needs_dali
def test_dali_gpu_matches_pil_within_tolerance():
    from care_megatron.data.dali_images import DaliImagePipeline

    images = [_picture(100, 150), _picture(300, 500, 1), _picture(56, 56, 2)]
    refs = [_encode(i, "PNG") for i in images] + [_encode(i, "JPEG", quality=95) for i in images]
    pil = PilImagePipeline(28, 56 * 56, 28 * 28 * 64)
    dali = DaliImagePipeline(28, 56 * 56, 28 * 28 * 64, device="gpu", device_id=0, max_batch_size=4)
    for diff in _compare(pil(refs), dali(refs)):
        assert diff.mean() <= 1.5 and diff.max() <= 40


# ------------------------------------------------------------------ data.image_backend wiring


def test_pil_backend_leaves_decoding_to_the_processor():
    from care_megatron.data.images import run_image_pipeline
    from care_megatron.data.prompting import build_image_processor

    assert run_image_pipeline(DataConfig(image_backend="pil"), build_image_processor("qwen2_5_vl")) is None


@needs_dali
def test_dali_backend_decodes_on_the_local_rank_device(monkeypatch):
    """With CUDA visible, the config's rule and LOCAL_RANK (not device 0) reach DALI's pipeline graph."""
    import care_megatron.data.dali_images as dali_images
    from care_megatron.data.images import run_image_pipeline
    from care_megatron.data.prompting import build_image_processor

    built = {}
    monkeypatch.setattr(dali_images, "_build_graph", lambda device, batch, threads, device_id: built.update(
        device=device, device_id=device_id))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "5")
    config = DataConfig(image_backend="dali", min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)
    pipeline = run_image_pipeline(config, build_image_processor("qwen3_vl", config.min_pixels, config.max_pixels))
    assert isinstance(pipeline, dali_images.DaliImagePipeline)
    assert built == {"device": "gpu", "device_id": 5}
    assert (pipeline.factor, pipeline.min_pixels, pipeline.max_pixels) == (32, 32 * 32 * 4, 32 * 32 * 64)


@needs_dali
def test_dali_backend_prompt_matches_the_pil_prompt(monkeypatch):
    """build_prompt through DALI's CPU operators: same image grid and token ids as the PIL path,
    pixel values within the decoders' tolerance; a corrupt file is an OSError (a skippable record)."""
    from care_megatron.data.images import run_image_pipeline
    from care_megatron.data.prompting import build_image_processor, build_prompt
    from care_megatron.models.tokenizer import load_tokenizer

    monkeypatch.setenv("LOCAL_RANK", "2")
    config = DataConfig(image_backend="dali", min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    processor = build_image_processor("qwen2_5_vl", config.min_pixels, config.max_pixels)
    pipeline = run_image_pipeline(config, processor)
    assert (pipeline.device, pipeline.device_id, pipeline.factor) == ("cpu", 2, 28)
    tokenizer = load_tokenizer("tiny")
    images = [_encode(_picture(100, 150), "PNG"), _encode(_picture(131, 77, 3), "PNG")]
    reference = build_prompt("How many?", images, tokenizer, processor)
    through_dali = build_prompt("How many?", images, tokenizer, processor, image_pipeline=pipeline)
    assert torch.equal(through_dali.image_grid_thw, reference.image_grid_thw)
    assert through_dali.prompt_ids == reference.prompt_ids
    # normalised pixels: 1 / (255 * std) ~ 0.015 per level; the resize kernels differ by a few levels
    assert (through_dali.pixel_values - reference.pixel_values).abs().mean() < 0.05
    with pytest.raises(OSError):
        build_prompt("How many?", [images[0][:200]], tokenizer, processor, image_pipeline=pipeline)


@needs_dali
def test_trainer_builds_prompts_through_the_configured_dali_pipeline(monkeypatch, tmp_path):
    """data.image_backend=dali reaches the RL loop: the trainer's prompts (and so its rollouts) are
    decoded by DALI on device LOCAL_RANK, and match what the PIL backend builds."""
    from care_megatron.config import load_config
    from care_megatron.data.dali_images import DaliImagePipeline
    from care_megatron.trainer import RLTrainer

    monkeypatch.setenv("LOCAL_RANK", "1")
    overrides = ["data.tasks=[count_shapes]", "data.train_size=4", "data.eval_size=0", "data.prompts_per_step=2",
                 "data.image_size=60", "data.max_pixels=6272", f"train.output_dir={tmp_path}", "train.init_from=null"]
    trainer = RLTrainer(load_config(None, overrides + ["data.image_backend=dali"]), progress=False)
    assert isinstance(trainer.image_pipeline, DaliImagePipeline) and trainer.image_pipeline.device_id == 1
    calls = []
    decode = trainer.image_pipeline.__call__
    monkeypatch.setattr(DaliImagePipeline, "__call__", lambda self, refs: calls.append(len(refs)) or decode(refs))
    records, prompts = trainer.build_prompts(trainer.data.train[:2])
    assert calls == [len(r.images) for r in records] and sum(calls) > 0
    pil_trainer = RLTrainer(load_config(None, overrides), progress=False)
    assert pil_trainer.image_pipeline is None
    _, pil_prompts = pil_trainer.build_prompts(trainer.data.train[:2])
    for ours, reference in zip(prompts, pil_prompts):
        assert torch.equal(ours.image_grid_thw, reference.image_grid_thw) and ours.prompt_ids == reference.prompt_ids

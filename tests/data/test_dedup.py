"""Deduplication: normalised question + perceptual image hash, first occurrence kept."""
import io

import pytest
from PIL import Image

from care_megatron.data.dedup import deduplicate, image_hash, normalize_question
from care_megatron.data.schema import Record
from _data_fixtures import chart_image, png_bytes


def _jpeg_resized(image, size=(120, 90), quality=80):
    buffer = io.BytesIO()
    image.resize(size, Image.BICUBIC).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_normalize_question():
    assert normalize_question("What is  the VALUE of <image> x?") == "what is the value of x"
    assert normalize_question("What is the value of x") == normalize_question("what is the value of x ?!")
    assert normalize_question("Ｗhat is 3.5") == "what is 3 5"  # NFKC folds the full-width letter
    assert normalize_question("find x") != normalize_question("find y")


def test_perceptual_hash_survives_reencoding_but_separates_images():
    image = chart_image(7)
    assert image_hash(png_bytes(image)) == image_hash(image)
    assert image_hash(_jpeg_resized(image)) - image_hash(image) <= 4
    assert image_hash(chart_image(8)) - image_hash(image) > 10


def test_deduplicate_across_sources():
    a, b = chart_image(1), chart_image(2)
    records = [
        Record("chartqa/0", "chartqa", [png_bytes(a)], "What is the max value?", "12"),
        Record("chartqa/1", "chartqa", [png_bytes(b)], "What is the max value?", "9"),  # other image: kept
        Record("chartqa/2", "chartqa", [png_bytes(a)], "What is the min value?", "3"),  # other question: kept
        Record("virl39k/0", "virl39k", [png_bytes(a)], "what is the MAX value", "12"),  # exact twin of chartqa/0
        Record("virl39k/1", "virl39k", [_jpeg_resized(b)], "What is the max value?", "10"),  # recompressed twin, other answer
        Record("virl39k/2", "virl39k", [png_bytes(a), png_bytes(b)], "What is the max value?", "12"),  # two images: kept
    ]
    recompressed_distance = image_hash(_jpeg_resized(b)) - image_hash(b)
    assert 0 < recompressed_distance <= 6  # not byte-identical after JPEG + resize, but close
    kept, report = deduplicate(records, max_hamming=0)
    assert [r.id for r in kept] == ["chartqa/0", "chartqa/1", "chartqa/2", "virl39k/1", "virl39k/2"]
    kept, report = deduplicate(records, max_hamming=6)
    assert [r.id for r in kept] == ["chartqa/0", "chartqa/1", "chartqa/2", "virl39k/2"]
    assert report.total == 6 and report.kept == 4 and report.removed == 2
    assert dict(report.removed_by_source) == {"virl39k": 2}
    assert report.cross_source == 2 and report.conflicting_answers == 1
    assert report.pairs == [("virl39k/0", "chartqa/0"), ("virl39k/1", "chartqa/1")]


def test_deduplicate_within_source_and_unhashable():
    image = chart_image(3)
    records = [Record("s/0", "s", [image], "Q?", "1"), Record("s/1", "s", [image], "Q ?", "1"),
               Record("s/2", "s", [b"not an image"], "Q?", "1"), Record("s/3", "s", [], "Text only", "1"),
               Record("s/4", "s", [], "text only!", "1")]
    kept, report = deduplicate(records)
    assert [r.id for r in kept] == ["s/0", "s/3"]
    assert report.cross_source == 0 and report.unhashable == 1 and report.removed == 2
    with pytest.raises(ValueError, match="max_hamming"):
        deduplicate(records, max_hamming=64)

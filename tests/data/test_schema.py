"""Record schema: construction checks, JSONL round trip, skip-and-count validation."""
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from care_megatron.data.schema import Record, infer_answer_type, read_jsonl, write_jsonl
from _data_fixtures import chart_image, corrupt_png


def _jpeg_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_record_rejects_bad_fields_naming_them():
    with pytest.raises(ValueError, match="answer_type"):
        Record("a", "s", [], "q", "1", answer_type="number")
    with pytest.raises(ValueError, match="images"):
        Record("a", "s", "x.png", "q", "1")
    with pytest.raises(ValueError, match="answer"):
        Record("a", "s", [], "q", 1)
    with pytest.raises(ValueError, match="choices"):
        Record("a", "s", [], "q", "A", choices="AB")


@pytest.mark.parametrize("answer,choices,expected", [
    ("12", None, "integer"), ("-3", None, "integer"), ("1,234", None, "integer"), ("3.5", None, "float"),
    ("40%", None, "float"), ("\\frac{1}{2}", None, "latex"), ("x^2", None, "latex"), ("yes", None, "text"),
    ("B", ["1", "2"], "multiple_choice"),
])
def test_infer_answer_type(answer, choices, expected):
    assert infer_answer_type(answer, choices) == expected


def test_jsonl_round_trip_is_exact_and_relocatable(tmp_path):
    path_image = tmp_path / "src.png"
    chart_image(1).save(path_image)
    jpeg = _jpeg_bytes(chart_image(2))
    pil_image = chart_image(3)
    records = [
        Record("r0", "test", [str(path_image), jpeg], "Q0?", "7", "integer", metadata={"k": [1, 2]}),
        Record("r1", "test", [pil_image], "Q1?", "B", "multiple_choice", choices=["x", "y"], rationale="y: 2"),
        Record("r2", "test", [], "Text only?", "yes", None),
    ]
    out = tmp_path / "set" / "data.jsonl"
    assert write_jsonl(records, out) == 3
    # Stored image paths are relative, so the folder can move.
    stored = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(not p.startswith("/") for row in stored for p in row["images"])
    moved = tmp_path / "moved"
    shutil.copytree(out.parent, moved)
    shutil.rmtree(out.parent)
    loaded, report = read_jsonl(moved / "data.jsonl")
    assert report.loaded == 3 and report.num_skipped == 0
    for original, back in zip(records, loaded):
        for name in ("id", "source", "question", "answer", "answer_type", "choices", "metadata", "rationale"):
            assert getattr(back, name) == getattr(original, name)
        assert len(back.images) == len(original.images)
    # Encoded inputs are stored byte for byte; a PIL image is stored losslessly.
    assert open(loaded[0].images[0], "rb").read() == path_image.read_bytes()
    assert open(loaded[0].images[1], "rb").read() == jpeg
    assert np.array_equal(np.asarray(Image.open(loaded[1].images[0]).convert("RGB")), np.asarray(pil_image))


def test_read_jsonl_counts_and_skips_bad_records(tmp_path):
    (tmp_path / "images").mkdir()
    chart_image(0).save(tmp_path / "images" / "good.png")
    corrupt_png(tmp_path / "images" / "bad.png")
    good = {"id": "g", "source": "s", "images": ["images/good.png"], "question": "Q?", "answer": "1", "answer_type": "integer"}
    lines = [
        json.dumps(good),
        json.dumps({**good, "id": "no_answer_field", "answer": None}),
        json.dumps({k: v for k, v in good.items() if k != "question"} | {"id": "no_question"}),
        json.dumps({**good, "id": "empty", "answer": "  "}),
        json.dumps({**good, "id": "corrupt", "images": ["images/bad.png"]}),
        json.dumps({**good, "id": "missing_file", "images": ["images/nope.png"]}),
        json.dumps({**good, "id": "mc", "answer": "C", "answer_type": "multiple_choice", "choices": ["a", "b"]}),
        json.dumps({**good, "id": "bad_type", "answer_type": "number"}),
        "{not json",
        json.dumps({**good, "id": "g2", "images": [str(tmp_path / "images" / "good.png")]}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n\n")
    records, report = read_jsonl(tmp_path / "d.jsonl")
    assert [r.id for r in records] == ["g", "g2"]
    assert report.loaded == 2
    assert dict(report.skipped) == {"missing_field": 2, "empty_answer": 1, "unreadable_image": 2, "bad_choices": 1,
                                    "bad_field": 1, "invalid_json": 1}
    assert "loaded 2, skipped 8" in report.summary()
    # Without image checks the corrupt / missing images pass (checked later, at decode time).
    records, report = read_jsonl(tmp_path / "d.jsonl", check_images=False)
    assert report.loaded == 4


"""Write small synthetic stand-ins of the paper's six benchmarks, each in its real release layout and schema.

    python tools/make_benchmark_fixtures.py --out /tmp/bench_fixtures --per-benchmark 20
    care-eval --config examples/configs/tiny_cpu.yaml --checkpoint runs/tiny_cpu/final \\
        --benchmarks mathvista=/tmp/bench_fixtures/MathVista,mathverse=/tmp/bench_fixtures/MathVerse,...

The questions and images are the embedded default's synthetic visual tasks (count shapes, tallest bar,
triangle angle, compare lengths) on a data stream the training run never draws, poured into each
benchmark's columns: MathVista ``data/testmini-*.parquet`` (multi_choice rows keyed by option text,
float rows with a precision), MathVerse ``testmini.parquet`` (choices inline, 'Vision Only' rows),
MATH-Vision ``data/test-*.parquet`` (``<image1>`` tags), MMMU ``<Subject>/validation-*.parquet``
(options as a list literal string, ``<image N>`` placeholders, two-image rows), MMMU-Pro
``standard (10 options)/`` and ``vision/`` (the question and options drawn into the image). Each folder
also holds a split the paper does not evaluate (MathVista test, MathVerse text-only, MATH-Vision
testmini, MMMU dev, MMMU-Pro 4 options) with a row that must never be read. The numbers these give are
a demonstration of the output, not of any benchmark.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from care_megatron.data.schema import CHOICE_LETTERS  # noqa: E402
from care_megatron.data.synthetic import generate_one  # noqa: E402

TASKS = ("count_shapes", "tallest_bar", "triangle_angle", "compare_lengths")
STREAM = 91
"""Synthetic data stream of the fixtures (training and its held-out split use streams 0 and 1)."""
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
DISTRACTORS = ("yellow", "purple", "orange", "black", "white", "pink", "brown", "grey", "cyan", "teal")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _cell(image: Image.Image, name: str) -> dict:
    return {"bytes": _png(image), "path": name}


def _samples(n: int, offset: int = 0):
    """``n`` synthetic records cycling through the tasks: (record, question without inline options)."""
    for i in range(n):
        record = generate_one(TASKS[(i + offset) % len(TASKS)], i + offset, seed=0, difficulty=1, stream=STREAM)
        question = record.question.split(" Options:")[0]
        yield record, question


def _write(path: Path, rows: list[dict], schema: dict[str, pa.DataType]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {name: pa.array([row.get(name) for row in rows], type=kind) for name, kind in schema.items()}
    pq.write_table(pa.table(columns), path)


MATHVISTA_SCHEMA = {
    "pid": pa.string(), "question": pa.string(), "image": pa.string(), "decoded_image": IMAGE,
    "choices": pa.list_(pa.string()), "unit": pa.string(), "precision": pa.float64(), "answer": pa.string(),
    "question_type": pa.string(), "answer_type": pa.string(),
    "metadata": pa.struct([("category", pa.string()), ("task", pa.string()), ("source", pa.string())]),
    "query": pa.string(),
}


def mathvista(out: Path, n: int) -> None:
    rows = []
    for i, (record, question) in enumerate(_samples(n)):
        pid = str(i + 1)
        row = {"pid": pid, "question": question, "image": f"images/{pid}.png", "decoded_image": _cell(record.images[0], f"images/{pid}.png"),
               "unit": None, "metadata": {"category": "math-targeted-vqa", "task": record.source, "source": "synthetic"}}
        if record.choices:
            row.update(choices=record.choices, precision=None, answer=record.choices[CHOICE_LETTERS.index(record.answer)],
                       question_type="multi_choice", answer_type="text",
                       query="Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
                             f"at the end.\nQuestion: {question}")
        elif i % 3 == 0:
            row.update(choices=None, precision=1.0, answer=f"{float(record.answer):.1f}", question_type="free_form",
                       answer_type="float",
                       query="Hint: Please answer the question requiring a floating-point number with one decimal place "
                             f"and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: {question}")
        else:
            row.update(choices=None, precision=None, answer=record.answer, question_type="free_form", answer_type="integer",
                       query="Hint: Please answer the question requiring an integer answer and provide the final value, "
                             f"e.g., 1, 2, 3, at the end.\nQuestion: {question}")
        rows.append(row)
    _write(out / "data" / "testmini-00000-of-00001.parquet", rows, MATHVISTA_SCHEMA)
    _write(out / "data" / "test-00000-of-00001.parquet", [dict(rows[0], pid="test-only")], MATHVISTA_SCHEMA)


MATHVERSE_SCHEMA = {
    "sample_index": pa.string(), "problem_index": pa.string(), "problem_version": pa.string(), "question": pa.string(),
    "image": IMAGE, "answer": pa.string(), "question_type": pa.string(),
    "metadata": pa.struct([("split", pa.string()), ("source", pa.string()), ("subject", pa.string()),
                           ("subfield", pa.string())]),
    "query_wo": pa.string(), "query_cot": pa.string(), "question_for_eval": pa.string(),
}


def mathverse(out: Path, n: int) -> None:
    rows = []
    for i, (record, question) in enumerate(_samples(n, offset=1000)):
        version = "Vision Only" if i % 5 == 4 else "Text Lite"
        if record.choices:
            full = question + "\nChoices:\n" + "\n".join(f"{CHOICE_LETTERS[k]}:{c}" for k, c in enumerate(record.choices))
            kind = "multi-choice"
        else:
            full, kind = question, "free-form"
        rows.append({"sample_index": str(i + 1), "problem_index": str(i // 5 + 1), "problem_version": version,
                     "question": "" if version == "Vision Only" else full, "image": _cell(record.images[0], f"{i + 1}.png"),
                     "answer": record.answer, "question_type": kind,
                     "metadata": {"split": "testmini", "source": "synthetic", "subject": "Plane Geometry", "subfield": record.source},
                     "query_wo": full, "query_cot": full, "question_for_eval": full})
    _write(out / "testmini.parquet", rows, MATHVERSE_SCHEMA)
    _write(out / "testmini_text_only.parquet", [dict(rows[0], sample_index="text-only")], MATHVERSE_SCHEMA)


MATHVISION_SCHEMA = {
    "id": pa.string(), "question": pa.string(), "options": pa.list_(pa.string()), "image": pa.string(),
    "decoded_image": IMAGE, "answer": pa.string(), "solution": pa.string(), "level": pa.int64(), "subject": pa.string(),
}


def mathvision(out: Path, n: int) -> None:
    rows = []
    for i, (record, question) in enumerate(_samples(n, offset=2000)):
        rows.append({"id": str(i + 1), "question": f"<image1>\n{question}", "options": record.choices or [],
                     "image": f"images/{i + 1}.jpg", "decoded_image": _cell(record.images[0], f"images/{i + 1}.jpg"),
                     "answer": record.answer, "solution": record.rationale, "level": 1, "subject": "counting"})
    _write(out / "data" / "test-00000-of-00001.parquet", rows, MATHVISION_SCHEMA)
    _write(out / "data" / "testmini-00000-of-00001.parquet", [dict(rows[0], id="testmini-only")], MATHVISION_SCHEMA)


MMMU_COLUMNS = {"id": pa.string(), "question": pa.string(), "options": pa.string(), "explanation": pa.string(),
                **{f"image_{k}": IMAGE for k in range(1, 8)}, "img_type": pa.string(), "answer": pa.string(),
                "topic_difficulty": pa.string()}
MMMU_SCHEMA = {**MMMU_COLUMNS, "question_type": pa.string(), "subfield": pa.string()}
MMMU_PRO_SCHEMA = {**MMMU_COLUMNS, "subject": pa.string()}


def _mmmu_row(i: int, record, question: str, split: str, options_count: int | None) -> dict:
    row = {"id": f"{split}_Math_{i + 1}", "explanation": "", "img_type": "['Diagrams']", "topic_difficulty": "Easy"}
    if record.choices:
        options = list(record.choices)
        if options_count:
            options += [d for d in DISTRACTORS if d not in options][: options_count - len(options)]
        row.update(options=repr(options), answer=record.answer, question_type="multiple-choice")
    else:
        row.update(options="[]", answer=record.answer, question_type="open")
    row["image_1"] = _cell(record.images[0], "image_1.png")
    if i % 4 == 3:
        # Two-image row: the second picture is referred to first.
        row["image_2"] = _cell(record.images[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT), "image_2.png")
        row["question"] = f"<image 2> is the mirror image of <image 1>. {question}"
    else:
        row["question"] = f"<image 1> {question}"
    return row


def mmmu(out: Path, n: int) -> None:
    rows = [_mmmu_row(i, r, q, "validation", None) for i, (r, q) in enumerate(_samples(n, offset=3000))]
    for row in rows:
        row["subfield"] = "Geometry"
    _write(out / "Math" / "validation-00000-of-00001.parquet", rows, MMMU_SCHEMA)
    _write(out / "Math" / "dev-00000-of-00001.parquet", [dict(rows[0], id="dev_Math_1")], MMMU_SCHEMA)


def _screenshot(image: Image.Image, question: str, options: list[str]) -> Image.Image:
    """The MMMU-Pro vision format: question and options typed into one picture beside the figure."""
    lines = [question] + [f"({CHOICE_LETTERS[k]}) {o}" for k, o in enumerate(options)]
    canvas = Image.new("RGB", (image.width + 260, max(image.height, 14 * len(lines) + 8)), "white")
    canvas.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((image.width + 6, 4 + 14 * k), line[:48], fill="black")
    return canvas


def mmmu_pro(out: Path, n: int) -> None:
    samples = list(_samples(n, offset=4000))
    rows = [_mmmu_row(i, r, q, "test", 10) for i, (r, q) in enumerate(samples) if r.choices]
    for row in rows:
        row["subject"] = "Math"
        row.pop("question_type")
    _write(out / "standard (10 options)" / "test-00000-of-00001.parquet", rows, MMMU_PRO_SCHEMA)
    _write(out / "standard (4 options)" / "test-00000-of-00001.parquet", [dict(rows[0], id="four-options-only")],
           MMMU_PRO_SCHEMA)
    vision = []
    for i, (record, question) in enumerate(samples):
        if not record.choices:
            continue
        options = list(record.choices) + [d for d in DISTRACTORS if d not in record.choices][: 10 - len(record.choices)]
        vision.append({"id": f"test_Math_{i + 1}", "image": _cell(_screenshot(record.images[0], question, options), "v.png"),
                       "options": repr(options), "answer": record.answer, "subject": "Math"})
    _write(out / "vision" / "test-00000-of-00001.parquet", vision,
           {"id": pa.string(), "image": IMAGE, "options": pa.string(), "answer": pa.string(), "subject": pa.string()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to create the six dataset folders in")
    parser.add_argument("--per-benchmark", type=int, default=20, help="rows per benchmark (MMMU-Pro keeps the multiple-choice ones)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    mathvista(out / "MathVista", args.per_benchmark)
    mathverse(out / "MathVerse", args.per_benchmark)
    mathvision(out / "MATH-Vision", args.per_benchmark)
    mmmu(out / "MMMU", args.per_benchmark)
    mmmu_pro(out / "MMMU_Pro", 2 * args.per_benchmark)
    paths = {"mathvista": "MathVista", "mathverse": "MathVerse", "mathvision": "MATH-Vision", "mmmu": "MMMU",
             "mmmu_pro_standard": "MMMU_Pro", "mmmu_pro_vision": "MMMU_Pro"}
    print(",".join(f"{name}={out / folder}" for name, folder in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

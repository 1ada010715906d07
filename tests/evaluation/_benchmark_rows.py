"""Parquet writers for the benchmark tests: rows in each release's schema, images as the ``datasets``
Image feature stores them (a ``{bytes, path}`` struct). A uniquely named module, importable by name."""
from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(color: tuple[int, int, int], size: int = 56) -> bytes:
    """A solid ``size`` x ``size`` PNG; distinct colours make distinct images to track order by."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def cell(data: bytes | None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


def write(path: Path, rows: list[dict], schema: dict[str, pa.DataType]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array([r.get(k) for r in rows], type=t) for k, t in schema.items()}), path)
    return path


MATHVISTA = {"pid": pa.string(), "question": pa.string(), "image": pa.string(), "decoded_image": IMAGE,
             "choices": pa.list_(pa.string()), "unit": pa.string(), "precision": pa.float64(), "answer": pa.string(),
             "question_type": pa.string(), "answer_type": pa.string(),
             "metadata": pa.struct([("category", pa.string()), ("source", pa.string())]), "query": pa.string()}
MATHVERSE = {"sample_index": pa.string(), "problem_index": pa.string(), "problem_version": pa.string(),
             "question": pa.string(), "image": IMAGE, "answer": pa.string(), "question_type": pa.string(),
             "metadata": pa.struct([("split", pa.string()), ("source", pa.string()), ("subject", pa.string()),
                                    ("subfield", pa.string())]),
             "query_wo": pa.string(), "query_cot": pa.string(), "question_for_eval": pa.string()}
MATHVISION = {"id": pa.string(), "question": pa.string(), "options": pa.list_(pa.string()), "image": pa.string(),
              "decoded_image": IMAGE, "answer": pa.string(), "solution": pa.string(), "level": pa.int64(),
              "subject": pa.string()}
_MMMU_COMMON = {"id": pa.string(), "question": pa.string(), "options": pa.string(), "explanation": pa.string(),
                **{f"image_{k}": IMAGE for k in range(1, 8)}, "img_type": pa.string(), "answer": pa.string(),
                "topic_difficulty": pa.string()}
MMMU = {**_MMMU_COMMON, "question_type": pa.string(), "subfield": pa.string()}
MMMU_PRO_STANDARD = {**_MMMU_COMMON, "subject": pa.string()}
MMMU_PRO_VISION = {"id": pa.string(), "image": IMAGE, "options": pa.string(), "answer": pa.string(),
                   "subject": pa.string()}


def two_benchmarks(root: Path, n_vista: int, n_vision: int, corrupt_row: bool = False) -> dict[str, str]:
    """MathVista (free-form integers, pid i answers i, image colour by i) and MMMU-Pro vision (ten options,
    answer J) folders under ``root`` in their release layouts; ``corrupt_row`` adds a MathVista row whose
    image does not decode. Returns the ``--benchmarks`` mapping."""
    vista = root / "MathVista"
    rows = [dict(pid=str(i), question=f"How many? {i}", image="x.png", decoded_image=cell(png((i * 30, 0, 0))),
                 choices=None, unit=None, precision=None, answer=str(i), question_type="free_form",
                 answer_type="integer", metadata={"category": "c", "source": "s"}, query="") for i in range(n_vista)]
    if corrupt_row:
        rows.append(dict(rows[0], pid="bad", decoded_image=cell(b"corrupt")))
    write(vista / "data" / "testmini-00000-of-00001.parquet", rows, MATHVISTA)
    pro = root / "MMMU_Pro"
    ten = str([f"option {k}" for k in range(10)])
    write(pro / "vision" / "test-00000-of-00001.parquet",
          [dict(id=f"v{i}", image=cell(png((0, 0, 40 * i), size=84)), options=ten, answer="J", subject="Art")
           for i in range(n_vision)], MMMU_PRO_VISION)
    return {"mathvista": str(vista), "mmmu_pro_vision": str(pro)}

"""Builders of tiny copies of the public releases' file layouts, for the loader and prepare_data tests."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def chart_image(seed: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    """A small distinct picture per seed (random bars), so perceptual hashes differ between seeds."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for index in range(4):
        height = int(rng.integers(5, size[1] - 5))
        color = tuple(int(c) for c in rng.integers(0, 200, size=3))
        draw.rectangle([5 + index * 18, size[1] - height, 18 + index * 18, size[1] - 1], fill=color)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def corrupt_png(path: Path) -> None:
    """A file with a PNG signature and a truncated body: opens lazily, fails to decode."""
    data = png_bytes(chart_image(99))
    path.write_bytes(data[: len(data) // 3])


def make_chartqa(root: Path, first_seed: int = 0) -> Path:
    """``<root>/train/{train_human,train_augmented}.json`` + ``png/``: 3 good human, 2 good augmented,
    1 missing label, 1 missing image file."""
    split = root / "train"
    (split / "png").mkdir(parents=True)
    human, augmented = [], []
    for index in range(3):
        name = f"h{index}.png"
        chart_image(first_seed + index).save(split / "png" / name)
        human.append({"imgname": name, "query": f"What is the value of bar {index}?", "label": ["12", "3.5", "Yes"][index]})
    human.append({"imgname": "h0.png", "query": "No label here"})  # missing label
    for index in range(2):
        name = f"a{index}.png"
        chart_image(first_seed + 10 + index).save(split / "png" / name)
        augmented.append({"imgname": name, "query": f"Which year is highest {index}?", "label": "2015"})
    augmented.append({"imgname": "absent.png", "query": "Missing image?", "label": "1"})
    (split / "train_human.json").write_text(json.dumps(human))
    (split / "train_augmented.json").write_text(json.dumps(augmented))
    return root


def make_geometry3k(root: Path, first_seed: int = 100) -> Path:
    """``<root>/train/<id>/data.json`` + ``img_diagram.png``: 2 good problems, 1 corrupt diagram, 1 without data.json."""
    split = root / "train"
    for problem_id in (0, 1, 2, 3):
        folder = split / str(problem_id)
        folder.mkdir(parents=True)
        if problem_id == 3:
            chart_image(first_seed + problem_id).save(folder / "img_diagram.png")
            continue  # no data.json
        data = {"id": problem_id, "problem_text": f"Find x in triangle {problem_id}.",
                "choices": ["3", "7", "9.5", "12"], "answer": "BCA"[problem_id], "problem_type_graph": ["Triangle"],
                "problem_type_goal": ["Length"]}
        (folder / "data.json").write_text(json.dumps(data))
        if problem_id == 2:
            corrupt_png(folder / "img_diagram.png")
        else:
            chart_image(first_seed + problem_id).save(folder / "img_diagram.png")
    return root


def make_virl39k(path: Path, first_seed: int = 200) -> Path:
    """A ViRL39K-layout parquet: embedded image structs, one path image, one multiple choice, one empty answer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "images").mkdir(exist_ok=True)
    chart_image(first_seed + 9).save(path.parent / "images" / "on_disk.png")
    struct = lambda seed: [{"bytes": png_bytes(chart_image(seed)), "path": f"img_{seed}.png"}]  # noqa: E731
    rows = [
        {"qid": "q0", "question": "<image>What is the area?", "answer": "\\boxed{17}", "image": struct(first_seed),
         "category": "geometry", "source": "MMK12", "PassRate_32BTrained": 0.5, "PassRate_7BBase": 0.25},
        {"qid": "q1", "question": "<image>Which is correct?\nA. 3\nB. \\frac{1}{2}\nC. 9", "answer": "\\boxed{B}",
         "image": struct(first_seed + 1), "category": "math", "source": "MM-Math", "PassRate_32BTrained": 1.0,
         "PassRate_7BBase": 0.0},
        {"qid": "q2", "question": "<image>Simplify.", "answer": "\\boxed{\\frac{\\sqrt{3}}{2}}",
         "image": [{"bytes": None, "path": "images/on_disk.png"}], "category": "math", "source": "R1-OneVision",
         "PassRate_32BTrained": 0.75, "PassRate_7BBase": 0.5},
        {"qid": "q3", "question": "<image>Empty answer?", "answer": "", "image": struct(first_seed + 3),
         "category": "math", "source": "x", "PassRate_32BTrained": 0.0, "PassRate_7BBase": 0.0},
    ]
    image_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    schema = pa.schema([("qid", pa.string()), ("question", pa.string()), ("answer", pa.string()),
                        ("image", image_type), ("category", pa.string()), ("source", pa.string()),
                        ("PassRate_32BTrained", pa.float64()), ("PassRate_7BBase", pa.float64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path

"""Synthetic verifiable visual tasks for the embedded CPU default and the tests.

Each task renders a small picture with PIL and asks a question whose answer follows from the
picture (and, for the triangle, the numbers in the question), so the verifier can score any
response exactly. Generation is seeded per record, so any number of records can be made and the
same ``(task, seed, stream, index, difficulty, image_size)`` always gives the same image and text.

Tasks (registry :data:`TASKS`), each at difficulty 1..3:

* ``count_shapes``: how many shapes of one colour and kind; ``integer``. Harder levels add
  distractors (same colour other kind, same kind other colour) and larger counts, including 0.
* ``tallest_bar``: a bar chart of coloured bars; which colour is tallest (``multiple_choice``) or
  the tallest bar's value read off the axis ticks (``integer``). Harder levels add bars and shrink
  the gap between the tallest and the runner-up.
* ``triangle_angle``: a triangle drawn with two given angles; the third angle (``integer``).
  Harder levels move from multiples of 30 to multiples of 10 to any whole degree.
* ``compare_lengths``: a red and a blue segment; which is longer (``multiple_choice``). Harder
  levels rotate the segments and bring their lengths closer.
* ``shape_color``: the colour of one shape, answered with the colour's name (``text``; the question
  lists the four colours in a fixed order, so it carries no hint). Level 1 draws that shape alone;
  levels 2 and 3 add one or two shapes of other kinds and colours, so the colour must be bound to the
  named kind.

Rationales are short and regular (``red squares: 3``, ``180-60-50=70``) so that a ~1-5M-parameter
model with a ~1.5k-token vocabulary can learn them in cold-start SFT. Default images are 56x56,
i.e. 4 merged visual tokens for patch 14 / merge 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from care_megatron.data.schema import CHOICE_LETTERS, Record

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (50, 80, 220),
    "yellow": (225, 195, 25),
}
"""Named colours the tasks draw with; far apart in RGB so a tiny vision tower can tell them apart."""
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (255, 255, 255)
DIFFICULTIES = (1, 2, 3)
MIN_IMAGE_SIZE = 28


@dataclass
class Sample:
    """What one task renderer returns for one record."""

    image: Image.Image
    question: str
    answer: str
    answer_type: str
    rationale: str
    choices: Optional[list[str]] = None
    details: Optional[dict] = None


def format_options(choices: Sequence[str]) -> str:
    """``"Options: A. red, B. blue"``: the option list appended to multiple-choice questions."""
    return "Options: " + ", ".join(f"{letter}. {text}" for letter, text in zip(CHOICE_LETTERS, choices))


def _plural(shape: str) -> str:
    return shape + "s"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _count_shapes(rng: np.random.Generator, difficulty: int, size: int) -> Sample:
    cells_per_side = max(2, size // 14)
    cell = size // cells_per_side
    num_cells = cells_per_side * cells_per_side
    color_names = list(COLORS)
    target_color = color_names[rng.integers(len(color_names))]
    target_shape = SHAPES[rng.integers(len(SHAPES))]
    if difficulty == 1:
        count, num_distractors = int(rng.integers(1, 4)), 0
    elif difficulty == 2:
        count, num_distractors = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    else:
        count, num_distractors = int(rng.integers(0, 7)), int(rng.integers(2, 7))
    count = min(count, num_cells)
    num_distractors = min(num_distractors, num_cells - count)
    objects = [(target_shape, target_color)] * count
    for _ in range(num_distractors):
        if difficulty == 2 and rng.random() < 0.5:  # same kind, other colour
            other = [c for c in color_names if c != target_color]
            objects.append((target_shape, other[rng.integers(len(other))]))
        elif difficulty == 2:  # same colour, other kind
            other_shapes = [s for s in SHAPES if s != target_shape]
            objects.append((other_shapes[rng.integers(len(other_shapes))], target_color))
        else:  # any combination but the target
            while True:
                candidate = (SHAPES[rng.integers(len(SHAPES))], color_names[rng.integers(len(color_names))])
                if candidate != (target_shape, target_color):
                    break
            objects.append(candidate)
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    # One object per grid cell: objects never overlap, so the count is unambiguous.
    cells = rng.permutation(num_cells)[: len(objects)]
    shape_side = max(4, int(cell * 0.7))
    for (shape, color), cell_index in zip(objects, cells):
        row, col = divmod(int(cell_index), cells_per_side)
        slack = cell - shape_side
        x0 = col * cell + int(rng.integers(0, slack + 1))
        y0 = row * cell + int(rng.integers(0, slack + 1))
        _draw_shape(draw, shape, (x0, y0, x0 + shape_side - 1, y0 + shape_side - 1), COLORS[color])
    label = f"{target_color} {_plural(target_shape)}"
    return Sample(image, f"How many {label} are there?", str(count), "integer", f"{label}: {count}",
                  details={"target": [target_shape, target_color], "objects": [list(o) for o in objects]})


def _tallest_bar(rng: np.random.Generator, difficulty: int, size: int) -> Sample:
    num_bars = {1: 2, 2: 3, 3: 4}[difficulty]
    min_gap = {1: 3, 2: 2, 3: 1}[difficulty]
    names = [str(c) for c in rng.permutation(list(COLORS))[:num_bars]]
    # Values 1..9; the tallest is unique and at least min_gap above every other bar.
    top = int(rng.integers(1 + min_gap, 10))
    others = [int(rng.integers(1, top - min_gap + 1)) for _ in range(num_bars - 1)]
    tallest_index = int(rng.integers(num_bars))
    values = others[:tallest_index] + [top] + others[tallest_index:]
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, bottom, top_margin = max(4, size // 8), size - max(3, size // 14), max(2, size // 28)
    unit = (bottom - top_margin) / 10.0
    draw.line([(left - 1, top_margin), (left - 1, bottom)], fill=(0, 0, 0))
    draw.line([(left - 1, bottom), (size - 1, bottom)], fill=(0, 0, 0))
    for tick in range(1, 10):  # axis ticks so the value can be read off the picture
        y = round(bottom - tick * unit)
        draw.line([(left - 3, y), (left - 1, y)], fill=(0, 0, 0))
    slot = (size - left) / num_bars
    bar_width = max(3, int(slot * 0.6))
    for index, (name, value) in enumerate(zip(names, values)):
        x0 = int(left + index * slot + (slot - bar_width) / 2)
        draw.rectangle([x0, round(bottom - value * unit), x0 + bar_width - 1, bottom - 1], fill=COLORS[name])
    tallest = names[tallest_index]
    ask_value = difficulty >= 2 and rng.random() < 0.5
    details = {"labels": names, "values": values}
    if ask_value:
        return Sample(image, "What is the value of the tallest bar?", str(top), "integer",
                      f"tallest: {tallest}, {top}", details=details)
    letter = CHOICE_LETTERS[tallest_index]
    question = f"Which bar is the tallest? {format_options(names)}"
    return Sample(image, question, letter, "multiple_choice", f"tallest: {tallest}", choices=names, details=details)


def _triangle_vertices(angle_a: float, angle_b: float, size: int) -> list[tuple[float, float]]:
    """Vertices A (bottom left), B (bottom right), C (apex) of a triangle with those base angles, fitted into the image."""
    a, b = math.radians(angle_a), math.radians(angle_b)
    # Base AB of length 1: apex from the two base angles (intersection of the two sides).
    cx = math.tan(b) / (math.tan(a) + math.tan(b)) if abs(angle_a - 90) > 1e-9 and abs(angle_b - 90) > 1e-9 else (
        0.0 if abs(angle_a - 90) < 1e-9 else 1.0)
    cy = cx * math.tan(a) if abs(angle_a - 90) > 1e-9 else math.tan(b) * (1 - cx)
    points = [(0.0, 0.0), (1.0, 0.0), (cx, cy)]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    margin = max(3, size // 12)
    scale = (size - 2 * margin) / max(max(xs) - min(xs), max(ys) - min(ys))
    offset_x = margin + ((size - 2 * margin) - (max(xs) - min(xs)) * scale) / 2 - min(xs) * scale
    return [(offset_x + x * scale, size - margin - y * scale) for x, y in points]


def _triangle_angle(rng: np.random.Generator, difficulty: int, size: int) -> Sample:
    step = {1: 30, 2: 10, 3: 1}[difficulty]
    while True:
        angle_a = int(rng.integers(1, 150 // step + 1)) * step
        angle_b = int(rng.integers(1, 150 // step + 1)) * step
        third = 180 - angle_a - angle_b
        if angle_a >= 15 and angle_b >= 15 and third >= 15 and not (angle_a >= 90 and angle_b >= 90):
            break
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    vertices = _triangle_vertices(angle_a, angle_b, size)
    draw.polygon(vertices, outline=(0, 0, 0))
    apex_x, apex_y = vertices[2]
    radius = max(1.5, size / 28)
    draw.ellipse([apex_x - radius, apex_y - radius, apex_x + radius, apex_y + radius], fill=COLORS["red"])
    question = (f"A triangle has angles of {angle_a} and {angle_b} degrees. "
                f"What is the third angle, marked red, in degrees?")
    return Sample(image, question, str(third), "integer", f"180-{angle_a}-{angle_b}={third}",
                  details={"angles": [angle_a, angle_b, third]})


def _compare_lengths(rng: np.random.Generator, difficulty: int, size: int) -> Sample:
    min_ratio = {1: 1.8, 2: 1.4, 3: 1.15}[difficulty]
    margin = max(3, size // 10)
    order = ("red", "blue") if rng.random() < 0.5 else ("blue", "red")  # top/left slot first
    # Level 1 stacks the segments (top / bottom halves), higher levels put them side by side
    # (left / right halves); each must fit inside its half so the two never touch.
    if difficulty == 1:
        centers = [(size / 2, size * 0.3), (size / 2, size * 0.7)]
        box_w, box_h = size - 2 * margin, size * 0.3
    else:
        centers = [(size * 0.28, size / 2), (size * 0.72, size / 2)]
        box_w, box_h = size * 0.4, size - 2 * margin

    def max_length(angle: float) -> float:
        cos, sin = abs(math.cos(angle)), abs(math.sin(angle))
        return min(box_w / cos if cos > 1e-6 else float("inf"), box_h / sin if sin > 1e-6 else float("inf"))

    # At least 3 px (size / 18 on larger images) between the two lengths: below that,
    # rasterisation can make the longer segment look no longer.
    min_difference = max(3.0, size / 18)
    for _ in range(100):
        if difficulty == 1:
            angles = [0.0, 0.0]
        elif difficulty == 2:
            angles = [0.0, math.pi / 2] if rng.random() < 0.5 else [math.pi / 2, 0.0]
        else:
            angles = [float(rng.uniform(0, math.pi)) for _ in range(2)]
        ratio = float(rng.uniform(min_ratio, min_ratio + 0.6))
        longer_slot = int(rng.integers(2))
        relative = [1.0, 1.0]
        relative[1 - longer_slot] = 1.0 / ratio
        # Largest common scale that fits both segments, then a random shrink: keeps the ratio exact.
        scale = min(max_length(angles[i]) / relative[i] for i in range(2)) * float(rng.uniform(0.75, 1.0))
        if scale * (1 - 1 / ratio) >= min_difference:
            break
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    width = max(3, size // 18)
    lengths = {}
    for slot, name in enumerate(order):
        length = scale * relative[slot]
        lengths[name] = length
        dx, dy = math.cos(angles[slot]) * length / 2, math.sin(angles[slot]) * length / 2
        cx, cy = centers[slot]
        # A filled rotated rectangle: PIL's wide lines thin out at some angles, which would make
        # the longer segment look shorter.
        nx, ny = -math.sin(angles[slot]) * width / 2, math.cos(angles[slot]) * width / 2
        draw.polygon([(cx - dx + nx, cy - dy + ny), (cx + dx + nx, cy + dy + ny),
                      (cx + dx - nx, cy + dy - ny), (cx - dx - nx, cy - dy - ny)], fill=COLORS[name])
    winner = order[longer_slot]
    choices = ["red", "blue"] if rng.random() < 0.5 else ["blue", "red"]
    question = f"Which line is longer? {format_options(choices)}"
    return Sample(image, question, CHOICE_LETTERS[choices.index(winner)], "multiple_choice", f"longer: {winner}",
                  choices=choices, details={"lengths": {k: round(v, 2) for k, v in lengths.items()}})


def _shape_color(rng: np.random.Generator, difficulty: int, size: int) -> Sample:
    num_shapes = difficulty  # 1, 2 or 3 shapes, each a different kind and colour
    kinds = [str(k) for k in rng.permutation(list(SHAPES))[:num_shapes]]
    colors = [str(c) for c in rng.permutation(list(COLORS))[:num_shapes]]
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    # Level 1: one shape anywhere, 35-70% of the side; more shapes: one per horizontal strip, so they
    # never overlap and each keeps at least a quarter of the side.
    boxes = []
    for index in range(num_shapes):
        if num_shapes == 1:
            side = int(size * rng.uniform(0.35, 0.7))
            x0, y0 = (int(rng.integers(0, size - side + 1)) for _ in range(2))
        else:
            strip = size // num_shapes
            side = max(4, int(min(strip, size) * rng.uniform(0.6, 0.9)))
            x0 = int(rng.integers(0, size - side + 1))
            y0 = index * strip + int(rng.integers(0, strip - side + 1))
        boxes.append([x0, y0, x0 + side - 1, y0 + side - 1])
        _draw_shape(draw, kinds[index], tuple(boxes[-1]), COLORS[colors[index]])
    target = int(rng.integers(num_shapes))
    return Sample(image, f"What colour is the {kinds[target]}? Answer with one of: red, green, blue, yellow.",
                  colors[target], "text", f"{kinds[target]}: {colors[target]}",
                  details={"objects": [[k, c] for k, c in zip(kinds, colors)], "boxes": boxes, "target": target})


@dataclass(frozen=True)
class SyntheticTask:
    """A registered synthetic task."""

    name: str
    """Registry name, also the records' ``source``."""
    render: Callable[[np.random.Generator, int, int], Sample]
    """``render(rng, difficulty, image_size) -> Sample``; all randomness from ``rng``."""
    task_id: int
    """Fixed integer mixed into the per-record seed so tasks with the same seed draw independent streams."""


TASKS: dict[str, SyntheticTask] = {
    task.name: task for task in (
        SyntheticTask("count_shapes", _count_shapes, 1),
        SyntheticTask("tallest_bar", _tallest_bar, 2),
        SyntheticTask("triangle_angle", _triangle_angle, 3),
        SyntheticTask("compare_lengths", _compare_lengths, 4),
        SyntheticTask("shape_color", _shape_color, 5),
    )
}
"""Synthetic tasks by name."""


def record_rng(task: str, seed: int, stream: int, index: int, difficulty: int) -> np.random.Generator:
    """The generator of one record: independent per (task, seed, stream, index, difficulty)."""
    return np.random.default_rng(np.random.SeedSequence([seed, TASKS[task].task_id, stream, index, difficulty]))


def generate_one(task: str, index: int, seed: int = 0, difficulty: int = 1, image_size: int = 56,
                 stream: int = 0) -> Record:
    """Record ``index`` of ``task``'s ``(seed, stream)`` sequence at ``difficulty``."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; valid: {', '.join(TASKS)}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    sample = TASKS[task].render(record_rng(task, seed, stream, index, difficulty), difficulty, image_size)
    metadata = {"task": task, "difficulty": difficulty, "seed": seed, "stream": stream, "index": index,
                "image_size": image_size, "choices_in_question": sample.choices is not None}
    if sample.details:
        metadata["details"] = sample.details
    return Record(id=f"{task}/s{seed}-{stream}/d{difficulty}/{index}", source=task, images=[sample.image],
                  question=sample.question, answer=sample.answer, answer_type=sample.answer_type,
                  choices=sample.choices, metadata=metadata, rationale=sample.rationale)


def generate(task: str, n: int, seed: int = 0, difficulty: Union[int, Sequence[int]] = 1, image_size: int = 56,
             stream: int = 0, start: int = 0) -> list[Record]:
    """``n`` records of ``task`` (indices ``start .. start + n - 1``).

    ``difficulty`` is one level or a list cycled over the records (record ``i`` gets
    ``levels[i % len(levels)]``). ``stream`` separates independent sequences under one seed (the
    dataset uses 0 for training and 1 for held-out records).
    """
    levels = [difficulty] if isinstance(difficulty, int) else list(difficulty)
    if not levels:
        raise ValueError("difficulty: give at least one level")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [generate_one(task, index, seed, levels[index % len(levels)], image_size, stream)
            for index in range(start, start + n)]

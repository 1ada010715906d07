"""Synthetic tasks: determinism, answers recomputed from the rendered pixels, answer formats, difficulty."""
import re

import numpy as np
import pytest

from care_megatron.data.schema import validate_record
from care_megatron.data.synthetic import COLORS, TASKS, generate, generate_one


def _pixels(record):
    return np.asarray(record.images[0])


def _mask(array, color):
    return np.all(array == np.array(COLORS[color], dtype=np.uint8), axis=-1)


def _components(mask):
    """4-connected components of a boolean mask (small images: a plain flood fill)."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def _extent(mask):
    points = np.argwhere(mask).astype(float)
    return float(np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1).max()))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_same_records_different_seed_different(task):
    first = generate(task, 12, seed=5, difficulty=[1, 2, 3])
    again = generate(task, 12, seed=5, difficulty=[1, 2, 3])
    other = generate(task, 12, seed=6, difficulty=[1, 2, 3])
    for a, b in zip(first, again):
        assert np.array_equal(_pixels(a), _pixels(b))
        assert (a.id, a.question, a.answer, a.answer_type, a.choices, a.rationale, a.metadata) == \
               (b.id, b.question, b.answer, b.answer_type, b.choices, b.rationale, b.metadata)
    differing = sum(not np.array_equal(_pixels(a), _pixels(c)) for a, c in zip(first, other))
    assert differing >= 10
    # Indices are addressable: record 7 alone equals record 7 of the batch; streams are independent.
    alone = generate_one(task, 7, seed=5, difficulty=[1, 2, 3][7 % 3])
    assert np.array_equal(_pixels(alone), _pixels(first[7])) and alone.answer == first[7].answer
    held_out_stream = generate(task, 12, seed=5, difficulty=[1, 2, 3], stream=1)
    assert sum(not np.array_equal(_pixels(a), _pixels(c)) for a, c in zip(first, held_out_stream)) >= 10


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_records_are_valid_with_verifiable_answer_formats(task, difficulty):
    for record in generate(task, 20, seed=1, difficulty=difficulty):
        validate_record(record)
        assert record.images[0].size == (56, 56) and record.images[0].mode == "RGB"
        assert record.metadata["task"] == task and record.metadata["difficulty"] == difficulty
        assert record.rationale and len(record.rationale) <= 24 and len(record.rationale.split()) <= 4
        if record.answer_type == "integer":
            assert re.fullmatch(r"\d+", record.answer)
        elif record.answer_type == "text":
            assert record.answer in COLORS and record.answer in record.question
        else:
            assert record.answer_type == "multiple_choice" and record.answer in record.choice_letters()
            for letter, option in zip(record.choice_letters(), record.choices):
                assert f"{letter}. {option}" in record.question


def test_count_shapes_answer_matches_the_picture():
    for record in generate("count_shapes", 60, seed=2, difficulty=[1, 2, 3]):
        shape, color = record.metadata["details"]["target"]
        objects = record.metadata["details"]["objects"]
        assert int(record.answer) == sum(1 for o in objects if o == [shape, color])
        # Every object of the target colour is one separate blob of exactly that colour.
        assert _components(_mask(_pixels(record), color)) == sum(1 for o in objects if o[1] == color)
        assert record.rationale == f"{color} {shape}s: {record.answer}"
        if record.metadata["difficulty"] == 1:
            assert len(objects) == int(record.answer) and 1 <= int(record.answer) <= 3


def test_tallest_bar_answer_matches_the_picture():
    for record in generate("tallest_bar", 60, seed=3, difficulty=[1, 2, 3]):
        labels = record.metadata["details"]["labels"]
        assert len(labels) == {1: 2, 2: 3, 3: 4}[record.metadata["difficulty"]]
        array = _pixels(record)
        heights = {name: int(_mask(array, name).any(axis=1).sum()) for name in labels}
        tallest = max(heights, key=heights.get)
        assert sorted(heights.values())[-1] > sorted(heights.values())[-2]  # unique in pixels too
        if record.answer_type == "multiple_choice":
            assert record.choices == labels and record.choices[ord(record.answer) - ord("A")] == tallest
        else:
            assert int(record.answer) == max(record.metadata["details"]["values"])
            assert record.rationale == f"tallest: {tallest}, {record.answer}"


def test_triangle_angle_answer_and_geometry():
    steps = {1: 30, 2: 10, 3: 1}
    for record in generate("triangle_angle", 60, seed=4, difficulty=[1, 2, 3]):
        a, b = map(int, re.findall(r"\d+", record.question)[:2])
        assert int(record.answer) == 180 - a - b >= 15
        assert a % steps[record.metadata["difficulty"]] == 0 and b % steps[record.metadata["difficulty"]] == 0
        assert record.rationale == f"180-{a}-{b}={record.answer}"
        assert _components(_mask(_pixels(record), "red")) == 1  # the marked apex


def test_compare_lengths_answer_matches_the_picture():
    for record in generate("compare_lengths", 150, seed=5, difficulty=[1, 2, 3]):
        array = _pixels(record)
        # The longer segment has the larger pixel extent (largest distance between two of its pixels).
        red, blue = _extent(_mask(array, "red")), _extent(_mask(array, "blue"))
        winner = record.choices[ord(record.answer) - ord("A")]
        assert winner == ("red" if red > blue else "blue")
        lengths = record.metadata["details"]["lengths"]
        ratio = max(lengths.values()) / min(lengths.values())
        assert ratio >= {1: 1.8, 2: 1.4, 3: 1.15}[record.metadata["difficulty"]] - 0.01  # lengths rounded to 0.01
        assert abs(lengths["red"] - lengths["blue"]) >= 3.0 - 0.01


def test_shape_color_answer_matches_the_picture():
    for record in generate("shape_color", 90, seed=6, difficulty=[1, 2, 3], image_size=56):
        details, array = record.metadata["details"], _pixels(record)
        objects, boxes = details["objects"], details["boxes"]
        assert len(objects) == record.metadata["difficulty"]
        assert len({k for k, _ in objects}) == len({c for _, c in objects}) == len(objects)  # kinds and colours differ
        for (kind, color), (x0, y0, x1, y1) in zip(objects, boxes):
            # the centre of a shape's box is inside any of the three kinds, and has the shape's colour
            assert tuple(array[(y0 + y1) // 2, (x0 + x1) // 2]) == COLORS[color]
            assert _components(_mask(array, color)) == 1
        kind, color = objects[details["target"]]
        assert record.answer == color and record.answer_type == "text" and record.choices is None
        assert record.question == f"What colour is the {kind}? Answer with one of: red, green, blue, yellow."
        assert record.rationale == f"{kind}: {color}"
        drawn = {c for c in COLORS if _mask(array, c).any()}
        assert drawn == {c for _, c in objects}  # nothing else coloured: the answer is in the picture only


def test_answers_are_balanced_enough_to_need_the_image():
    colors = [r.answer for r in generate("shape_color", 400, seed=0, difficulty=[1, 2])]
    assert all(0.18 < colors.count(c) / len(colors) < 0.32 for c in COLORS)
    answers = [r.answer for r in generate("compare_lengths", 200, seed=0, difficulty=2)]
    assert 0.35 < answers.count("A") / len(answers) < 0.65
    counts = [int(r.answer) for r in generate("count_shapes", 200, seed=0, difficulty=3)]
    assert len(set(counts)) >= 6


def test_image_size_and_errors():
    record = generate_one("count_shapes", 0, image_size=84)
    assert record.images[0].size == (84, 84)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        generate("count_cats", 1)
    with pytest.raises(ValueError, match="difficulty"):
        generate("count_shapes", 1, difficulty=4)
    with pytest.raises(ValueError, match="image_size"):
        generate("count_shapes", 1, image_size=16)


def test_reference_answers_and_rationales_score_full_marks_with_the_verifier():
    """Integration with care_megatron.rewards.verifier: the reference response earns accuracy 1 and
    format 1; a wrong answer earns 0; for multiple choice the option text counts like the letter."""
    from care_megatron.rewards.verifier import score

    for task in sorted(TASKS):
        for record in generate(task, 15, seed=0, difficulty=[1, 2, 3]):
            reference = score(f"<think>{record.rationale}</think><answer>{record.answer}</answer>", record.answer,
                              record.answer_type, record.choices)
            assert (reference.accuracy, reference.format) == (1.0, 1.0), record.id
            if record.answer_type == "multiple_choice":
                right = record.choices[ord(record.answer) - ord("A")]
                wrong = next(c for c in record.choices if c != right)
                assert score(f"<think>x</think><answer>{right}</answer>", record.answer, record.answer_type,
                             record.choices).accuracy == 1.0
            elif record.answer_type == "text":
                wrong = next(c for c in COLORS if c != record.answer)
            else:
                wrong = str(int(record.answer) + 1)
            assert score(f"<think>x</think><answer>{wrong}</answer>", record.answer, record.answer_type,
                         record.choices).accuracy == 0.0

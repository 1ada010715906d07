"""The paper's six evaluation benchmarks: loaders for their public parquet releases and their scoring rules.

``load_benchmark(name, path)`` reads one benchmark from a local copy of its Hugging Face dataset
repository (or from one parquet file) into :class:`~care_megatron.data.schema.Record` s;
``score_benchmark(name, record, response)`` scores the text inside the response's
``<answer>...</answer>`` span by that benchmark's official rules. Only the split the paper reports is
read, whatever else the directory holds:

============================  ==========================================  ==================================
name                          files read (relative to ``path``)           split in the paper's Table 1
============================  ==========================================  ==================================
``mathvista``                 ``data/testmini-*.parquet``                 MathVista testmini (1000)
``mathverse``                 ``testmini.parquet``                        MathVerse testmini (3940, 5 versions)
``mathvision``                ``data/test-*.parquet``                     MATH-Vision full test (3040)
``mmmu``                      ``<Subject>/validation-*.parquet``          MMMU validation (900)
``mmmu_pro_standard``         ``standard (10 options)/test-*.parquet``    MMMU-Pro standard, 10 options (1730)
``mmmu_pro_vision``           ``vision/test-*.parquet``                   MMMU-Pro vision (1730)
============================  ==========================================  ==================================

Columns are read as the releases store them: images as the ``datasets`` Image feature writes them to
parquet (a ``{bytes, path}`` struct; a relative path resolves against the parquet file's folder, then
``path``); MMMU / MMMU-Pro ``options`` as the string form of a Python list (parsed with
``ast.literal_eval``, which, unlike JSON, reads single-quoted strings and apostrophes).

Images and placeholders: MMMU and MMMU-Pro standard refer to their ``image_1..image_7`` columns with
``<image N>`` inside the question and the options; MATH-Vision writes ``<image1>``. The loaders
collect the referenced images in the order their placeholders first appear (question, then options;
an image referred to twice is passed once, as lmms-eval does), put them in ``Record.images`` in that
order, and rewrite each placeholder to ``[image k]`` (k = its position in ``Record.images``), so the
text still says which picture it means but holds no placeholder. The prompt
(:func:`benchmark_prompt`, then :func:`care_megatron.data.prompting.build_prompt`) places every image
block first in the user turn, in ``Record.images`` order, then the text: the layout of Qwen-VL's chat
template for one user turn (``<|vision_start|><|image_pad|><|vision_end|>`` per image before the text).

Malformed rows (missing key, unparseable options, an answer that is not an option letter, a
placeholder naming an absent image, an image that does not decode) are skipped and counted by reason
in a :class:`~care_megatron.data.schema.LoadReport`, never raised.
"""
from __future__ import annotations

import ast
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from care_megatron.data.schema import CHOICE_LETTERS, LoadReport, Record, RecordError, check_image, infer_answer_type
from care_megatron.rewards.parsing import DEFAULT_TAGS, TagConfig, parse_response

logger = logging.getLogger(__name__)

BENCHMARKS: dict[str, str] = {
    "mathvista": "MathVista (testmini)",
    "mathverse": "MathVerse (testmini)",
    "mathvision": "MATH-Vision (full test)",
    "mmmu": "MMMU (validation)",
    "mmmu_pro_standard": "MMMU-Pro (standard, 10 options)",
    "mmmu_pro_vision": "MMMU-Pro (vision)",
}
"""Benchmark name -> the split evaluated; the order of the paper's Table 1 columns."""

SPLIT_FILES: dict[str, str] = {
    "mathvista": "data/testmini-*.parquet",
    "mathverse": "testmini.parquet",
    "mathvision": "data/test-*.parquet",
    "mmmu": "*/validation-*.parquet",
    "mmmu_pro_standard": "standard (10 options)/test-*.parquet",
    "mmmu_pro_vision": "vision/test-*.parquet",
}
"""Glob, relative to the dataset directory, of the parquet files of the evaluated split."""

MMMU_PRO_VISION_QUESTION = "Answer the multiple-choice question shown in the image."
"""MMMU-Pro vision rows hold the question and its options only inside the screenshot."""
VISION_ONLY_QUESTION = "Answer the question shown in the image."
"""MathVerse 'Vision Only' rows have an empty text question."""

_MMMU_PLACEHOLDER = re.compile(r"<image\s*(\d+)>")
"""``<image 3>`` (MMMU, MMMU-Pro) and ``<image1>`` (MATH-Vision)."""


# ----------------------------------------------------------------------------------------------- loading
def split_files(name: str, path: str | os.PathLike) -> list[Path]:
    """The parquet files of ``name``'s evaluated split under ``path`` (or ``[path]`` for a parquet file)."""
    _check_name(name)
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark {name}: {root} is neither a parquet file nor a directory")
    files = sorted(root.glob(SPLIT_FILES[name]))
    if not files:
        raise FileNotFoundError(f"benchmark {name}: no {SPLIT_FILES[name]} under {root} "
                                "(expected the layout of the dataset's Hugging Face repository)")
    return files


def load_benchmark(name: str, path: str, limit: int | None = None) -> list[Record]:
    """Records of benchmark ``name`` read from ``path`` (its repository layout or one parquet file).

    ``limit`` keeps the first ``limit`` usable rows in file order. Malformed rows are skipped and
    counted (see :func:`load_benchmark_with_report` for the counts).
    """
    records, report = load_benchmark_with_report(name, path, limit)
    if report.num_skipped:
        logger.warning("%s", report.summary())
    return records


def load_benchmark_with_report(name: str, path: str, limit: int | None = None) -> tuple[list[Record], LoadReport]:
    """:func:`load_benchmark` plus the :class:`LoadReport` of skipped rows by reason."""
    import pyarrow.parquet as pq

    files = split_files(name, path)
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    report = LoadReport(name)
    records: list[Record] = []
    convert = _ROW_CONVERTERS[name]
    for file in files:
        for index, row in enumerate(pq.read_table(file).to_pylist()):
            if limit is not None and len(records) >= limit:
                return records, report
            where = f"{file.name}:{index}"
            try:
                record = convert(row, _Context(name, file.parent, root, file))
                _validate(record)
            except RecordError as exc:
                report.skip(exc.reason, f"{where}: {exc}")
                continue
            except (KeyError, TypeError, ValueError, SyntaxError) as exc:
                report.skip("malformed_row", f"{where}: {type(exc).__name__}: {exc}")
                continue
            records.append(record)
            report.loaded += 1
    return records, report


@dataclass
class _Context:
    name: str
    folder: Path
    root: Path
    file: Path


def _check_name(name: str) -> None:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")


def _validate(record: Record) -> None:
    if not record.answer.strip():
        raise RecordError("empty_answer", f"record {record.id!r}: empty answer")
    if record.answer_type == "multiple_choice":
        if not record.choices or record.answer not in record.choice_letters():
            raise RecordError("bad_choices", f"record {record.id!r}: answer {record.answer!r} is not one of "
                                             f"{record.choice_letters()}")
    if not record.images:
        raise RecordError("missing_image", f"record {record.id!r}: no image")
    for image in record.images:
        check_image(image)


def _required(row: dict, *keys: str) -> list[Any]:
    missing = [k for k in keys if row.get(k) is None]
    if missing:
        raise RecordError("missing_field", f"missing field(s) {missing}")
    return [row[k] for k in keys]


def _image(value: Any, ctx: _Context) -> bytes | str | None:
    """An Image-feature cell (``{bytes, path}``), a path string, or raw bytes -> bytes or an absolute path."""
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        candidate = Path(value)
        if candidate.is_absolute():
            return str(candidate)
        for base in (ctx.folder, ctx.root):
            if (base / candidate).is_file():
                return str(base / candidate)
        raise RecordError("unreadable_image", f"image path {value!r} not found under {ctx.folder} or {ctx.root}")
    raise RecordError("unreadable_image", f"unsupported image cell of type {type(value).__name__}")


def _options(value: Any) -> list[str]:
    """MMMU's ``options``: the string of a Python list literal (or, in re-packaged copies, a list)."""
    if isinstance(value, str):
        parsed = ast.literal_eval(value) if value.strip() else []
    else:
        parsed = value
    if not isinstance(parsed, (list, tuple)):
        raise RecordError("bad_options", f"options are not a list: {value!r}")
    options = [str(option) for option in parsed]
    if len(options) > len(CHOICE_LETTERS):
        raise RecordError("bad_options", f"{len(options)} options")
    return options


def _placeholders_to_images(texts: list[str], row: dict, ctx: _Context) -> tuple[list[str], list]:
    """Replace ``<image N>`` in ``texts`` by ``[image k]`` and return the referenced ``image_N`` cells in order."""
    order: list[int] = []
    for text in texts:
        for match in _MMMU_PLACEHOLDER.finditer(text):
            number = int(match.group(1))
            if number not in order:
                order.append(number)
    images = []
    for number in order:
        image = _image(row.get(f"image_{number}"), ctx)
        if image is None:
            raise RecordError("missing_image", f"<image {number}> refers to an empty image_{number}")
        images.append(image)
    position = {number: k + 1 for k, number in enumerate(order)}
    rewritten = [_MMMU_PLACEHOLDER.sub(lambda m: f"[image {position[int(m.group(1))]}]", t) for t in texts]
    return rewritten, images


def _letter_answer(answer: Any, options: list[str]) -> str:
    letter = str(answer).strip().upper()
    if letter not in CHOICE_LETTERS[: len(options)]:
        raise RecordError("bad_choices", f"answer {answer!r} is not one of {list(CHOICE_LETTERS[: len(options)])}")
    return letter


def _mathvista(row: dict, ctx: _Context) -> Record:
    pid, question, answer, question_type = _required(row, "pid", "question", "answer", "question_type")
    image = _image(row.get("decoded_image"), ctx) or _image(row.get("image"), ctx)
    if image is None:
        raise RecordError("missing_image", "neither decoded_image nor image")
    answer_kind = row.get("answer_type") or "text"
    precision = row.get("precision")
    if precision is not None and (not isinstance(precision, (int, float)) or math.isnan(precision)):
        precision = None
    query = row.get("query") or ""
    hint = query.split("\n", 1)[0] if query.startswith("Hint:") else ""
    metadata = {"benchmark": "mathvista", "question_type": question_type, "answer_type": answer_kind,
                "precision": precision, "unit": row.get("unit"), "answer_text": str(answer), "hint": hint,
                "source_metadata": row.get("metadata")}
    if question_type == "multi_choice":
        choices = [str(c) for c in (row.get("choices") or [])]
        if str(answer) not in choices:
            raise RecordError("bad_choices", f"answer {answer!r} is not one of the choices {choices}")
        letter = CHOICE_LETTERS[choices.index(str(answer))]
        return Record(id=f"mathvista/{pid}", source="mathvista", images=[image], question=str(question),
                      answer=letter, answer_type="multiple_choice", choices=choices, metadata=metadata)
    kind = {"integer": "integer", "float": "float", "list": "latex"}.get(answer_kind, "text")
    return Record(id=f"mathvista/{pid}", source="mathvista", images=[image], question=str(question),
                  answer=str(answer), answer_type=kind, metadata=metadata)


_INLINE_CHOICE = re.compile(r"^\s*\(?([A-Z])\s*[:.)：]\s*(.*)$")


def _inline_choices(text: str) -> list[str] | None:
    """Option texts of a ``Choices:`` block (``A:40°`` / ``A. 40°`` / ``(A) 40°`` lines), or None."""
    marker = re.search(r"Choices?\s*:?\s*\n", text or "")
    if not marker:
        return None
    options: list[str] = []
    for line in text[marker.end():].splitlines():
        match = _INLINE_CHOICE.match(line)
        if not match:
            if options:
                break
            continue
        if match.group(1) != CHOICE_LETTERS[len(options)]:
            break
        options.append(match.group(2).strip())
    return options or None


def _mathverse(row: dict, ctx: _Context) -> Record:
    sample, answer, question_type = _required(row, "sample_index", "answer", "question_type")
    image = _image(row.get("image"), ctx)
    if image is None:
        raise RecordError("missing_image", "no image")
    question = str(row.get("question") or "").strip()
    for_eval = str(row.get("question_for_eval") or question)
    metadata = {"benchmark": "mathverse", "question_type": question_type,
                "problem_version": row.get("problem_version"), "problem_index": row.get("problem_index"),
                "question_for_eval": for_eval, "options_in_question": True, "source_metadata": row.get("metadata")}
    if not question:
        question = VISION_ONLY_QUESTION
    if question_type == "multi-choice":
        letter = str(answer).strip().strip("()").upper()[:1]
        choices = _inline_choices(for_eval) or _inline_choices(question)
        if choices is None:
            # The options are only in the diagram (Vision Only): letters stand for themselves.
            choices = list(CHOICE_LETTERS[: max(4, CHOICE_LETTERS.index(letter) + 1)]) if letter in CHOICE_LETTERS else []
            metadata["options_unparsed"] = True
        return Record(id=f"mathverse/{sample}", source="mathverse", images=[image], question=question,
                      answer=letter, answer_type="multiple_choice", choices=choices, metadata=metadata)
    return Record(id=f"mathverse/{sample}", source="mathverse", images=[image], question=question,
                  answer=str(answer).strip(), answer_type=_value_type(str(answer)), metadata=metadata)


def _value_type(answer: str) -> str:
    kind = infer_answer_type(answer.strip())
    return "latex" if kind == "text" else kind


def _mathvision(row: dict, ctx: _Context) -> Record:
    ident, question, answer = _required(row, "id", "question", "answer")
    image = _image(row.get("decoded_image"), ctx) or _image(row.get("image"), ctx)
    if image is None:
        raise RecordError("missing_image", "neither decoded_image nor image")
    text = re.sub(r"\s*<image\s*\d+>\s*", " ", str(question)).strip()
    options = [str(o) for o in (row.get("options") or [])]
    metadata = {"benchmark": "mathvision", "level": row.get("level"), "subject": row.get("subject")}
    if options:
        return Record(id=f"mathvision/{ident}", source="mathvision", images=[image], question=text,
                      answer=_letter_answer(answer, options), answer_type="multiple_choice", choices=options,
                      metadata=metadata)
    return Record(id=f"mathvision/{ident}", source="mathvision", images=[image], question=text,
                  answer=str(answer).strip(), answer_type=_value_type(str(answer)), metadata=metadata)


def _mmmu(row: dict, ctx: _Context) -> Record:
    ident, question, answer = _required(row, "id", "question", "answer")
    options = _options(row.get("options") or "[]")
    texts, images = _placeholders_to_images([str(question)] + options, row, ctx)
    if not images and row.get("image_1") is not None:
        images = [_image(row["image_1"], ctx)]
    question_type = row.get("question_type") or ("multiple-choice" if options else "open")
    subject = ctx.folder.name if ctx.name == "mmmu" and ctx.folder != ctx.root else row.get("subfield")
    metadata = {"benchmark": ctx.name, "question_type": question_type, "subject": row.get("subject") or subject,
                "subfield": row.get("subfield"), "img_type": row.get("img_type"),
                "topic_difficulty": row.get("topic_difficulty")}
    if question_type == "multiple-choice":
        if not options:
            raise RecordError("bad_choices", "multiple-choice question without options")
        return Record(id=f"{ctx.name}/{ident}", source=ctx.name, images=images, question=texts[0],
                      answer=_letter_answer(answer, options), answer_type="multiple_choice", choices=texts[1:],
                      metadata=metadata)
    return Record(id=f"{ctx.name}/{ident}", source=ctx.name, images=images, question=texts[0],
                  answer=str(answer).strip(), answer_type="text", metadata=metadata)


def _mmmu_pro_vision(row: dict, ctx: _Context) -> Record:
    ident, answer = _required(row, "id", "answer")
    image = _image(row.get("image"), ctx)
    if image is None:
        raise RecordError("missing_image", "no image")
    options = _options(row.get("options") if row.get("options") is not None else "[]")
    if not options:
        raise RecordError("bad_choices", "no options")
    metadata = {"benchmark": "mmmu_pro_vision", "subject": row.get("subject"), "options_in_image": True}
    return Record(id=f"mmmu_pro_vision/{ident}", source="mmmu_pro_vision", images=[image],
                  question=MMMU_PRO_VISION_QUESTION, answer=_letter_answer(answer, options),
                  answer_type="multiple_choice", choices=options, metadata=metadata)


_ROW_CONVERTERS: dict[str, Callable[[dict, _Context], Record]] = {
    "mathvista": _mathvista,
    "mathverse": _mathverse,
    "mathvision": _mathvision,
    "mmmu": _mmmu,
    "mmmu_pro_standard": _mmmu,
    "mmmu_pro_vision": _mmmu_pro_vision,
}


# ------------------------------------------------------------------------------------------------ prompts
def benchmark_prompt(record: Record) -> str:
    """The user text of ``record``'s prompt: MathVista's hint, the question, then the lettered options.

    Options already written in the question (MathVerse) or only drawn in the image (MMMU-Pro vision)
    are not repeated. The images go before this text (see the module docstring).
    """
    parts = []
    hint = record.metadata.get("hint")
    if hint:
        parts.append(hint)
    parts.append(record.question)
    show = record.choices and not record.metadata.get("options_in_question") and not record.metadata.get("options_in_image")
    if show:
        parts.append("Options:\n" + "\n".join(f"({CHOICE_LETTERS[i]}) {c}" for i, c in enumerate(record.choices)))
    if record.answer_type == "multiple_choice":
        parts.append("Answer with the option's letter.")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ scoring
Judge = Callable[[str, str, str], float]
"""An optional grader of open-ended answers: ``judge(question, key, extracted_answer) -> score in [0, 1]``."""


@dataclass(frozen=True)
class BenchmarkScore:
    score: float
    """In [0, 1]."""
    extracted: Optional[str]
    """The normalised prediction that was compared (option letter, number, text), or None."""
    reason: str
    """Why it scored what it did (for the per-example JSONL)."""


def score_benchmark(name: str, record: Record, response: str, tags: TagConfig = DEFAULT_TAGS) -> float:
    """Score ``response``'s ``<answer>`` span for ``record`` by benchmark ``name``'s rules; 0 without a span.
    ``tags``: the run's tags (``data.think_tag``), which decide where the rationale ends."""
    return score_benchmark_detail(name, record, response, tags=tags).score


def score_benchmark_detail(name: str, record: Record, response: str, judge: Judge | None = None,
                           tags: TagConfig = DEFAULT_TAGS) -> BenchmarkScore:
    """:func:`score_benchmark` with the extracted prediction and the reason; ``judge`` grades open-ended answers."""
    _check_name(name)
    span = parse_response(response if isinstance(response, str) else "", tags).answer
    if span is None:
        return BenchmarkScore(0.0, None, "no <answer> span")
    span = span.strip()
    if not span:
        return BenchmarkScore(0.0, None, "empty <answer> span")
    if judge is not None and record.answer_type != "multiple_choice":
        question = record.metadata.get("question_for_eval") or record.question
        value = float(judge(question, record.answer, span))
        value = min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0
        return BenchmarkScore(value, span, "judge")
    if name == "mathvista":
        return _score_mathvista(record, span)
    if name in ("mmmu", "mmmu_pro_standard", "mmmu_pro_vision"):
        if record.answer_type == "multiple_choice":
            return _score_letter(record, mmmu_choice(span, record.choices or []))
        return _score_mmmu_open(record, span)
    # MathVerse, MATH-Vision: the option letter when the question has options, else the value.
    if record.answer_type == "multiple_choice":
        return _score_letter(record, mmmu_choice(span, record.choices or []))
    return _score_value(record, span)


def _score_letter(record: Record, letter: Optional[str]) -> BenchmarkScore:
    if letter is None:
        return BenchmarkScore(0.0, None, "no option letter or option text in the answer")
    ok = letter == record.answer
    return BenchmarkScore(float(ok), letter, "correct option" if ok else f"chose {letter}, key {record.answer}")


def _score_value(record: Record, span: str) -> BenchmarkScore:
    from care_megatron.rewards.verifier import grade_answer

    accuracy, extracted, reason, _ = grade_answer(span, record.answer, answer_type=record.answer_type)
    return BenchmarkScore(float(accuracy), extracted if extracted is not None else span, reason)


# MathVista (lupantech/MathVista evaluation/calculate_score.py, normalize_extracted_answer + safe_equal):
# multi_choice: "(X)" -> letter X; a letter picks that option; anything else picks the option with
# the smallest edit distance; the chosen option's text must equal the key. integer: str(int(float(x)));
# float: str(round(float(x), precision)); list: str(x); the result must equal the key string.
def _score_mathvista(record: Record, span: str) -> BenchmarkScore:
    meta = record.metadata
    key = str(meta.get("answer_text", record.answer))
    if record.answer_type == "multiple_choice":
        choices = record.choices or []
        extraction = span
        bracketed = re.findall(r"\(([a-zA-Z])\)", extraction)
        if bracketed:
            extraction = bracketed[0].upper()
        letters = list(CHOICE_LETTERS[: len(choices)])
        if extraction in letters:
            prediction = choices[letters.index(extraction)]
        else:
            prediction = min(choices, key=lambda choice: edit_distance(extraction, choice))
        ok = prediction == key
        return BenchmarkScore(float(ok), prediction, "matches the key option" if ok else f"chose {prediction!r}")
    kind = meta.get("answer_type")
    prediction: Optional[str]
    try:
        if kind == "integer":
            prediction = str(int(float(span)))
        elif kind == "float":
            precision = meta.get("precision")
            if precision is None:
                # The release gives every float answer a precision; without one compare the values.
                ok = float(span) == float(key)
                return BenchmarkScore(float(ok), span, "float equal" if ok else "float differs (no precision given)")
            prediction = str(round(float(span), int(precision)))
        elif kind == "list":
            prediction = str(span)
        else:
            prediction = span
    except (ValueError, OverflowError):
        return BenchmarkScore(0.0, None, f"not a {kind}: {span[:40]!r}")
    if kind == "list":
        ok = re.sub(r"\s+", "", prediction) == re.sub(r"\s+", "", key)
    else:
        ok = prediction == key
    return BenchmarkScore(float(ok), prediction, "equals the key" if ok else f"{prediction!r} != {key!r}")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


# MMMU (MMMU-Benchmark/MMMU mmmu/utils/eval_utils.py, parse_multi_choice_response; MMMU-Pro's
# evaluate.py uses the same): "(B)" anywhere, else a bare " B ", else (for answers longer than five
# words) an option's text inside the answer; several candidates -> the last one in the text. The
# official parser guesses a random letter when nothing matches; here that scores 0 (deterministic).
# The <answer> span is usually the bare letter or the option itself, so those two are checked first.
def mmmu_choice(span: str, options: list[str]) -> Optional[str]:
    """The option letter ``span`` selects among ``options``, or None."""
    letters = list(CHOICE_LETTERS[: len(options)])
    bare = span.strip().strip(".:;,!?'\"").strip()
    match = re.fullmatch(r"\(?([A-Za-z])\)?", bare)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    folded = " ".join(bare.lower().split())
    exact = [letters[i] for i, option in enumerate(options) if " ".join(option.lower().split()) == folded]
    if len(exact) == 1:
        return exact[0]
    response = span
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = f" {response} "
    candidates = [c for c in letters if f"({c})" in response]
    bracketed = bool(candidates)
    if not candidates:
        candidates = [c for c in letters if f" {c} " in response]
    by_text = False
    if not candidates and len(response.split()) > 5:
        candidates = [letters[i] for i, option in enumerate(options) if option.lower() in response.lower()]
        by_text = True
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if by_text:
        positions = [response.lower().rfind(options[letters.index(c)].lower()) for c in candidates]
    elif bracketed:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        positions = [response.rfind(f" {c} ") for c in candidates]
    return candidates[max(range(len(candidates)), key=positions.__getitem__)]


# MMMU open questions (eval_utils.py: parse_open_response, normalize_str, eval_open): the key phrases
# after "is", "so", "therefore", ... (and after "=" in the last sentence) plus every number in them
# are the predictions; numbers compare after rounding to 2 decimals, strings by substring of the key.
def mmmu_open_predictions(response: str) -> list:
    """The normalised predictions MMMU reads from an open answer (strings and floats)."""
    text = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", text)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys: list[str] = []
    for index, sentence in enumerate(sentences):
        marks = indicators + (["="] if index == len(sentences) - 1 else [])
        tails = [sentence.split(mark)[-1].strip() for mark in marks if mark in sentence]
        if tails:
            shortest = min(tails, key=len)
            if shortest and shortest not in (":", ",", ".", "!", "?", ";", "'"):
                keys.append(shortest)
    if not keys:
        keys = [text]
    predictions = list(keys)
    for key in keys:
        predictions.extend(_mmmu_numbers(key))
    normalised = []
    for prediction in predictions:
        normalised.extend(_mmmu_normalise(prediction))
    return list(dict.fromkeys(normalised))


def _mmmu_numbers(text: str) -> list[str]:
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return with_commas + scientific + simple


def _mmmu_normalise(text: str) -> list:
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        # A one-character string is padded so it does not match inside every word.
        return [" " + text, text + " "] if len(text) == 1 else [text]


def _score_mmmu_open(record: Record, span: str) -> BenchmarkScore:
    key = record.answer
    keys: list[str] = [key]
    if key.startswith("[") and key.endswith("]"):
        try:
            parsed = ast.literal_eval(key)
            if isinstance(parsed, (list, tuple)):
                keys = [str(k) for k in parsed]
        except (ValueError, SyntaxError):
            pass
    gold: list = []
    for k in keys:
        gold.extend(_mmmu_normalise(k))
    predictions = mmmu_open_predictions(span)
    for prediction in predictions:
        if isinstance(prediction, str):
            if any(isinstance(g, str) and g in prediction for g in gold):
                return BenchmarkScore(1.0, prediction.strip(), "key found in the answer")
        elif prediction in gold:
            return BenchmarkScore(1.0, str(prediction), "number equals the key (2 decimals)")
    shown = ", ".join(str(p).strip() for p in predictions[:4])
    return BenchmarkScore(0.0, shown or None, f"no prediction matches {key!r}")

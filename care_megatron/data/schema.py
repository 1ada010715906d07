"""The unified record: one visual question with a verifiable answer, and its on-disk format.

Every source (ChartQA, Geometry3K, ViRL39K, generic parquet / JSONL, easy-vqa, the synthetic
tasks) is converted into :class:`Record`. On disk a dataset is a JSONL file, one record per line,
beside an image folder; image paths inside the JSONL are relative to the JSONL's directory, so a
dataset folder can be moved or copied as a whole.

Bad input never aborts a run: readers and loaders validate each record with
:func:`validate_record`, skip the ones that fail and count them by reason in a :class:`LoadReport`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from PIL import Image

ANSWER_TYPES = ("multiple_choice", "integer", "float", "text", "latex")
"""Answer kinds the verifier understands (spec section 1): how the answer span is compared."""

ImageRef = Union[str, os.PathLike, bytes, Image.Image]
"""An image as a record may hold it: a file path, the encoded file bytes, or a decoded PIL image."""

CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Record:
    """One visual question with a verifiable answer.

    Construction checks types and allowed values (raising ``ValueError`` naming the field); it does
    not open images. :func:`validate_record` does the full check that loaders use to skip records.
    """

    id: str
    """Unique identifier, conventionally ``<source>/<source-local id>``."""
    source: str
    """Corpus the record came from (``chartqa``, ``geometry3k``, ``virl39k``, ``easy_vqa``, a synthetic task name, ...)."""
    images: list[ImageRef]
    """Images of the question, in the order their placeholders appear in the prompt."""
    question: str
    """Question text without image placeholders or output-format instructions (prompting adds those)."""
    answer: str
    """Reference answer as the verifier compares it: a plain integer (``"7"``), a number, short text,
    a LaTeX expression, or, for ``multiple_choice``, the option letter (``"B"``)."""
    answer_type: Optional[str] = None
    """One of :data:`ANSWER_TYPES`, or None to let the verifier infer it."""
    choices: Optional[list[str]] = None
    """Option texts of a multiple-choice question, in letter order (A, B, ...); None otherwise."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (split, task, difficulty, category, pass rates, ...). JSON-serialisable."""
    rationale: Optional[str] = None
    """Short reference reasoning for cold-start SFT (the ``<think>`` content); synthetic tasks fill it."""

    def __post_init__(self) -> None:
        for name in ("id", "source", "question", "answer"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"record field '{name}': must be a string, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.images, list):
            raise ValueError(f"record field 'images': must be a list, got {type(self.images).__name__}")
        for index, image in enumerate(self.images):
            if not isinstance(image, (str, os.PathLike, bytes, Image.Image)):
                raise ValueError(f"record field 'images[{index}]': must be a path, bytes or PIL image, got {type(image).__name__}")
        if self.answer_type is not None and self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"record field 'answer_type': must be one of {ANSWER_TYPES} or None, got {self.answer_type!r}")
        if self.choices is not None:
            if not isinstance(self.choices, list) or not all(isinstance(c, str) for c in self.choices):
                raise ValueError("record field 'choices': must be a list of strings or None")
            if len(self.choices) > len(CHOICE_LETTERS):
                raise ValueError(f"record field 'choices': at most {len(CHOICE_LETTERS)} options")
        if not isinstance(self.metadata, dict):
            raise ValueError("record field 'metadata': must be a dict")
        if self.rationale is not None and not isinstance(self.rationale, str):
            raise ValueError("record field 'rationale': must be a string or None")

    def choice_letters(self) -> list[str]:
        """Letters of the options (``["A", "B", ...]``), empty when the record has no choices."""
        return list(CHOICE_LETTERS[: len(self.choices or [])])


@dataclass
class LoadReport:
    """What a loader read: how many records it kept and, by reason, how many it skipped."""

    source: str
    """Name of the source or file the report describes."""
    loaded: int = 0
    """Records kept."""
    skipped: Counter = field(default_factory=Counter)
    """Skipped records counted by reason (``missing_field``, ``empty_answer``, ``unreadable_image``, ...)."""
    examples: list[str] = field(default_factory=list)
    """The first few skip messages verbatim, for the log (capped at ``max_examples``)."""
    max_examples: int = 10
    """How many skip messages to keep."""

    def skip(self, reason: str, detail: str) -> None:
        """Count one skipped record under ``reason``; keep ``detail`` if there is room."""
        self.skipped[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{reason}: {detail}")

    @property
    def num_skipped(self) -> int:
        return int(sum(self.skipped.values()))

    def merge(self, other: "LoadReport") -> "LoadReport":
        """Sum of two reports (counts add; examples concatenate up to the cap)."""
        merged = LoadReport(self.source, self.loaded + other.loaded, self.skipped + other.skipped,
                            (self.examples + other.examples)[: self.max_examples], self.max_examples)
        return merged

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.source}: loaded {self.loaded}, skipped {self.num_skipped} ({reasons})"


class RecordError(ValueError):
    """A record that cannot be used; ``reason`` is the :class:`LoadReport` counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


REQUIRED_FIELDS = ("id", "question", "answer")

_INTEGER = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?%?$")
_LATEX_HINTS = ("\\", "^", "_{", "{")


def infer_answer_type(answer: str, choices: Optional[list[str]] = None) -> str:
    """Best guess of the answer kind for sources that do not state it.

    Options present -> ``multiple_choice``; ``"12"`` -> ``integer``; ``"3.5"`` / ``"40%"`` ->
    ``float``; anything with LaTeX markup (backslash, braces, ``^``) -> ``latex``;
    everything else -> ``text``.
    """
    text = answer.strip().replace(",", "") if _FLOAT.match(answer.strip().replace(",", "")) else answer.strip()
    if choices:
        return "multiple_choice"
    if _INTEGER.match(text):
        return "integer"
    if _FLOAT.match(text):
        return "float"
    if any(hint in text for hint in _LATEX_HINTS):
        return "latex"
    return "text"


def open_image_ref(ref: ImageRef, base_dir: Optional[Union[str, os.PathLike]] = None) -> Image.Image:
    """Open an image reference as a PIL image (lazy; no conversion). Relative paths resolve against ``base_dir``.

    Raises ``FileNotFoundError`` or ``PIL.UnidentifiedImageError`` / ``OSError`` on bad input.
    """
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, bytes):
        return Image.open(io.BytesIO(ref))
    path = Path(ref)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    return Image.open(path)


def check_image(ref: ImageRef, base_dir: Optional[Union[str, os.PathLike]] = None) -> None:
    """Fully decode ``ref`` once; raise :class:`RecordError` (``unreadable_image``) if that fails.

    ``Image.verify`` alone misses truncated pixel data, so the pixels are loaded.
    """
    try:
        image = open_image_ref(ref, base_dir)
        image.load()
        if image.width < 1 or image.height < 1:
            raise OSError("zero-sized image")
    except Exception as exc:  # PIL raises many types on corrupt input; all mean "unusable"
        shown = ref if isinstance(ref, (str, os.PathLike)) else type(ref).__name__
        raise RecordError("unreadable_image", f"cannot decode image {shown}: {exc}") from exc


def validate_record(record: Record, check_images: bool = True,
                    base_dir: Optional[Union[str, os.PathLike]] = None) -> None:
    """Check that ``record`` can be trained on; raise :class:`RecordError` naming the reason.

    Reasons: ``empty_question``, ``empty_answer``, ``bad_choices`` (multiple choice without options or
    with an answer that is not one of the option letters), ``unreadable_image``.
    """
    if not record.question.strip():
        raise RecordError("empty_question", f"record {record.id!r}: empty question")
    if not record.answer.strip():
        raise RecordError("empty_answer", f"record {record.id!r}: empty answer")
    if record.answer_type == "multiple_choice":
        if not record.choices:
            raise RecordError("bad_choices", f"record {record.id!r}: multiple_choice without choices")
        if record.answer.strip().upper() not in record.choice_letters():
            raise RecordError("bad_choices", f"record {record.id!r}: answer {record.answer!r} is not one of "
                                             f"{record.choice_letters()}")
    if check_images:
        for image in record.images:
            check_image(image, base_dir)


def record_from_dict(data: dict[str, Any]) -> Record:
    """Build a :class:`Record` from a JSON object; raise :class:`RecordError` on a missing or bad field."""
    missing = [name for name in REQUIRED_FIELDS if name not in data or data[name] is None]
    if missing:
        raise RecordError("missing_field", f"record {data.get('id', '?')!r}: missing field(s) {missing}")
    try:
        return Record(
            id=str(data["id"]),
            source=str(data.get("source", "")),
            images=list(data.get("images") or []),
            question=str(data["question"]),
            answer=str(data["answer"]),
            answer_type=data.get("answer_type"),
            choices=data.get("choices"),
            metadata=dict(data.get("metadata") or {}),
            rationale=data.get("rationale"),
        )
    except ValueError as exc:
        raise RecordError("bad_field", str(exc)) from exc


def _image_extension(data: bytes) -> str:
    image = Image.open(io.BytesIO(data))
    return {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}.get(image.format or "", ".png")


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def write_jsonl(records: Iterable[Record], path: Union[str, os.PathLike], image_dir: str = "images") -> int:
    """Write ``records`` to ``path`` (JSONL), storing every image as a file under ``<path's dir>/<image_dir>``.

    Bytes are written as they are (keeping the original encoding), PIL images are saved as PNG and
    files are copied, so the folder is self-contained. Image file names are content hashes, so the
    same image used by several records is stored once. Returns the number of records written.
    """
    path = Path(path)
    root = path.parent
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            stored: list[str] = []
            for image in record.images:
                if isinstance(image, Image.Image):
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    data, ext = buffer.getvalue(), ".png"
                elif isinstance(image, bytes):
                    data, ext = image, _image_extension(image)
                else:
                    source_path = Path(image)
                    data, ext = source_path.read_bytes(), source_path.suffix or ".png"
                name = hashlib.sha1(data).hexdigest()[:20] + ext
                target = root / image_dir / name
                if not target.exists():
                    target.write_bytes(data)
                stored.append(f"{image_dir}/{name}")
            row = {"id": record.id, "source": record.source, "images": stored, "question": record.question,
                   "answer": record.answer, "answer_type": record.answer_type, "choices": record.choices,
                   "metadata": record.metadata}
            if record.rationale is not None:
                row["rationale"] = record.rationale
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Union[str, os.PathLike], check_images: bool = True,
               source: Optional[str] = None) -> tuple[list[Record], LoadReport]:
    """Read a unified-schema JSONL file; skip and count bad lines instead of raising.

    Relative image paths are resolved against the file's directory and returned absolute, so records
    stay usable wherever the caller runs. Skip reasons: ``invalid_json``, ``missing_field``,
    ``bad_field``, ``empty_question``, ``empty_answer``, ``bad_choices``, ``unreadable_image``.
    A missing file raises ``FileNotFoundError`` (a configuration error, not a bad record).
    """
    path = Path(path)
    root = path.parent.resolve()
    report = LoadReport(source or str(path))
    records: list[Record] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise ValueError("line is not a JSON object")
            except ValueError as exc:
                report.skip("invalid_json", f"{path}:{line_number}: {exc}")
                continue
            try:
                record = record_from_dict(data)
                record.images = [str(root / image) if isinstance(image, str) and not os.path.isabs(image) else image
                                 for image in record.images]
                validate_record(record, check_images=check_images)
            except RecordError as exc:
                report.skip(exc.reason, f"{path}:{line_number}: {exc}")
                continue
            records.append(record)
            report.loaded += 1
    return records, report


def keep_if_valid(record: Record, kept: list[Record], report: LoadReport, check_images: bool = True) -> bool:
    """Append ``record`` to ``kept`` when it passes :func:`validate_record`, else count it in ``report``."""
    try:
        validate_record(record, check_images=check_images)
    except RecordError as exc:
        report.skip(exc.reason, str(exc))
        return False
    kept.append(record)
    report.loaded += 1
    return True


def filter_valid(records: Iterable[Record], report: LoadReport, check_images: bool = True) -> list[Record]:
    """Keep the records that pass :func:`validate_record`, counting the others in ``report``."""
    kept: list[Record] = []
    for record in records:
        keep_if_valid(record, kept, report, check_images)
    return kept

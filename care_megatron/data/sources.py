"""Loaders from the public releases' own file layouts (local paths) to :class:`Record` lists.

Every loader returns ``(records, report)``: bad rows (missing field, empty answer, unreadable
image, ...) are skipped and counted in the :class:`LoadReport`, never raised. A missing root
directory or file is a configuration error and raises ``FileNotFoundError``.

Layouts read:

* **ChartQA** (``vis-nlp/ChartQA``): ``<root>/<split>/<split>_human.json`` and
  ``<split>_augmented.json``, lists of ``{"imgname", "query", "label"}``, images in
  ``<root>/<split>/png/<imgname>``; splits ``train``, ``val``, ``test``.
* **Geometry3K** (InterGPS): ``<root>/<split>/<problem id>/data.json`` with ``problem_text``,
  ``choices`` (four option strings) and ``answer`` (a letter), the diagram in ``img_diagram.png``.
* **ViRL39K** (``TIGER-Lab/ViRL39K``): parquet with ``qid``, ``question`` (with ``<image>``
  placeholders), ``answer`` (``\\boxed{...}``), ``image`` (embedded ``{"bytes", "path"}`` structs,
  raw bytes, or paths relative to the release folder; one or a list), ``category``, ``source``,
  ``PassRate_32BTrained``, ``PassRate_7BBase``.
* **Generic** parquet (Hugging Face ``datasets`` exports, image features as ``{"bytes", "path"}``)
  or JSONL, through a :class:`ColumnMapping`.
* **Conversations** in the LLaVA / ShareGPT style, the layout of the cold-start SFT data
  (Vision-R1-cold's ``vision_r1_llava_cot_full.json`` / ``vision_r1_mulberry_sft_full.json``): a JSON
  list, JSONL or parquet of rows ``{"conversations": [{"from": "human", "value": "<image>..."},
  {"from": "gpt", "value": "<think>...</think>..."}], "image" | "images": ...}``; see
  :func:`load_sharegpt`.
* **easy-vqa** (the ``easy_vqa`` package's bundled data), the real-image source of the embedded default.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from care_megatron.data.schema import (
    CHOICE_LETTERS,
    LoadReport,
    Record,
    RecordError,
    infer_answer_type,
    keep_if_valid,
)

PathLike = Union[str, os.PathLike]
IMAGE_PLACEHOLDER = re.compile(r"<image>\s*")
_BOXED = "\\boxed{"
_INLINE_OPTION = re.compile(r"^\s*\(?([A-H])\s*[\.\):：]\s*(.+?)\s*$")


def strip_boxed(answer: str) -> str:
    """The content of the last ``\\boxed{...}`` in ``answer`` (balanced braces), or ``answer`` stripped."""
    start = answer.rfind(_BOXED)
    if start < 0:
        return answer.strip()
    depth, index = 1, start + len(_BOXED)
    for position in range(index, len(answer)):
        if answer[position] == "{":
            depth += 1
        elif answer[position] == "}":
            depth -= 1
            if depth == 0:
                return answer[index:position].strip()
    return answer.strip()  # unbalanced: leave it for the verifier to reject


def parse_inline_choices(question: str) -> Optional[list[str]]:
    """Options written as lines ``A. ...`` / ``(B) ...`` / ``C: ...`` in a question, in letter order.

    Returns None unless at least two consecutive letters starting at A are found.
    """
    found: list[str] = []
    for line in question.splitlines():
        match = _INLINE_OPTION.match(line)
        if match and match.group(1) == CHOICE_LETTERS[len(found)]:
            found.append(match.group(2))
    return found if len(found) >= 2 else None


# --------------------------------------------------------------------------------------- ChartQA
def load_chartqa(root: PathLike, split: str = "train", subsets: tuple[str, ...] = ("human", "augmented"),
                 check_images: bool = True) -> tuple[list[Record], LoadReport]:
    """ChartQA ``split`` (``train`` / ``val`` / ``test``), the ``human`` and / or ``augmented`` question sets.

    Numeric labels become ``integer`` / ``float`` answers, the rest ``text``.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"ChartQA split folder not found: {split_dir}")
    report = LoadReport(f"chartqa/{split}")
    records: list[Record] = []
    for subset in subsets:
        annotation = split_dir / f"{split}_{subset}.json"
        if not annotation.exists():
            report.skip("missing_file", f"{annotation} not found")
            continue
        with open(annotation, encoding="utf-8") as handle:
            entries = json.load(handle)
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or any(entry.get(k) is None for k in ("imgname", "query", "label")):
                report.skip("missing_field", f"{annotation}[{index}]: needs imgname, query, label")
                continue
            answer = str(entry["label"]).strip()
            record = Record(
                id=f"chartqa/{split}/{subset}/{index}", source="chartqa",
                images=[str(split_dir / "png" / entry["imgname"])], question=str(entry["query"]).strip(),
                answer=answer, answer_type=infer_answer_type(answer) if answer else None,
                metadata={"split": split, "subset": subset, "imgname": entry["imgname"]})
            keep_if_valid(record, records, report, check_images)
    return records, report


# ------------------------------------------------------------------------------------ Geometry3K
def load_geometry3k(root: PathLike, split: str = "train", check_images: bool = True) -> tuple[list[Record], LoadReport]:
    """Geometry3K ``split``: one multiple-choice record per problem folder (answer = option letter).

    The options are appended to the question text (``Options: A. ..., B. ...``) so the prompt is
    self-contained; ``metadata['choices_in_question']`` says so.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"Geometry3K split folder not found: {split_dir}")
    report = LoadReport(f"geometry3k/{split}")
    records: list[Record] = []
    folders = sorted((p for p in split_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name))
    for folder in folders:
        data_file = folder / "data.json"
        try:
            with open(data_file, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as exc:
            report.skip("missing_file" if isinstance(exc, OSError) else "invalid_json", f"{data_file}: {exc}")
            continue
        if not isinstance(data, dict) or any(data.get(k) is None for k in ("problem_text", "choices", "answer")):
            report.skip("missing_field", f"{data_file}: needs problem_text, choices, answer")
            continue
        choices = [str(c).strip() for c in data["choices"]]
        options = ", ".join(f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(choices))
        question = f"{str(data['problem_text']).strip()} Options: {options}"
        try:
            record = Record(
                id=f"geometry3k/{split}/{data.get('id', folder.name)}", source="geometry3k",
                images=[str(folder / "img_diagram.png")], question=question,
                answer=str(data["answer"]).strip().upper(), answer_type="multiple_choice", choices=choices,
                metadata={"split": split, "problem_id": str(data.get("id", folder.name)), "choices_in_question": True,
                          "problem_type_goal": data.get("problem_type_goal"),
                          "problem_type_graph": data.get("problem_type_graph")})
        except ValueError as exc:
            report.skip("bad_field", f"{data_file}: {exc}")
            continue
        keep_if_valid(record, records, report, check_images)
    return records, report


# -------------------------------------------------------------------------- parquet / JSONL rows
@dataclass
class ColumnMapping:
    """Which columns of a generic table hold which :class:`Record` field."""

    question: str = "question"
    """Column with the question text (``<image>`` placeholders are removed)."""
    answer: str = "answer"
    """Column with the reference answer (a ``\\boxed{}`` wrapper is removed)."""
    images: Optional[str] = "images"
    """Column with the image(s): one or a list of ``{"bytes", "path"}`` structs, bytes, or paths. None = text only."""
    id: Optional[str] = None
    """Column with a unique id; None = the row number."""
    answer_type: Optional[str] = None
    """Column with the answer type; None = inferred from the answer (and choices)."""
    choices: Optional[str] = None
    """Column with the option list; None = parsed from ``A. ...`` lines of the question when present."""
    rationale: Optional[str] = None
    """Column with a reference rationale, if any."""
    metadata: tuple[str, ...] = ()
    """Further columns copied into ``metadata`` (JSON-serialisable values only)."""

    def __post_init__(self) -> None:
        if not self.question or not self.answer:
            raise ValueError("ColumnMapping fields 'question' and 'answer' must name columns")


def _row_images(value: Any, image_root: Optional[Path]) -> list:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    images = []
    for item in items:
        if isinstance(item, dict):  # datasets.Image feature: embedded bytes win over the (often stale) path
            if item.get("bytes"):
                images.append(bytes(item["bytes"]))
                continue
            item = item.get("path")
        if isinstance(item, (bytes, bytearray, memoryview)):
            images.append(bytes(item))
        elif isinstance(item, str) and item:
            path = Path(item)
            images.append(str(path if path.is_absolute() or image_root is None else image_root / path))
        else:
            raise RecordError("missing_image", f"image entry of type {type(item).__name__} has neither bytes nor path")
    return images


def record_from_row(row: dict[str, Any], mapping: ColumnMapping, source: str, row_id: str,
                    image_root: Optional[Path]) -> Record:
    """One table row as a :class:`Record`; raises :class:`RecordError` on a missing / bad field."""
    for column in (mapping.question, mapping.answer):
        if row.get(column) is None:
            raise RecordError("missing_field", f"{source} row {row_id}: missing column {column!r}")
    question = IMAGE_PLACEHOLDER.sub("", str(row[mapping.question])).strip()
    answer = strip_boxed(str(row[mapping.answer]))
    choices = row.get(mapping.choices) if mapping.choices else None
    if choices is not None:
        choices = [str(c) for c in choices]
    elif len(answer) == 1 and answer.upper() in CHOICE_LETTERS:
        choices = parse_inline_choices(question)
        if choices is not None and answer.upper() not in CHOICE_LETTERS[: len(choices)]:
            choices = None
    answer_type = row.get(mapping.answer_type) if mapping.answer_type else None
    if answer_type is None and answer:
        answer_type = infer_answer_type(answer, choices)
    if answer_type == "multiple_choice":
        answer = answer.upper()
    images = _row_images(row.get(mapping.images), image_root) if mapping.images else []
    metadata = {column: row.get(column) for column in mapping.metadata if column in row}
    if choices is not None and mapping.choices is None:
        metadata["choices_in_question"] = True
    try:
        return Record(id=f"{source}/{row.get(mapping.id) if mapping.id else row_id}", source=source, images=images,
                      question=question, answer=answer, answer_type=answer_type, choices=choices,
                      metadata=metadata,
                      rationale=str(row[mapping.rationale]) if mapping.rationale and row.get(mapping.rationale) else None)
    except ValueError as exc:
        raise RecordError("bad_field", f"{source} row {row_id}: {exc}") from exc


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no .parquet files under {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"parquet file not found: {path}")
    return [path]


def _iter_parquet_rows(files: list[Path], columns: list[str], batch_size: int = 256) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for file in files:
        parquet = pq.ParquetFile(file)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        # Batches bound memory: image-embedding releases are gigabytes.
        for batch in parquet.iter_batches(batch_size=batch_size, columns=present):
            yield from batch.to_pylist()


def _load_rows(rows: Iterator[dict[str, Any]], mapping: ColumnMapping, source: str, report: LoadReport,
               image_root: Optional[Path], check_images: bool, limit: Optional[int]) -> list[Record]:
    records: list[Record] = []
    for index, row in enumerate(rows):
        if limit is not None and len(records) >= limit:
            break
        try:
            record = record_from_row(row, mapping, source, str(index), image_root)
        except RecordError as exc:
            report.skip(exc.reason, str(exc))
            continue
        keep_if_valid(record, records, report, check_images)
    return records


def _mapping_columns(mapping: ColumnMapping) -> list[str]:
    named = [mapping.question, mapping.answer, mapping.images, mapping.id, mapping.answer_type, mapping.choices,
             mapping.rationale, *mapping.metadata]
    return [c for c in named if c]


def load_parquet(path: PathLike, mapping: Optional[ColumnMapping] = None, source: str = "parquet",
                 image_root: Optional[PathLike] = None, check_images: bool = True,
                 limit: Optional[int] = None) -> tuple[list[Record], LoadReport]:
    """A parquet file, or every ``*.parquet`` under a folder, through ``mapping``.

    Relative image paths resolve against ``image_root`` (default: the file's / folder's directory).
    """
    path = Path(path)
    mapping = mapping or ColumnMapping()
    files = _parquet_files(path)
    root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    report = LoadReport(source)
    records = _load_rows(_iter_parquet_rows(files, _mapping_columns(mapping)), mapping, source, report, root,
                         check_images, limit)
    return records, report


def load_jsonl_mapped(path: PathLike, mapping: Optional[ColumnMapping] = None, source: str = "jsonl",
                      image_root: Optional[PathLike] = None, check_images: bool = True,
                      limit: Optional[int] = None) -> tuple[list[Record], LoadReport]:
    """A JSONL file in someone else's schema, through ``mapping`` (for our own schema use ``schema.read_jsonl``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    mapping = mapping or ColumnMapping()
    report = LoadReport(source)

    def rows() -> Iterator[dict[str, Any]]:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    report.skip("invalid_json", f"{path}:{line_number}: {exc}")
                    continue
                if isinstance(row, dict):
                    yield row
                else:
                    report.skip("invalid_json", f"{path}:{line_number}: not an object")

    root = Path(image_root) if image_root is not None else path.parent
    return _load_rows(rows(), mapping, source, report, root, check_images, limit), report


VIRL39K_MAPPING = ColumnMapping(question="question", answer="answer", images="image", id="qid",
                                metadata=("category", "source", "PassRate_32BTrained", "PassRate_7BBase"))
"""Columns of the ViRL39K release."""


def load_virl39k(path: PathLike, image_root: Optional[PathLike] = None, check_images: bool = True,
                 limit: Optional[int] = None) -> tuple[list[Record], LoadReport]:
    """ViRL39K parquet (file or folder). ``\\boxed{}`` is removed from answers, ``<image>`` from questions;
    single-letter answers with ``A. ...`` option lines in the question become ``multiple_choice``."""
    records, report = load_parquet(path, VIRL39K_MAPPING, "virl39k", image_root, check_images, limit)
    for record in records:
        # The release's own 'source' column (which upstream corpus) would shadow ours: keep it apart.
        if "source" in record.metadata:
            record.metadata["origin"] = record.metadata.pop("source")
    return records, report


# ------------------------------------------------------------------- LLaVA / ShareGPT conversations
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
CONVERSATION_COLUMNS = ("conversations", "messages")
_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_ANSWER_SPAN = re.compile(r"<answer>(.*?)</answer>", re.S)
_SHAREGPT_MAPPING = ColumnMapping(question="question", answer="answer", images="images", id="id",
                                  rationale="rationale", metadata=("turns",))


def split_reasoning(response: str) -> tuple[Optional[str], str]:
    """``(rationale, answer text)`` of a long-reasoning response.

    ``<answer>`` content is the answer when present; otherwise what follows ``</think>``; otherwise
    the whole response (whose last ``\\boxed{}`` the caller keeps). The rationale is the ``<think>``
    content, else the text before ``<answer>`` / ``</think>``, else the whole response when it ends in
    a ``\\boxed{}`` answer; None for a bare short answer. Raises :class:`RecordError`
    (``unclosed_think``) for a ``<think>`` that never closes (a truncated generation).
    """
    think = _THINK.search(response)
    if think is None and "<think>" in response:
        raise RecordError("unclosed_think", "<think> without </think> (truncated response?)")
    answers = _ANSWER_SPAN.findall(response)
    close = response.find("</think>")
    if answers:
        rationale = think.group(1) if think else response[:response.find("<answer>")]
        answer = answers[-1]
    elif close >= 0:  # '<think>...</think> tail', or a template that opened <think> itself
        rationale = think.group(1) if think else response[:close]
        answer = response[close + len("</think>"):]
    else:
        rationale = response if _BOXED in response else None
        answer = response
    rationale = rationale.strip() if rationale is not None else None
    return rationale or None, answer.strip()


def _message_parts(message: Any, where: str) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise RecordError("bad_conversation", f"{where}: message is {type(message).__name__}, not an object")
    role = message.get("from", message.get("role"))
    text = message.get("value", message.get("content"))
    if not isinstance(role, str) or not isinstance(text, str):
        raise RecordError("bad_conversation", f"{where}: message needs string 'from'/'role' and 'value'/'content'")
    return role.lower(), text


def flatten_conversation(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A conversation row as a flat ``{id, question, answer, rationale, images, turns}`` row: the first
    user turn is the question, the assistant turn after it the response (system turns are skipped,
    later turns counted in ``turns``). Raises :class:`RecordError` (``bad_conversation``,
    ``unclosed_think``) when there is no such pair."""
    conversation = next((row[c] for c in CONVERSATION_COLUMNS if row.get(c) is not None), None)
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise RecordError("bad_conversation", f"{where}: no non-empty 'conversations' / 'messages' list")
    messages = [_message_parts(m, where) for m in conversation]
    user = next((i for i, (role, _) in enumerate(messages) if role in USER_ROLES), None)
    reply = next((i for i, (role, _) in enumerate(messages) if role in ASSISTANT_ROLES and user is not None and i > user),
                 None)
    if user is None or reply is None:
        raise RecordError("bad_conversation", f"{where}: needs a user turn followed by an assistant turn "
                                              f"(roles seen: {sorted({role for role, _ in messages})})")
    rationale, answer = split_reasoning(messages[reply][1])
    images = row.get("images", row.get("image"))
    return {"id": row.get("id"), "question": messages[user][1], "answer": answer, "rationale": rationale,
            "images": images, "turns": len(messages)}


def _conversation_rows(path: Path, report: LoadReport) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` of every row of one .json (a list) / .jsonl / .parquet file."""
    if path.suffix == ".parquet":
        for index, row in enumerate(_iter_parquet_rows([path], ["id", *CONVERSATION_COLUMNS, "image", "images"])):
            yield f"{path}[{index}]", row
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{line_number}", json.loads(line)
                except ValueError as exc:
                    report.skip("invalid_json", f"{path}:{line_number}: {exc}")
    else:
        with open(path, encoding="utf-8") as handle:
            try:
                rows = json.load(handle)
            except ValueError as exc:
                raise ValueError(f"{path}: not a JSON file ({exc}); conversation data is a JSON list, JSONL or parquet") from exc
        if not isinstance(rows, list):
            raise ValueError(f"{path}: top level is {type(rows).__name__}; conversation data is a JSON list of rows")
        for index, row in enumerate(rows):
            yield f"{path}[{index}]", row


def _conversation_files(path: Path) -> list[Path]:
    if path.is_dir():
        # LLaMA-Factory keeps its dataset_info.json (a registry, not data) beside the data files.
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".parquet")
                       and p.name != "dataset_info.json")
        if not files:
            raise FileNotFoundError(f"no .json / .jsonl / .parquet conversation files in {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"conversation file not found: {path}")
    return [path]


def load_sharegpt(path: PathLike, source: Optional[str] = None, image_root: Optional[PathLike] = None,
                  check_images: bool = True, limit: Optional[int] = None) -> tuple[list[Record], LoadReport]:
    """LLaVA / ShareGPT conversation rows (Vision-R1-cold style) as records with a ``rationale``.

    ``path``: a JSON list, JSONL or parquet file, or a folder of them. Each row holds
    ``conversations`` (or ``messages``): ``{"from": "human" | "user" | "gpt" | "assistant" | "system",
    "value": ...}`` or ``{"role", "content"}`` messages, and ``image`` (one path) or ``images`` (a list of
    paths, bytes or ``{"bytes", "path"}`` structs; relative paths resolve against ``image_root``,
    default the file's folder). The first user turn becomes the question (``<image>`` placeholders
    removed, ``A. ...`` option lines parsed as choices), the assistant's reply is split by
    :func:`split_reasoning` into ``rationale`` and answer (a ``\\boxed{}`` wrapper removed).
    Malformed rows are skipped and counted by reason (``invalid_json``, ``bad_conversation``,
    ``unclosed_think``, ``empty_answer``, ``unreadable_image``, ...), never raised.
    """
    files = _conversation_files(Path(path))
    report = LoadReport(source or Path(path).stem)
    records: list[Record] = []
    for file in files:
        root = Path(image_root) if image_root is not None else file.parent
        name = source or file.stem

        def flat_rows() -> Iterator[dict[str, Any]]:
            for index, (where, row) in enumerate(_conversation_rows(file, report)):
                try:
                    if not isinstance(row, dict):
                        raise RecordError("bad_conversation", f"{where}: row is {type(row).__name__}, not an object")
                    flat = flatten_conversation(row, where)
                except RecordError as exc:
                    report.skip(exc.reason, str(exc))
                    continue
                if flat["id"] is None:  # row number; with one source name over several files, also the file
                    flat["id"] = index if source is None else f"{file.stem}/{index}"
                yield flat

        remaining = None if limit is None else limit - len(records)
        if remaining is not None and remaining <= 0:
            break
        records.extend(_load_rows(flat_rows(), _SHAREGPT_MAPPING, name, report, root, check_images, remaining))
    return records, report


# -------------------------------------------------------------------------------------- easy-vqa
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_rationale(answer: str) -> str:
    """A short cold-start rationale in the synthetic tasks' style: what kind of answer it is, then the
    answer (``shape: circle``, ``colour: teal``, ``check: yes``)."""
    kind = "check" if answer in ("yes", "no") else "shape" if answer in EASY_VQA_SHAPES else "colour"
    return f"{kind}: {answer}"


def load_easy_vqa(split: str = "train", limit: Optional[int] = None,
                  check_images: bool = False) -> tuple[list[Record], LoadReport]:
    """The ``easy_vqa`` package's questions (``train`` 38,575 / ``test`` 9,673) over its 64x64 PNG shapes.

    Answers are single words (a colour, a shape, yes / no): ``text``. Images are validated lazily by
    default because the package's files are known good and checking 48k of them costs seconds.
    """
    try:
        import easy_vqa
    except ImportError as exc:
        raise ImportError("the easy_vqa source needs the easy-vqa package: pip install easy-vqa==1.0") from exc
    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        image_paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        texts, answers, image_ids = easy_vqa.get_test_questions()
        image_paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy_vqa split must be train or test, got {split!r}")
    report = LoadReport(f"easy_vqa/{split}")
    records: list[Record] = []
    for index, (text, answer, image_id) in enumerate(zip(texts, answers, image_ids)):
        if limit is not None and len(records) >= limit:
            break
        if image_id not in image_paths:
            report.skip("unreadable_image", f"easy_vqa/{split}/{index}: image {image_id} missing")
            continue
        question = text.strip()
        question = question[0].upper() + question[1:] if question else question
        answer = str(answer).strip()
        record = Record(id=f"easy_vqa/{split}/{index}", source="easy_vqa", images=[image_paths[image_id]],
                        question=question, answer=answer, answer_type="text",
                        metadata={"split": split, "image_id": int(image_id)},
                        rationale=easy_vqa_rationale(answer))
        keep_if_valid(record, records, report, check_images)
    return records, report


SOURCE_LOADERS: dict[str, Callable[..., tuple[list[Record], LoadReport]]] = {
    "chartqa": load_chartqa,
    "geometry3k": load_geometry3k,
    "virl39k": load_virl39k,
    "parquet": load_parquet,
    "jsonl_mapped": load_jsonl_mapped,
    "sharegpt": load_sharegpt,
    "easy_vqa": load_easy_vqa,
}
"""Loaders by name (``tools/prepare_data.py`` selects from these)."""


def get_loader(name: str) -> Callable[..., tuple[list[Record], LoadReport]]:
    if name not in SOURCE_LOADERS:
        raise ValueError(f"unknown source {name!r}; valid: {', '.join(SOURCE_LOADERS)}")
    return SOURCE_LOADERS[name]

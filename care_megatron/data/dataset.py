"""Training / held-out records from a ``DataConfig``, and the resumable prompt iterator the trainer draws from.

:func:`build_records` turns ``data.tasks`` into two record lists:

* a synthetic task name (``count_shapes``, ``tallest_bar``, ``triangle_angle``, ``compare_lengths``, ``shape_color``):
  generated with ``data.seed`` on stream 0 for training and stream 1 for held-out records, so the
  two never share a generator; held-out records that still coincide with a training record
  (same question and pixels, possible at difficulty 1) are replaced;
* ``easy_vqa``: training records sampled from the package's train split, held-out from its test split;
* ``jsonl:<path>``: a unified-schema JSONL file, shuffled with the seed and split into disjoint
  held-out and training parts;
* ``sharegpt:<path>``: LLaVA / ShareGPT conversation rows (JSON list, JSONL, parquet or a folder of
  them; the layout of Vision-R1-cold, see :func:`care_megatron.data.sources.load_sharegpt`), split
  the same way; their records carry the assistant's reasoning as ``rationale``.

``data.train_size`` and ``data.eval_size`` are shared out over the tasks as evenly as possible. When
``data.eval_tasks`` is set (e.g. the ``heldout.jsonl`` that ``tools/prepare_data.py`` writes beside
``train.jsonl``), held-out records come from those tasks instead, and any that coincide with a
training record (same question and images) are dropped and counted.

:class:`PromptIterator` yields ``data.prompts_per_step`` records per step, reshuffling each epoch;
its state (epoch, position, seed) is all the RNG state there is, because each epoch's order is a
pure function of ``(seed, epoch)``. Restoring it makes a resumed run see exactly the prompts an
uninterrupted run would.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from care_megatron.config.schema import ConfigError
from care_megatron.data import synthetic
from care_megatron.data.schema import LoadReport, Record, read_jsonl

TRAIN_STREAM, EVAL_STREAM = 0, 1
JSONL_PREFIX = "jsonl:"
SHAREGPT_PREFIX = "sharegpt:"


@dataclass
class DataSplits:
    """The records a run trains and evaluates on."""

    train: list[Record]
    """Training records, grouped by task in ``data.tasks`` order (the iterator shuffles)."""
    eval: list[Record]
    """Held-out records, disjoint from ``train``."""
    reports: list[LoadReport] = field(default_factory=list)
    """One load report per file-backed task (skipped records by reason)."""


def share_out(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers, larger ones first: ``share_out(10, 3) == [4, 3, 3]``."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def _fingerprint(record: Record) -> str:
    digest = hashlib.sha1(record.question.encode())
    for image in record.images:
        if hasattr(image, "tobytes"):
            digest.update(image.tobytes())
        elif isinstance(image, bytes):
            digest.update(image)
        else:
            digest.update(str(image).encode())
    return digest.hexdigest()


def _synthetic_splits(task: str, train_n: int, eval_n: int, config) -> tuple[list[Record], list[Record]]:
    train = synthetic.generate(task, train_n, config.seed, config.difficulty, config.image_size, TRAIN_STREAM)
    seen = {_fingerprint(r) for r in train}
    held_out: list[Record] = []
    index = 0
    # Bounded: at difficulty 1 a few images can repeat, but never most of them.
    while len(held_out) < eval_n and index < 20 * eval_n + 100:
        record = synthetic.generate_one(task, index, config.seed, config.difficulty[index % len(config.difficulty)],
                                        config.image_size, EVAL_STREAM)
        index += 1
        fingerprint = _fingerprint(record)
        if fingerprint not in seen:
            held_out.append(record)
            seen.add(fingerprint)  # a question counted twice would overstate the held-out set's size
    return train, held_out


def _easy_vqa_splits(train_n: int, eval_n: int, seed: int) -> tuple[list[Record], list[Record], list[LoadReport]]:
    from care_megatron.data.sources import load_easy_vqa

    train_all, train_report = load_easy_vqa("train")
    test_all, test_report = load_easy_vqa("test")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xEA5]))
    train = [train_all[i] for i in rng.choice(len(train_all), size=min(train_n, len(train_all)), replace=False)]
    held_out = [test_all[i] for i in rng.choice(len(test_all), size=min(eval_n, len(test_all)), replace=False)]
    return train, held_out, [train_report, test_report]


def _seeded_split(records: list[Record], train_n: int | None, eval_n: int, seed: int) -> tuple[list[Record], list[Record]]:
    """Shuffle with ``seed``; the first ``eval_n`` are held out, the next ``train_n`` (None: all the rest) train."""
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x150])).permutation(len(records))
    shuffled = [records[i] for i in order]
    held_out = shuffled[:eval_n]
    train = shuffled[eval_n:] if train_n is None else shuffled[eval_n:eval_n + train_n]
    return train, held_out


def _task_splits(task: str, train_n: int, eval_n: int, config, field_name: str):
    """``(train, held_out, load reports)`` of one task spelling."""
    if task in synthetic.TASKS:
        return (*_synthetic_splits(task, train_n, eval_n, config), [])
    if task == "easy_vqa":
        return _easy_vqa_splits(train_n, eval_n, config.seed)
    if task.startswith((JSONL_PREFIX, SHAREGPT_PREFIX)):
        records, report = _load_task_file(task, field_name)
        return (*_seeded_split(records, train_n, eval_n, config.seed), [report])
    valid = ", ".join([*synthetic.TASKS, "easy_vqa", "jsonl:<path>", "sharegpt:<path>"])
    raise ConfigError(field_name, f"unknown task {task!r}; valid: {valid}")


def _load_task_file(task: str, field_name: str) -> tuple[list[Record], LoadReport]:
    """Every usable record of a ``jsonl:`` / ``sharegpt:`` task, or a :class:`ConfigError` naming
    ``field_name`` when the file or folder cannot be read or not one of its records can be used
    (e.g. every image path points into a missing or unreadable folder): a run must not go on
    without a source its config asks for."""
    from care_megatron.data.sources import load_sharegpt

    jsonl = task.startswith(JSONL_PREFIX)
    path = task[len(JSONL_PREFIX if jsonl else SHAREGPT_PREFIX):]
    try:
        records, report = read_jsonl(path) if jsonl else load_sharegpt(path)
    except OSError as exc:  # missing, a folder where a file was expected, no permission, ...
        raise ConfigError(field_name, f"task {task!r}: cannot read {path}: {exc.strerror or exc}; "
                                      f"fix the path (relative paths start at the working directory)") from exc
    if not records:
        detail = "; ".join(report.examples[:2]) or "it holds no rows"
        raise ConfigError(field_name, f"task {task!r}: no usable record in {path} ({report.summary()}: {detail}); "
                                      f"fix the file or the image paths / folder it points to")
    return records, report


def build_records(config) -> DataSplits:
    """Training and held-out records for ``config`` (a ``care_megatron.config.schema.DataConfig``)."""
    tasks = list(config.tasks)
    eval_tasks = list(config.eval_tasks)
    train_sizes = share_out(config.train_size, len(tasks))
    eval_sizes = [0] * len(tasks) if eval_tasks else share_out(config.eval_size, len(tasks))
    splits = DataSplits([], [], [])
    for task, train_n, eval_n in zip(tasks, train_sizes, eval_sizes):
        train, held_out, reports = _task_splits(task, train_n, eval_n, config, "data.tasks")
        splits.reports.extend(reports)
        splits.train.extend(train)
        splits.eval.extend(held_out)
    if not splits.train:
        raise ConfigError("data.tasks", "no training records left once the held-out records are set aside; "
                                        "lower data.eval_size, set data.eval_tasks or add records")
    if eval_tasks:
        seen = {_fingerprint(r) for r in splits.train}
        for task, eval_n in zip(eval_tasks, share_out(config.eval_size, len(eval_tasks))):
            _, held_out, reports = _task_splits(task, 0, eval_n, config, "data.eval_tasks")
            overlap = LoadReport(f"{task} (held-out vs training)")
            for record in held_out:
                if _fingerprint(record) in seen:
                    overlap.skip("also_in_training", record.id)
                else:
                    splits.eval.append(record)
            splits.reports.extend(reports + ([overlap] if overlap.num_skipped else []))
    return splits


def build_sft_records(config) -> tuple[list[Record], list[LoadReport]]:
    """Cold-start SFT records (those with a ``rationale``) and the load reports.

    From ``data.sft_tasks`` when set: files (``jsonl:`` / ``sharegpt:``) whole, generated tasks
    ``data.train_size`` shared out over them; records without a rationale are counted under
    ``no_rationale``. Otherwise the rationale-bearing part of the training split of ``data.tasks``.
    """
    sft_tasks = list(config.sft_tasks)
    if not sft_tasks:
        splits = build_records(config)
        return [r for r in splits.train if r.rationale], splits.reports
    records: list[Record] = []
    reports: list[LoadReport] = []
    for task, train_n in zip(sft_tasks, share_out(config.train_size, len(sft_tasks))):
        whole_file = task.startswith((JSONL_PREFIX, SHAREGPT_PREFIX))
        train, _, task_reports = _task_splits(task, None if whole_file else train_n, 0, config, "data.sft_tasks")
        without = LoadReport(f"{task} (SFT)")
        for record in train:
            if record.rationale:
                records.append(record)
            else:
                without.skip("no_rationale", record.id)
        reports.extend(task_reports + ([without] if without.num_skipped else []))
    return records, reports


def build_datasets(config) -> tuple[list[Record], list[Record]]:
    """``(train, eval)`` record lists for ``config`` (a ``DataConfig``): :func:`build_records` without the reports."""
    splits = build_records(config)
    return splits.train, splits.eval


class PromptIterator:
    """Endless, epoch-shuffled batches of ``prompts_per_step`` records; resumable exactly.

    A batch that runs past the end of an epoch is completed from the next epoch's order, so every
    step has the same number of prompts and every record is seen once per epoch.
    """

    def __init__(self, records: Sequence[Record], prompts_per_step: int, seed: int = 0, shuffle: bool = True):
        if len(records) == 0:
            raise ValueError("PromptIterator needs at least one record")
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        self.records = list(records)
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.records))
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(len(self.records))

    def __iter__(self) -> Iterator[list[Record]]:
        return self

    def __next__(self) -> list[Record]:
        batch: list[Record] = []
        while len(batch) < self.prompts_per_step:
            if self.position == len(self.records):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(self.prompts_per_step - len(batch), len(self.records) - self.position)
            batch.extend(self.records[int(i)] for i in self._order[self.position:self.position + take])
            self.position += take
        return batch

    def next_batch(self) -> list[Record]:
        """The next step's ``prompts_per_step`` records (same as ``next(iterator)``)."""
        return self.__next__()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the epoch's order is re-derived from ``(seed, epoch)``."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_records": len(self.records), "prompts_per_step": self.prompts_per_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the record list must be the one the state was saved with (same length)."""
        if int(state["num_records"]) != len(self.records):
            raise ValueError(f"PromptIterator state is for {state['num_records']} records, this iterator has "
                             f"{len(self.records)}: the dataset changed since the checkpoint")
        if not 0 <= int(state["position"]) <= len(self.records):
            raise ValueError(f"PromptIterator state position {state['position']} out of range")
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", True))
        self.prompts_per_step = int(state.get("prompts_per_step", self.prompts_per_step))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)

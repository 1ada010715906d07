#!/usr/bin/env python
"""Merge public VQA sources into one deduplicated training mixture (unified JSONL + image folder).

Example (the paper's mixture, from local copies of the releases)::

    python tools/prepare_data.py --chartqa data/ChartQA --geometry3k data/geometry3k \\
        --virl39k data/ViRL39K/39Krelease.parquet --out /data/care_mixture

Sources are loaded in the order ChartQA, Geometry3K, ViRL39K, generic parquet, JSONL, easy-vqa;
deduplication keeps the first occurrence, so earlier sources win ties. Prints a per-source table
(loaded, skipped, duplicates removed, kept, share) beside the paper's counts (ChartQA 7,398 /
Geometry3K 2,101 / ViRL39K 38,870 = 48,369).

Writes ``<out>/train.jsonl`` (what the paper configs train on: ``data.tasks:
["jsonl:<out>/train.jsonl"]``), ``<out>/heldout.jsonl`` (``--heldout`` records, drawn per source in
proportion to its share with ``--seed``, disjoint from training; ``data.eval_tasks:
["jsonl:<out>/heldout.jsonl"]``), ``<out>/images/`` (shared by both files) and ``<out>/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
# Runs as a script from a source checkout as well as with the package installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from care_megatron.data.dedup import DedupReport, deduplicate  # noqa: E402
from care_megatron.data.schema import LoadReport, Record, read_jsonl, write_jsonl  # noqa: E402
from care_megatron.data.sources import (  # noqa: E402
    ColumnMapping,
    load_chartqa,
    load_easy_vqa,
    load_geometry3k,
    load_parquet,
    load_virl39k,
)

PAPER_COUNTS = {"chartqa": 7398, "geometry3k": 2101, "virl39k": 38870}
"""Per-source training counts reported in the paper (total 48,369)."""
TRAIN_FILE, HELDOUT_FILE = "train.jsonl", "heldout.jsonl"
DEFAULT_HELDOUT = 512
"""Held-out records by default: the paper configs' ``data.eval_size``."""


@dataclass
class SourceRow:
    """One line of the mixture table."""

    name: str
    loaded: int
    skipped: int
    duplicates: int = 0
    kept: int = 0
    skip_reasons: dict = field(default_factory=dict)


@dataclass
class MixtureSummary:
    rows: list[SourceRow]
    total: int
    dedup: DedupReport


def build_mixture(sources: list[tuple[str, list[Record], LoadReport]], max_hamming: int = 0) -> tuple[list[Record], MixtureSummary]:
    """Concatenate ``sources`` in order, deduplicate across all of them, and tabulate per source.

    ``sources`` holds ``(name, records, load report)``; each record's ``source`` is set to ``name``
    so the table and the mixture agree.
    """
    merged: list[Record] = []
    rows: list[SourceRow] = []
    for name, records, report in sources:
        for record in records:
            record.source = name
        merged.extend(records)
        rows.append(SourceRow(name, len(records), report.num_skipped, skip_reasons=dict(report.skipped)))
    kept, dedup = deduplicate(merged, max_hamming=max_hamming)
    kept_by_source: dict[str, int] = {}
    for record in kept:
        kept_by_source[record.source] = kept_by_source.get(record.source, 0) + 1
    for row in rows:
        row.duplicates = dedup.removed_by_source.get(row.name, 0)
        row.kept = kept_by_source.get(row.name, 0)
    return kept, MixtureSummary(rows, len(kept), dedup)


def split_heldout(records: list[Record], heldout: int, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """``(train, held_out)``: ``heldout`` records drawn without replacement, each source contributing in
    proportion to its share of ``records`` (largest remainders round), the rest for training.

    Both lists keep the input order. The draw depends only on ``seed`` and the input, so a rerun
    writes the same split. ValueError when ``heldout`` would leave no training record.
    """
    if heldout < 0 or (records and heldout >= len(records)):
        raise ValueError(f"--heldout must be in [0, {len(records) - 1}] for {len(records)} records, got {heldout}")
    by_source: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_source[record.source].append(index)
    names = sorted(by_source)
    exact = [heldout * len(by_source[name]) / len(records) for name in names] if records else []
    counts = [int(x) for x in exact]
    for position in sorted(range(len(names)), key=lambda i: (counts[i] - exact[i], names[i]))[:heldout - sum(counts)]:
        counts[position] += 1
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for name, count in zip(names, counts):
        chosen.update(int(i) for i in rng.choice(by_source[name], size=count, replace=False))
    train = [r for i, r in enumerate(records) if i not in chosen]
    return train, [r for i, r in enumerate(records) if i in chosen]


def format_table(summary: MixtureSummary) -> str:
    """The per-source table, with the paper's counts where the source is one of the paper's."""
    header = f"{'source':<14}{'loaded':>9}{'skipped':>9}{'dups':>8}{'kept':>9}{'share':>8}{'paper':>9}{'paper %':>9}"
    paper_total = sum(PAPER_COUNTS.values())
    lines = [header, "-" * len(header)]
    for row in summary.rows:
        share = 100.0 * row.kept / summary.total if summary.total else 0.0
        paper = PAPER_COUNTS.get(row.name)
        paper_cells = f"{paper:>9,}{100.0 * paper / paper_total:>8.1f}%" if paper else f"{'-':>9}{'-':>9}"
        lines.append(f"{row.name:<14}{row.loaded:>9,}{row.skipped:>9,}{row.duplicates:>8,}{row.kept:>9,}"
                     f"{share:>7.1f}%{paper_cells}")
    lines.append("-" * len(header))
    loaded = sum(r.loaded for r in summary.rows)
    skipped = sum(r.skipped for r in summary.rows)
    lines.append(f"{'total':<14}{loaded:>9,}{skipped:>9,}{summary.dedup.removed:>8,}{summary.total:>9,}"
                 f"{100.0 if summary.total else 0.0:>7.1f}%{paper_total:>9,}{100.0:>8.1f}%")
    lines.append(f"duplicates across sources: {summary.dedup.cross_source}, "
                 f"with conflicting answers: {summary.dedup.conflicting_answers}, unhashable: {summary.dedup.unhashable}")
    return "\n".join(lines)


def _parse_mapping(text: Optional[str]) -> ColumnMapping:
    if not text:
        return ColumnMapping()
    fields = dict(item.split("=", 1) for item in text.split(",") if item)
    return ColumnMapping(**fields)


def load_requested(args: argparse.Namespace) -> list[tuple[str, list[Record], LoadReport]]:
    check = not args.no_check_images
    sources: list[tuple[str, list[Record], LoadReport]] = []
    if args.chartqa:
        records, report = load_chartqa(args.chartqa, args.chartqa_split, tuple(args.chartqa_subsets), check_images=check)
        sources.append(("chartqa", records, report))
    if args.geometry3k:
        records, report = load_geometry3k(args.geometry3k, args.geometry3k_split, check_images=check)
        sources.append(("geometry3k", records, report))
    if args.virl39k:
        records, report = load_virl39k(args.virl39k, image_root=args.virl39k_image_root, check_images=check)
        sources.append(("virl39k", records, report))
    for path in args.parquet or []:
        records, report = load_parquet(path, _parse_mapping(args.parquet_mapping), source=Path(path).stem,
                                       check_images=check)
        sources.append((Path(path).stem, records, report))
    for path in args.jsonl or []:
        records, report = read_jsonl(path, check_images=check)
        sources.append((Path(path).stem, records, report))
    if args.easy_vqa:
        records, report = load_easy_vqa("train", limit=args.easy_vqa)
        sources.append(("easy_vqa", records, report))
    return sources


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chartqa", help="ChartQA release root (holding train/ val/ test/)")
    parser.add_argument("--chartqa-split", default="train")
    parser.add_argument("--chartqa-subsets", nargs="+", default=["human", "augmented"])
    parser.add_argument("--geometry3k", help="Geometry3K root (holding train/ val/ test/)")
    parser.add_argument("--geometry3k-split", default="train")
    parser.add_argument("--virl39k", help="ViRL39K parquet file or folder")
    parser.add_argument("--virl39k-image-root", help="folder that image paths in the ViRL39K parquet are relative to "
                        "(default: the parquet's folder; images embedded as bytes need none)")
    parser.add_argument("--parquet", action="append", help="generic parquet file / folder (repeatable)")
    parser.add_argument("--parquet-mapping", help="column mapping for --parquet, e.g. question=problem,answer=solution,images=images")
    parser.add_argument("--jsonl", action="append", help="unified-schema JSONL (repeatable)")
    parser.add_argument("--easy-vqa", type=int, default=0, help="add this many easy-vqa training questions")
    parser.add_argument("--max-hamming", type=int, default=0, help="perceptual-hash bits two images may differ by and still match")
    parser.add_argument("--no-check-images", action="store_true", help="skip decoding every image at load time")
    parser.add_argument("--heldout", type=int, default=DEFAULT_HELDOUT,
                        help=f"records set aside in {HELDOUT_FILE}, per source in proportion (default {DEFAULT_HELDOUT})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    parser.add_argument("--out", required=True, help=f"output folder ({TRAIN_FILE}, {HELDOUT_FILE}, images/, summary.json)")
    args = parser.parse_args(argv)

    sources = load_requested(args)
    if not sources:
        parser.error("name at least one source")
    for _, _, report in sources:
        print(report.summary())
        for example in report.examples[:3]:
            print(f"  e.g. {example}")
    mixture, summary = build_mixture(sources, args.max_hamming)
    print(format_table(summary))
    try:
        train, heldout = split_heldout(mixture, args.heldout, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = write_jsonl(train, out / TRAIN_FILE)
    written_heldout = write_jsonl(heldout, out / HELDOUT_FILE)
    heldout_by_source: dict[str, int] = {}
    for record in heldout:
        heldout_by_source[record.source] = heldout_by_source.get(record.source, 0) + 1
    summary_json = {
        "total": summary.total,
        "sources": [row.__dict__ for row in summary.rows],
        "duplicates_removed": summary.dedup.removed,
        "cross_source_duplicates": summary.dedup.cross_source,
        "conflicting_answers": summary.dedup.conflicting_answers,
        "paper_counts": PAPER_COUNTS,
        "train": written,
        "heldout": written_heldout,
        "heldout_by_source": heldout_by_source,
        "heldout_seed": args.seed,
    }
    (out / "summary.json").write_text(json.dumps(summary_json, indent=2))
    print(f"wrote {written} training records to {out / TRAIN_FILE} and {written_heldout} held-out records "
          f"to {out / HELDOUT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cross-corpus deduplication: same question text (normalised) over the same picture (perceptual hash).

Public VQA corpora reuse one another (ViRL39K draws on several older sets, ChartQA charts recur),
so merged mixtures hold the same problem more than once. Two records are duplicates when their
normalised questions are equal and, image by image, their 64-bit perceptual hashes
(``imagehash.phash``) differ in at most ``max_hamming`` bits. A perceptual hash, not a byte hash,
catches the same image re-encoded or resized by another release. The first occurrence is kept, so
the caller orders sources by priority.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional

import imagehash

from care_megatron.data.images import decode_image
from care_megatron.data.schema import ImageRef, Record

_PLACEHOLDER = re.compile(r"<image>|<\|image_pad\|>|<\|vision_start\|>|<\|vision_end\|>")
_NON_WORD = re.compile(r"[^\w]+")
HASH_BITS = 64


def normalize_question(text: str) -> str:
    """Lower-case, Unicode-NFKC, image placeholders and punctuation removed, whitespace collapsed.

    ``"What is  the VALUE of <image> x?"`` -> ``"what is the value of x"``.
    """
    text = unicodedata.normalize("NFKC", text)
    text = _PLACEHOLDER.sub(" ", text).lower()
    return " ".join(_NON_WORD.sub(" ", text).split())


def image_hash(ref: ImageRef, hash_size: int = 8) -> imagehash.ImageHash:
    """Perceptual hash (DCT, ``hash_size**2`` bits) of the decoded RGB image."""
    return imagehash.phash(decode_image(ref), hash_size=hash_size)


@dataclass
class DedupReport:
    """What :func:`deduplicate` removed."""

    total: int = 0
    """Records examined."""
    kept: int = 0
    """Records kept (first occurrences)."""
    removed_by_source: Counter = field(default_factory=Counter)
    """Removed duplicates counted by the removed record's source."""
    cross_source: int = 0
    """Removed records whose kept twin came from another source."""
    conflicting_answers: int = 0
    """Removed records whose answer differs from their kept twin's (worth a look: label noise)."""
    unhashable: int = 0
    """Records dropped because an image could not be decoded for hashing."""
    pairs: list[tuple[str, str]] = field(default_factory=list)
    """First few ``(removed id, kept id)`` pairs, for the log."""

    @property
    def removed(self) -> int:
        return int(sum(self.removed_by_source.values()))


def _close(a: list[imagehash.ImageHash], b: list[imagehash.ImageHash], max_hamming: int) -> bool:
    return len(a) == len(b) and all(x - y <= max_hamming for x, y in zip(a, b))


def deduplicate(records: Iterable[Record], max_hamming: int = 0, hash_size: int = 8,
                max_pairs: int = 20) -> tuple[list[Record], DedupReport]:
    """Keep the first of every group of duplicates (see module docstring); order is preserved.

    ``max_hamming`` = 0 means identical hashes; 4-6 of 64 bits also catches recompressed copies.
    Records are compared only inside buckets of equal normalised question and image count, so the
    cost is linear in practice.
    """
    if not 0 <= max_hamming < hash_size * hash_size:
        raise ValueError(f"max_hamming must be in [0, {hash_size * hash_size}), got {max_hamming}")
    report = DedupReport()
    buckets: dict[tuple[str, int], list[tuple[list[imagehash.ImageHash], Record]]] = defaultdict(list)
    kept: list[Record] = []
    for record in records:
        report.total += 1
        try:
            hashes = [image_hash(image, hash_size) for image in record.images]
        except Exception:  # an undecodable image: the record is unusable anyway
            report.unhashable += 1
            continue
        bucket = buckets[(normalize_question(record.question), len(hashes))]
        twin: Optional[Record] = None
        if max_hamming == 0:
            twin = next((r for h, r in bucket if h == hashes), None)
        else:
            twin = next((r for h, r in bucket if _close(h, hashes, max_hamming)), None)
        if twin is None:
            bucket.append((hashes, record))
            kept.append(record)
            continue
        report.removed_by_source[record.source] += 1
        report.cross_source += int(twin.source != record.source)
        report.conflicting_answers += int(twin.answer.strip().lower() != record.answer.strip().lower())
        if len(report.pairs) < max_pairs:
            report.pairs.append((record.id, twin.id))
    report.kept = len(kept)
    return kept, report

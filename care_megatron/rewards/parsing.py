"""Reading a response: ``<think>`` / ``<answer>`` spans, format validity and per-token regions.

Spec: CARE_SPEC.md section 1 (the verifier reads only the answer span; format = exactly one think
span followed by exactly one answer span, nothing but whitespace outside) and section 6 (token
regions: tags count to their span).

Parsing is linear in the length of the response: tags are located with one regex made only of
literal alternatives (no nested quantifiers, so no backtracking blow-up), and spans are resolved
by a single pass over the located tags. A 100k-character response parses in milliseconds, also
when it is made of 14k repeated tags (``tools/bench_verifier.py`` prints the numbers).

The rationale tag is ``<think>`` by default and ``<reasoning>`` for Qwen3-VL-8B (the paper's appendix
8.2); a run picks it with ``data.think_tag``, turned into a :class:`TagConfig` by :func:`tags_for`. Every
function here takes that ``tags`` argument; the rules below are written for ``<think>``.

Rules, decided here because the paper is silent:

* Think span: from the first opening think tag to the first closing think tag after it. An
  unclosed think (a truncated response) runs to the first answer tag after it, or to the end;
  ``think_closed`` is then False. With ``TagConfig.think_open_in_prompt`` (chat templates that put
  ``<think>`` into the generation prompt, as Qwen3 thinking templates do) the response starts inside
  the think span and only the closing tag is expected.
* Answer span: the first *complete* ``<answer>...</answer>`` after the think span; if there is none
  there (answer written before the rationale), the first complete one before the think span. An
  opening answer tag with no closing tag (truncation) gives no answer span.
* Format is valid only when each of the four tags occurs exactly once, in the order think-open,
  think-close, answer-open, answer-close, with only whitespace before, between and after the spans.
  A tag *mentioned* inside the rationale therefore breaks the format: the strict reading is the one
  that cannot be gamed by emitting extra tags.
* ``answer_has_tags``: the answer text itself contains a tag string (e.g. nested
  ``<answer>`` tags). The verifier refuses to grade such an answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Optional, Sequence, Union

from care_megatron.rewards.regions import Region

if TYPE_CHECKING:  # torch is imported lazily so verifier pool workers start fast
    import torch

Span = tuple[int, int]


@dataclass(frozen=True)
class TagConfig:
    """Tag names delimiting the rationale and the final answer."""

    think_tag: str = "think"
    """Name of the rationale tag: ``think`` gives ``<think>...</think>``; Qwen3-VL prompts that use
    ``<reasoning>`` set ``reasoning``."""
    answer_tag: str = "answer"
    """Name of the final-answer tag: ``answer`` gives ``<answer>...</answer>``."""
    think_open_in_prompt: bool = False
    """True when the chat template already emitted the opening think tag in the prompt, so the
    response starts inside the rationale and must not contain the opening tag itself."""

    def __post_init__(self) -> None:
        for name in ("think_tag", "answer_tag"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or any(c in value for c in "<>/ \t\n"):
                raise ValueError(f"TagConfig.{name} must be a non-empty tag name without '<', '>', '/' or spaces, got {value!r}")
        if self.think_tag == self.answer_tag:
            raise ValueError(f"TagConfig.answer_tag must differ from think_tag, both are {self.think_tag!r}")

    @property
    def think_open(self) -> str:
        return f"<{self.think_tag}>"

    @property
    def think_close(self) -> str:
        return f"</{self.think_tag}>"

    @property
    def answer_open(self) -> str:
        return f"<{self.answer_tag}>"

    @property
    def answer_close(self) -> str:
        return f"</{self.answer_tag}>"

    @property
    def all_tags(self) -> tuple[str, str, str, str]:
        return (self.think_open, self.think_close, self.answer_open, self.answer_close)


DEFAULT_TAGS = TagConfig()
"""``<think>`` / ``<answer>``: the tags of the CARE prompt template."""

REASONING_TAGS = TagConfig(think_tag="reasoning")
"""``<reasoning>`` / ``<answer>``: the Qwen3-VL-8B variant (CARE paper, appendix 8.2: "positive <think>
(note: <reasoning> with Qwen3VL-8B) tokens")."""

THINK_TAGS: dict[str, TagConfig] = {"think": DEFAULT_TAGS, "reasoning": REASONING_TAGS}
"""The values of the run config's ``data.think_tag`` and the tags each one selects. This is the one place
the rationale tag of a run is decided: the system prompt, the SFT targets, the format reward, the token
regions (and so the region weights, the think embeddings and ``length/think_mean``), the RGR prefix and
the evaluations all read the :class:`TagConfig` returned by :func:`tags_for`."""


def tags_for(think_tag: str) -> TagConfig:
    """The :class:`TagConfig` of ``data.think_tag`` (``think`` or ``reasoning``); ValueError naming the
    valid values otherwise."""
    try:
        return THINK_TAGS[think_tag]
    except (KeyError, TypeError):
        raise ValueError(f"think_tag must be one of {', '.join(THINK_TAGS)}, got {think_tag!r}") from None


@dataclass(frozen=True)
class ParsedResponse:
    """What a response contains. Spans are ``(start, end)`` character offsets, end exclusive, and
    include the tags (spec section 6: tags count to their span)."""

    text: str
    """The response as given."""
    think: Optional[str]
    """Rationale text between the think tags (unclosed: up to the answer tag or the end); None when
    there is no think span."""
    answer: Optional[str]
    """Text between the answer tags, not stripped; None when there is no complete answer span."""
    think_span: Optional[Span]
    """Character span of the rationale, tags included."""
    answer_span: Optional[Span]
    """Character span of the answer, tags included."""
    format_ok: bool
    """Section 1 format: exactly one think span then exactly one answer span, whitespace outside."""
    think_closed: bool = False
    """The think span ends with its closing tag (False for an unclosed or missing think)."""
    answer_has_tags: bool = False
    """The answer text contains a tag string (nested or repeated tags); the verifier rejects it."""
    problems: tuple[str, ...] = field(default_factory=tuple)
    """Why the format is invalid (empty when ``format_ok``); human-readable, for logs."""


@lru_cache(maxsize=16)
def _tag_regex(tags: TagConfig) -> re.Pattern[str]:
    # Literal alternatives only: the regex engine never backtracks more than one tag length.
    return re.compile("|".join(re.escape(t) for t in tags.all_tags))


def parse_response(text: str, tags: TagConfig = DEFAULT_TAGS) -> ParsedResponse:
    """Split a response into its think and answer spans and judge its format (spec section 1).

    Never raises on model output: a non-string ``text`` is treated as an empty response.
    Linear time in ``len(text)``.
    """
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    kinds = {tags.think_open: 0, tags.think_close: 1, tags.answer_open: 2, tags.answer_close: 3}
    found: list[tuple[int, int, int]] = [(kinds[m.group(0)], m.start(), m.end()) for m in _tag_regex(tags).finditer(text)]
    counts = [0, 0, 0, 0]
    for kind, _, _ in found:
        counts[kind] += 1
    problems: list[str] = []

    # --- think span -------------------------------------------------------------------------
    think_span: Optional[Span] = None
    think_inner: Optional[Span] = None
    think_closed = False
    if tags.think_open_in_prompt:
        think_start, inner_start = 0, 0
    else:
        first_open = next((t for t in found if t[0] == 0), None)
        think_start, inner_start = (first_open[1], first_open[2]) if first_open else (-1, -1)
    if think_start >= 0:
        close = next((t for t in found if t[0] == 1 and t[1] >= inner_start), None)
        if close is not None:
            think_span, think_inner, think_closed = (think_start, close[2]), (inner_start, close[1]), True
        else:
            stop = next((t[1] for t in found if t[0] == 2 and t[1] >= inner_start), len(text))
            think_span, think_inner = (think_start, stop), (inner_start, stop)
            # With the opening tag in the prompt and no closing tag, the response holds no think
            # span we can vouch for: report it only if there is some text.
            if tags.think_open_in_prompt and stop == 0:
                think_span = think_inner = None

    # --- answer span ------------------------------------------------------------------------
    answer_span: Optional[Span] = None
    answer_inner: Optional[Span] = None

    def first_complete_answer(lo: int, hi: int) -> Optional[tuple[Span, Span]]:
        for i, (kind, start, end) in enumerate(found):
            if kind != 2 or start < lo or end > hi:
                continue
            close = next((t for t in found[i + 1 :] if t[0] == 3), None)
            if close is not None and close[2] <= hi:
                return (start, close[2]), (end, close[1])
            return None
        return None

    if think_span is not None:
        hit = first_complete_answer(think_span[1], len(text)) or first_complete_answer(0, think_span[0])
    else:
        hit = first_complete_answer(0, len(text))
    if hit is not None:
        answer_span, answer_inner = hit

    answer = text[answer_inner[0] : answer_inner[1]] if answer_inner else None
    answer_has_tags = answer is not None and _tag_regex(tags).search(answer) is not None

    # --- format -----------------------------------------------------------------------------
    expected_counts = (0 if tags.think_open_in_prompt else 1, 1, 1, 1)
    for kind, tag in enumerate(tags.all_tags):
        if counts[kind] != expected_counts[kind]:
            problems.append(f"{tag} occurs {counts[kind]} times (expected {expected_counts[kind]})")
    if not problems:
        order = [t[0] for t in found]
        expected_order = [1, 2, 3] if tags.think_open_in_prompt else [0, 1, 2, 3]
        if order != expected_order:
            problems.append("tags out of order (expected think, then answer)")
        else:
            start_of_think = 0 if tags.think_open_in_prompt else found[0][1]
            outside = (text[:start_of_think], text[found[-3][2] : found[-2][1]], text[found[-1][2] :])
            if any(part.strip() for part in outside):
                problems.append("non-whitespace text outside the think and answer spans")

    think = text[think_inner[0] : think_inner[1]] if think_inner else None
    return ParsedResponse(
        text=text,
        think=think,
        answer=answer,
        think_span=think_span,
        answer_span=answer_span,
        format_ok=not problems,
        think_closed=think_closed,
        answer_has_tags=answer_has_tags,
        problems=tuple(problems),
    )


OffsetsLike = Union["torch.Tensor", Sequence[Sequence[int]]]


def token_regions(offsets: OffsetsLike, parsed: ParsedResponse) -> "torch.Tensor":
    """Region code of each response token (spec section 6).

    Args:
        offsets: ``[T, 2]`` character ``(start, end)`` of each response token in ``parsed.text``, as
            a fast tokenizer's ``return_offsets_mapping`` gives them (tensor or nested sequence).
            Tokens with an empty range (``start == end``, e.g. special tokens added by the
            tokenizer) are OTHER.
        parsed: the parse of the same text.

    Returns:
        LongTensor ``[T]`` of :class:`~care_megatron.rewards.regions.Region` codes: THINK for tokens
        overlapping the think span, ANSWER for tokens overlapping the answer span (tags included),
        OTHER elsewhere. A token straddling both spans (a BPE merge of ``</think>`` and
        ``<answer>`` characters) is ANSWER, because answer tokens always carry loss weight. A
        response with no answer span simply has no ANSWER tokens; the loss decides what that means.
    """
    import torch

    off = torch.as_tensor(offsets, dtype=torch.long)
    if off.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if off.dim() != 2 or off.shape[-1] != 2:
        raise ValueError(f"offsets must have shape [T, 2], got {tuple(off.shape)}")
    start, end = off[:, 0], off[:, 1]
    nonempty = end > start
    regions = torch.full((off.shape[0],), int(Region.OTHER), dtype=torch.long)
    for span, code in ((parsed.think_span, Region.THINK), (parsed.answer_span, Region.ANSWER)):
        if span is None:
            continue
        overlaps = nonempty & (start < span[1]) & (end > span[0])
        regions[overlaps] = int(code)
    return regions


def token_char_offsets(token_ids: Sequence[int], tokenizer) -> list[tuple[int, int]]:
    """Character offsets of generated tokens in their decoded text, without re-tokenising.

    A rollout engine returns token ids; re-encoding the decoded string may produce different
    tokens, so this maps each given token to its characters instead. Works for byte-level BPE
    tokenizers (Qwen, GPT-2 style; an HF fast tokenizer or a ``tokenizers.Tokenizer``): each token's
    bytes are recovered from its byte-level string, and a token spans every character it holds
    any byte of (so two tokens splitting one character both span it, as a fast tokenizer's
    offset mapping does). Special tokens (e.g. ``<|im_end|>``) own their literal text. Linear time.

    Returns:
        ``[(start, end)]`` per token into ``decode(token_ids)`` with special tokens kept verbatim.
    """
    return _offsets_and_text(token_ids, tokenizer)[0]


def regions_from_token_ids(
    token_ids: Sequence[int], tokenizer, tags: TagConfig = DEFAULT_TAGS
) -> tuple["torch.Tensor", ParsedResponse]:
    """Regions of generated tokens straight from their ids (what a rollout engine returns).

    Decodes the ids (special tokens kept), parses the text and maps each token to its region via
    :func:`token_char_offsets`. Special tokens of the tokenizer (eos, ``<|im_end|>``) are OTHER.
    Returns ``(LongTensor [T] of Region codes, ParsedResponse)``.
    """
    offsets, text = _offsets_and_text(token_ids, tokenizer)
    parsed = parse_response(text, tags)
    regions = token_regions(offsets, parsed)
    # Special tokens (eos, <|im_end|>) are template tokens: OTHER even inside an unclosed rationale.
    raw = tokenizer._tokenizer if hasattr(tokenizer, "_tokenizer") else tokenizer
    special = {i for i, t in raw.get_added_tokens_decoder().items() if getattr(t, "special", False)}
    for position, tid in enumerate(token_ids):
        if int(tid) in special:
            regions[position] = int(Region.OTHER)
    return regions, parsed


def _offsets_and_text(token_ids: Sequence[int], tokenizer) -> tuple[list[tuple[int, int]], str]:
    byte_decoder = _byte_decoder()
    raw = tokenizer._tokenizer if hasattr(tokenizer, "_tokenizer") else tokenizer  # HF fast -> tokenizers
    pieces: list[bytes] = []
    for tid in token_ids:
        tok = raw.id_to_token(int(tid))
        if tok is None:
            pieces.append(b"")
        elif all(c in byte_decoder for c in tok):
            pieces.append(bytes(byte_decoder[c] for c in tok))
        else:  # added / special tokens are stored as plain text
            pieces.append(tok.encode("utf-8"))
    blob = b"".join(pieces)
    # char index of each byte: a char starts at every byte that is not a UTF-8 continuation byte.
    # (Matches decode(errors="replace") for valid UTF-8 and for a character cut off at the end.)
    char_of_byte = []
    chars = -1
    for b in blob:
        if b & 0xC0 != 0x80:
            chars += 1
        char_of_byte.append(max(chars, 0))
    total_chars = chars + 1
    offsets = []
    pos = 0
    for piece in pieces:
        lo, hi = pos, pos + len(piece)
        pos = hi
        if lo == hi:
            offsets.append((char_of_byte[lo] if lo < len(blob) else total_chars,) * 2)
            continue
        # like a fast tokenizer: a token spans every character any of whose bytes it holds
        offsets.append((char_of_byte[lo], char_of_byte[hi - 1] + 1))
    return offsets, blob.decode("utf-8", errors="replace")


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table byte-level BPE vocabularies are written in
    (printable Latin-1 bytes map to themselves, the rest to 256, 257, ... in byte order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of :func:`byte_to_unicode`."""
    return {c: b for b, c in byte_to_unicode().items()}

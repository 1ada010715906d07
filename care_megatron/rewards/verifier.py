"""The programmatic verifier of CARE_SPEC.md section 1: accuracy, format and overall reward.

The verifier reads **only the answer span** of a response. Accuracy is judged by answer type:

* ``multiple_choice``: ``B``, ``(B)``, ``B.``, ``Option B``, ``the answer is B``, ``B. <option
  text>`` and the option text itself all select option B; the ground truth may be the letter or
  the option's text;
* ``integer`` / ``float``: thousands separators, units, ``%`` and currency stripped; fractions
  (``1/2``, ``\\frac{1}{2}``), scientific notation (``1.5e3``, ``1.5 \\times 10^{3}``); integers
  compare exactly, floats within a relative tolerance (1e-4 by default); an answer that is not a
  plain number falls back to symbolic equivalence (``\\sqrt{4}`` == 2);
* ``latex``: numeric fast path, then symbolic equivalence through HF ``math-verify`` with a hard
  time limit (see :mod:`care_megatron.rewards.math_equivalence`);
* ``text``: Unicode NFKC, case, punctuation, articles and whitespace normalised, then exact match
  (numbers inside compare numerically when both sides are a single number).

``overall = (1 - w_fmt) * accuracy + w_fmt * format`` with ``w_fmt = 0.1`` by default. Nothing here
raises on model output: a response that cannot be graded scores accuracy 0 with a ``reason``.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Mapping, Optional, Sequence, Union

from care_megatron.rewards.math_equivalence import MATH_TIMEOUT, math_equal, math_value
from care_megatron.rewards.parsing import DEFAULT_TAGS, TagConfig, parse_response

ANSWER_TYPES = ("multiple_choice", "integer", "float", "text", "latex")
"""Answer types the verifier grades."""

_TYPE_ALIASES = {
    "multiple_choice": "multiple_choice",
    "multi_choice": "multiple_choice",  # MathVista's question_type
    "multiple-choice": "multiple_choice",
    "mc": "multiple_choice",
    "choice": "multiple_choice",
    "integer": "integer",
    "int": "integer",
    "float": "float",
    "number": "float",
    "numeric": "float",
    "text": "text",
    "str": "text",
    "string": "text",
    "free_form": None,  # MathVista's question_type: infer from the ground truth
    "latex": "latex",
    "math": "latex",
    "expression": "latex",
    "list": "latex",  # math-verify compares tuples / sets
}

Choices = Union[Sequence[str], Mapping[str, str], None]


@dataclass(frozen=True)
class VerifierConfig:
    """Knobs of the verifier; the defaults are the spec's."""

    format_weight: float = 0.1
    """w_fmt in ``overall = (1 - w_fmt) * accuracy + w_fmt * format`` (spec section 1)."""
    rel_tol: float = 1e-4
    """Relative tolerance for ``float`` answers."""
    abs_tol: float = 1e-9
    """Absolute tolerance for ``float`` answers (so a ground truth of 0 can be matched)."""
    round_to_truth_decimals: bool = False
    """MathVista's convention for ``float`` answers: a ground truth written with k decimals also
    accepts a prediction that rounds to it at k decimals (``1.52`` for ``1.5``). Off by default:
    the spec's rule is the relative tolerance alone."""
    math_timeout_s: float = 5.0
    """Wall-clock limit of one symbolic comparison, seconds; a timeout scores 0."""
    max_answer_chars: int = 2000
    """Answers longer than this are not graded (accuracy 0): a final answer is short, and this
    bounds the cost of one pathological response."""
    tags: TagConfig = DEFAULT_TAGS
    """Tag names of the think / answer spans."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.format_weight <= 1.0:
            raise ValueError(f"VerifierConfig.format_weight must be in [0, 1], got {self.format_weight}")
        if not self.rel_tol >= 0:
            raise ValueError(f"VerifierConfig.rel_tol must be >= 0, got {self.rel_tol}")
        if not self.abs_tol >= 0:
            raise ValueError(f"VerifierConfig.abs_tol must be >= 0, got {self.abs_tol}")
        if not self.math_timeout_s > 0:
            raise ValueError(f"VerifierConfig.math_timeout_s must be > 0, got {self.math_timeout_s}")
        if self.max_answer_chars < 1:
            raise ValueError(f"VerifierConfig.max_answer_chars must be >= 1, got {self.max_answer_chars}")
        if not isinstance(self.tags, TagConfig):
            raise ValueError(f"VerifierConfig.tags must be a TagConfig, got {type(self.tags).__name__}")


DEFAULT_CONFIG = VerifierConfig()


@dataclass(frozen=True)
class RewardScore:
    """Verdict on one response (spec section 1)."""

    accuracy: float
    """1.0 if the answer span is correct, else 0.0."""
    format: float
    """1.0 if the response is exactly one think span then one answer span, else 0.0."""
    overall: float
    """``(1 - w_fmt) * accuracy + w_fmt * format``: the reward the advantage estimators use."""
    extracted: Optional[str]
    """The answer as the grader read it (a letter, a number, normalised text), None if nothing."""
    reason: str
    """Why the score is what it is, for logs and debugging."""
    answer_type: Optional[str] = None
    """The answer type used to grade (given or inferred)."""
    metrics: dict = field(default_factory=dict, compare=False)
    """Extra scalars a custom reward may report (e.g. a timeout flag); empty by default."""


def combine(accuracy: float, format_score: float, format_weight: float) -> float:
    """``overall = (1 - w_fmt) * accuracy + w_fmt * format`` (spec section 1)."""
    return (1.0 - format_weight) * accuracy + format_weight * format_score


# ---------------------------------------------------------------------------------------------
# Normalisation helpers
# ---------------------------------------------------------------------------------------------

_WRAPPER_COMMANDS = ("boxed", "text", "textbf", "mathrm", "mathbf", "textit", "mbox", "operatorname", "fbox")
_WRAPPER_RE = re.compile(r"\\(?:%s)\s*\{" % "|".join(_WRAPPER_COMMANDS))


def _unwrap_braced_commands(s: str) -> str:
    """Replace ``\\boxed{X}``, ``\\text{X}`` ... by ``X`` (brace-matched, linear per wrapper)."""
    for _ in range(8):  # nested wrappers (\boxed{\text{B}}); bounded
        m = _WRAPPER_RE.search(s)
        if not m:
            return s
        depth, i = 1, m.end()
        while i < len(s) and depth:
            depth += {"{": 1, "}": -1}.get(s[i], 0)
            i += 1
        inner = s[m.end() : i - 1] if depth == 0 else s[m.end() :]
        s = s[: m.start()] + inner + s[i:]
    return s


def _strip_math_delimiters(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


def clean_answer(s: str) -> str:
    """NFKC, math delimiters and ``\\boxed`` / ``\\text`` wrappers removed, outer whitespace and a
    final full stop dropped. Shared first step of every answer type."""
    s = unicodedata.normalize("NFKC", s)
    s = _strip_math_delimiters(s)
    s = _unwrap_braced_commands(s)
    s = _strip_math_delimiters(s)
    s = s.strip()
    if s.endswith(".") and not re.search(r"\d\.$", s[-3:] if len(s) > 2 else s):
        s = s[:-1].rstrip()
    return s


_ARTICLES = {"a", "an", "the"}


def normalize_text(s: str) -> str:
    """Text answers: NFKC, casefold, punctuation to spaces, articles dropped, whitespace collapsed."""
    s = clean_answer(s).casefold()
    s = "".join(" " if unicodedata.category(c).startswith("P") else c for c in s)
    return " ".join(w for w in s.split() if w not in _ARTICLES)


# --- numbers ---------------------------------------------------------------------------------

_NUMBER_RE = re.compile(
    r"""
    (?P<sign>[-+])?\s*
    (?:
        \\[dt]?frac\s*\{\s*(?P<fnum>[-+]?[\d.,]+)\s*\}\s*\{\s*(?P<fden>[-+]?[\d.,]+)\s*\}
      | \\[dt]?frac(?P<fnum1>\d)(?P<fden1>\d)
      | (?P<mant>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)
        (?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?
        (?:
            [eE](?P<exp>[-+]?\d+)
          | \s*(?:\*|x|\\times|\\cdot)\s*10\s*\^\s*\{?\s*(?P<exp2>[-+]?\d+)\s*\}?
        )?
    )
    """,
    re.VERBOSE,
)
# What may follow a number and still be "that number": a unit (cm, m^2, km/h, degrees, dollars).
_UNIT_WORD = r"[^\W\d_]+(?:\s*\^\s*\{?\s*[23]\s*\}?|[²³])?"
_UNIT_RE = re.compile(r"\s*(?:%s(?:\s+%s){0,2}(?:\s*/\s*%s)?)?\s*" % (_UNIT_WORD, _UNIT_WORD, _UNIT_WORD))
_UNICODE_MINUS = str.maketrans({"−": "-", "–": "-", "—": "-", "‐": "-", "×": "x"})
_DROP = ("\\%", "%", "\\$", "$", "€", "£", "¥", "°", "^\\circ", "^{\\circ}", "\\circ", "\\degree", "\\!", "\\,", "\\;", "\\ ", "~")
_MAX_EXPONENT = 400


def _fraction(text: str) -> Optional[Fraction]:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(s: str, allow_units: bool = True) -> Optional[Fraction]:
    """The exact value of a number written as text, or None.

    Accepts ``1,234.5``, ``-3/4``, ``\\frac{1}{2}``, ``1.5e-3``, ``2.5 \\times 10^{3}``, ``50%`` (->
    50: percent signs are stripped, not divided), ``$12``, ``12 cm^2``, ``45°``. Returns None for
    anything else (several numbers, expressions, words).
    """
    s = clean_answer(s).translate(_UNICODE_MINUS)
    for token in _DROP:
        s = s.replace(token, " " if token.startswith("\\") and token != "\\%" else "")
    s = s.strip()
    if not s:
        return None
    m = _NUMBER_RE.match(s)
    if not m or m.end() == 0:
        return None
    rest = s[m.end() :]
    if rest.strip():
        if not allow_units:
            return None
        unit = _UNIT_RE.fullmatch(rest)
        if unit is None:
            return None
    sign = -1 if m.group("sign") == "-" else 1
    if m.group("fnum") is not None or m.group("fnum1") is not None:
        num = _fraction(m.group("fnum") or m.group("fnum1"))
        den = _fraction(m.group("fden") or m.group("fden1"))
        if num is None or not den:
            return None
        return sign * num / den
    value = _fraction(m.group("mant"))
    if value is None:
        return None
    if m.group("den") is not None:
        den = _fraction(m.group("den"))
        if not den:
            return None
        value = value / den
    exp = m.group("exp") or m.group("exp2")
    if exp is not None:
        e = int(exp)
        if abs(e) > _MAX_EXPONENT:
            return None
        value = value * (Fraction(10) ** e)
    return sign * value


def _number_from_answer(s: str) -> tuple[Optional[Fraction], str]:
    """Read the number a numeric answer states: the whole answer, the right-hand side of its last
    ``=``, or the text after "answer is". Returns ``(value, how)``."""
    value = parse_number(s)
    if value is not None:
        return value, "whole answer"
    cleaned = clean_answer(s)
    if "=" in cleaned:
        value = parse_number(cleaned.rsplit("=", 1)[1])
        if value is not None:
            return value, "right of '='"
    m = re.search(r"(?:answer|result)\s*(?:is|:)\s*", cleaned, re.IGNORECASE)
    if m:
        value = parse_number(cleaned[m.end() :])
        if value is not None:
            return value, "after 'answer is'"
    return None, "no single number"


def _numbers_equal(gold: Fraction, pred: Fraction, answer_type: str, cfg: VerifierConfig) -> bool:
    if answer_type == "integer" or gold == pred:
        return gold == pred
    # Exact rational arithmetic: no float overflow on a 1000-digit answer, no rounding surprises.
    return abs(pred - gold) <= max(Fraction(cfg.rel_tol) * max(abs(pred), abs(gold)), Fraction(cfg.abs_tol))


def _to_float(value: Fraction) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.copysign(math.inf, value)


def _written_decimals(text: str) -> Optional[int]:
    """Digits after the decimal point of a plain decimal ground truth ("1.50" -> 2), else None."""
    m = re.fullmatch(r"[-+]?\d[\d,]*\.(\d+)", clean_answer(text))
    return len(m.group(1)) if m else None


def _format_number(value: Fraction) -> str:
    if value.denominator == 1:
        text = str(value.numerator)
        return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"
    try:
        return repr(float(value))
    except OverflowError:
        return f"{value.numerator}/{value.denominator}"[:60]


# --- multiple choice --------------------------------------------------------------------------

_LETTER_ONLY_RE = re.compile(r"\(?\s*([A-Za-z])\s*\)?\s*[.:)]?")
_LETTER_WITH_TEXT_RE = re.compile(r"(?:\(\s*([A-Za-z])\s*\)|([A-Z])\s*[.:)])\s*(\S.*)", re.DOTALL)


def _option_table(choices: Choices) -> dict[str, str]:
    """``{"A": text, "B": text, ...}`` from a list (A, B, ... in order) or a letter -> text mapping."""
    if not choices:
        return {}
    if isinstance(choices, Mapping):
        return {str(k).strip().strip("()").upper(): str(v) for k, v in choices.items()}
    return {chr(ord("A") + i): str(c) for i, c in enumerate(choices) if i < 26}


def _values_equal(a: str, b: str, cfg: VerifierConfig) -> bool:
    """Option text comparison: numerically when both are numbers, else normalised text."""
    na, nb = parse_number(a), parse_number(b)
    if na is not None and nb is not None:
        return _numbers_equal(na, nb, "float", cfg)
    ta, tb = normalize_text(a), normalize_text(b)
    return bool(ta) and ta == tb


def _letter_for_text(text: str, options: dict[str, str], cfg: VerifierConfig) -> Optional[str]:
    hits = [k for k, v in options.items() if _values_equal(text, v, cfg)]
    return hits[0] if len(hits) == 1 else None


def _gold_letter(gold: str, options: dict[str, str], cfg: VerifierConfig) -> Optional[str]:
    g = clean_answer(gold)
    m = _LETTER_ONLY_RE.fullmatch(g)
    if m and (not options or m.group(1).upper() in options) and (m.group(1).isupper() or "(" in g or options):
        return m.group(1).upper()
    if options:
        return _letter_for_text(g, options, cfg)
    return None


_ANSWER_PREFIX_RE = re.compile(
    r"(?:(?:so|thus|therefore|hence)\s*,?\s*)?(?:the\s+)?(?:correct\s+|final\s+|best\s+)?"
    r"(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*(?:option\s+|choice\s+)?",
    re.IGNORECASE,
)


def _pred_letter(answer: str, options: dict[str, str], cfg: VerifierConfig) -> tuple[Optional[str], str]:
    a = clean_answer(answer)
    valid = set(options) if options else {chr(c) for c in range(ord("A"), ord("Z") + 1)}
    candidates = [(a, "letter")]
    prefix = _ANSWER_PREFIX_RE.match(a)
    if prefix and prefix.end() > 0 and prefix.end() < len(a):
        candidates.append((a[prefix.end() :], "'answer is' letter"))
    for text, how in candidates:
        m = _LETTER_ONLY_RE.fullmatch(text)
        # A bare lowercase letter only counts when options are known (else "a" may be an article),
        # or after an explicit "answer is" / "option".
        if m and m.group(1).upper() in valid and (m.group(1).isupper() or options or how != "letter"):
            return m.group(1).upper(), how
        m = _LETTER_WITH_TEXT_RE.fullmatch(text)
        if m:
            letter = (m.group(1) or m.group(2)).upper()
            if letter in valid:
                trailing = m.group(3)
                if options:
                    said = _letter_for_text(trailing, options, cfg)
                    if said is not None and said != letter:
                        return None, f"letter {letter} contradicts option text of {said}"
                return letter, f"{how} with option text"
    if options:
        for text, how in candidates:
            hits = [k for k, v in options.items() if _values_equal(text, v, cfg)]
            if len(hits) == 1:
                return hits[0], "option text"
            if len(hits) > 1:
                return None, f"answer text matches several options ({', '.join(hits)})"
    return None, "no option letter or option text found"


# ---------------------------------------------------------------------------------------------
# Answer-type inference and grading
# ---------------------------------------------------------------------------------------------

# LaTeX commands, super/subscripts, braces, "=", "2x", single-letter algebra ("x+1", "a-b"; not
# the hyphen of "red-blue"), tuples / intervals of numbers.
_LATEX_HINT_RE = re.compile(
    r"\\[A-Za-z]+|[\^_{}=]|\d\s*[a-z]\b|(?<![A-Za-z])[a-z]\s*[-+*/]\s*[\da-z](?![A-Za-z])|\d\s*[-+*/]\s*\d|[\[(]\s*-?[\d.]+\s*,"
)


def infer_answer_type(ground_truth: Any, choices: Choices = None) -> str:
    """Answer type from the ground truth: choices given or a lone capital letter -> multiple_choice;
    a number -> integer / float; something mathematical -> latex; else text."""
    if choices:
        return "multiple_choice"
    if isinstance(ground_truth, bool):
        return "text"
    if isinstance(ground_truth, int):
        return "integer"
    if isinstance(ground_truth, float):
        return "float"
    g = clean_answer(str(ground_truth))
    if re.fullmatch(r"\(?[A-Z]\)?", g):
        return "multiple_choice"
    value = parse_number(g, allow_units=False)
    if value is not None:
        return "integer" if value.denominator == 1 and not re.search(r"\d\.\d", g) else "float"
    if _LATEX_HINT_RE.search(g):
        return "latex"
    return "text"


def _grade_number(answer: str, gold: str, answer_type: str, cfg: VerifierConfig) -> tuple[float, Optional[str], str]:
    gold_value = parse_number(gold)
    if gold_value is None:
        # A ground truth like "\sqrt{2}" labelled float: only symbolic equivalence can judge it.
        return _grade_latex(answer, gold, cfg)
    pred_value, how = _number_from_answer(answer)
    if pred_value is None:
        # "\sqrt{4}", "2^{3}": not a literal number, maybe still equal. Evaluate it and apply the
        # same tolerance; only if that is not possible ask for symbolic equivalence.
        value = math_value(_latex_symbols(clean_answer(answer)), cfg.math_timeout_s)
        if value is not None and value != MATH_TIMEOUT and abs(value.imag) <= cfg.abs_tol and math.isfinite(value.real):
            g = _to_float(gold_value)
            if answer_type == "integer":
                ok = abs(value.real - g) <= 1e-9 * max(1.0, abs(g))
            else:
                ok = math.isclose(value.real, g, rel_tol=cfg.rel_tol, abs_tol=cfg.abs_tol)
            return (1.0 if ok else 0.0), clean_answer(answer), f"evaluates to {value.real:.10g}, {'equals' if ok else 'differs from'} {_format_number(gold_value)}"
        verdict = math_equal(gold, _latex_symbols(clean_answer(answer)), cfg.math_timeout_s)
        if verdict == MATH_TIMEOUT:
            return 0.0, clean_answer(answer), "symbolic comparison timed out"
        if verdict:
            return 1.0, clean_answer(answer), "symbolically equal to the number"
        return 0.0, clean_answer(answer), f"no number in the answer ({how})"
    ok = _numbers_equal(gold_value, pred_value, answer_type, cfg)
    if not ok and answer_type == "float" and cfg.round_to_truth_decimals:
        decimals = _written_decimals(gold)
        if decimals is not None:
            ok = round(_to_float(pred_value), decimals) == round(_to_float(gold_value), decimals)
            how += f", rounded to {decimals} decimals"
    text = _format_number(pred_value)
    tol = "exact" if answer_type == "integer" else f"rel_tol {cfg.rel_tol:g}"
    return (1.0 if ok else 0.0), text, f"number ({how}) {'equals' if ok else 'differs from'} {_format_number(gold_value)} ({tol})"


_UNICODE_MATH = {"∞": "\\infty ", "π": "\\pi ", "√": "\\sqrt", "≤": "\\le ", "≥": "\\ge ", "≠": "\\ne ", "·": "\\cdot ", "∪": "\\cup ", "∩": "\\cap ", "°": "^\\circ "}


def _latex_symbols(text: str) -> str:
    """Unicode math symbols to their LaTeX commands, which math-verify understands."""
    for char, command in _UNICODE_MATH.items():
        if char in text:
            text = text.replace(char, command)
    return text


def _grade_latex(answer: str, gold: str, cfg: VerifierConfig) -> tuple[float, Optional[str], str]:
    pred = clean_answer(answer)
    gold_value, pred_value = parse_number(gold, allow_units=False), parse_number(pred, allow_units=False)
    if gold_value is not None and pred_value is not None:
        ok = _numbers_equal(gold_value, pred_value, "float", cfg)
        return (1.0 if ok else 0.0), _format_number(pred_value), f"numeric {'match' if ok else 'mismatch'}"
    if normalize_text(pred) == normalize_text(gold) and re.sub(r"\s+", "", pred) == re.sub(r"\s+", "", clean_answer(gold)):
        return 1.0, pred, "identical expression"
    verdict = math_equal(_latex_symbols(gold), _latex_symbols(answer.strip()), cfg.math_timeout_s)
    if verdict == MATH_TIMEOUT:
        return 0.0, pred, f"symbolic comparison timed out after {cfg.math_timeout_s:g}s"
    return (1.0 if verdict else 0.0), pred, "math-verify: " + ("equivalent" if verdict else "not equivalent")


def _grade_text(answer: str, gold: str, cfg: VerifierConfig) -> tuple[float, Optional[str], str]:
    pred, ref = normalize_text(answer), normalize_text(gold)
    if not pred:
        return 0.0, pred, "empty answer after normalisation"
    if pred == ref:
        return 1.0, pred, "normalised text match"
    gold_value, pred_value = parse_number(gold), parse_number(answer)
    if gold_value is not None and pred_value is not None and _numbers_equal(gold_value, pred_value, "float", cfg):
        return 1.0, pred, "numeric match"
    return 0.0, pred, "normalised text differs"


def _grade_multiple_choice(answer: str, gold: str, choices: Choices, cfg: VerifierConfig) -> tuple[float, Optional[str], str]:
    options = _option_table(choices)
    gold_letter = _gold_letter(gold, options, cfg)
    letter, how = _pred_letter(answer, options, cfg)
    if gold_letter is None:
        # The key is option text that is not among the choices: compare the texts directly.
        if letter is not None and options:
            ok = _values_equal(options[letter], gold, cfg)
            return (1.0 if ok else 0.0), letter, f"option {letter} text vs ground-truth text"
        ok = _values_equal(answer, gold, cfg)
        return (1.0 if ok else 0.0), clean_answer(answer), "ground truth is not an option; compared as text"
    if letter is None:
        return 0.0, clean_answer(answer) or None, how
    ok = letter == gold_letter
    return (1.0 if ok else 0.0), letter, f"{how}: {letter} {'==' if ok else '!='} key {gold_letter}"


def grade_answer(
    answer: str, ground_truth: Any, answer_type: Optional[str] = None, choices: Choices = None, config: VerifierConfig = DEFAULT_CONFIG
) -> tuple[float, Optional[str], str, str]:
    """Grade an answer text (already cut out of the response) against the ground truth.

    Returns ``(accuracy, extracted, reason, answer_type_used)``. A list / tuple ground truth means
    "any of these is correct".
    """
    if isinstance(ground_truth, (list, tuple)) and not isinstance(ground_truth, str):
        best = (0.0, None, "empty ground-truth list", answer_type or "text")
        for gt in ground_truth:
            result = grade_answer(answer, gt, answer_type, choices, config)
            if result[0] > best[0] or best[1] is None:
                best = result
            if result[0] >= 1.0:
                break
        return best
    if answer_type is not None:
        key = str(answer_type).strip().lower()
        if key not in _TYPE_ALIASES:
            raise ValueError(f"unknown answer_type {answer_type!r}; valid: {', '.join(ANSWER_TYPES)} (and aliases {', '.join(sorted(_TYPE_ALIASES))})")
        answer_type = _TYPE_ALIASES[key]
    if answer_type is None:
        answer_type = infer_answer_type(ground_truth, choices)
    gold = ground_truth if isinstance(ground_truth, str) else str(ground_truth)
    if not clean_answer(answer):
        return 0.0, None, "empty answer", answer_type
    if answer_type == "multiple_choice":
        acc, extracted, reason = _grade_multiple_choice(answer, gold, choices, config)
    elif answer_type in ("integer", "float"):
        acc, extracted, reason = _grade_number(answer, gold, answer_type, config)
    elif answer_type == "latex":
        acc, extracted, reason = _grade_latex(answer, gold, config)
    else:
        acc, extracted, reason = _grade_text(answer, gold, config)
    return acc, extracted, reason, answer_type


def score(
    response: str,
    ground_truth: Any,
    answer_type: Optional[str] = None,
    choices: Choices = None,
    *,
    config: Optional[VerifierConfig] = None,
) -> RewardScore:
    """Score one response (spec section 1).

    Args:
        response: the generated text (think + answer), tags included.
        ground_truth: reference answer: a string, a number, an option letter or option text, or a
            list of acceptable answers.
        answer_type: one of :data:`ANSWER_TYPES` (MathVista's ``multi_choice`` / ``free_form`` and a
            few other aliases accepted); None = inferred from ground truth and choices. An unknown
            name raises ``ValueError`` (a configuration error, not model output).
        choices: options of a multiple-choice question, as a list (A, B, ... in order) or a
            letter -> text mapping.
        config: tolerances, format weight, tag names, time limit.

    Returns:
        :class:`RewardScore`. Never raises on model output: anything ungradable scores accuracy 0
        with the reason recorded.
    """
    cfg = config or DEFAULT_CONFIG
    if answer_type is not None and str(answer_type).strip().lower() not in _TYPE_ALIASES:
        raise ValueError(f"unknown answer_type {answer_type!r}; valid: {', '.join(ANSWER_TYPES)}")
    try:
        parsed = parse_response(response, cfg.tags)
    except Exception as exc:  # defensive: parsing is total, but a reward must never crash a run
        return RewardScore(0.0, 0.0, 0.0, None, f"unparseable response: {exc!r}", answer_type)
    fmt = 1.0 if parsed.format_ok else 0.0
    format_note = "" if parsed.format_ok else "; format: " + "; ".join(parsed.problems)
    if parsed.answer is None:
        reason = "no complete answer span" + format_note
        return RewardScore(0.0, fmt, combine(0.0, fmt, cfg.format_weight), None, reason, answer_type)
    if parsed.answer_has_tags:
        reason = "answer span contains tags (nested or repeated tags)" + format_note
        return RewardScore(0.0, fmt, combine(0.0, fmt, cfg.format_weight), None, reason, answer_type)
    if len(parsed.answer) > cfg.max_answer_chars:
        reason = f"answer longer than {cfg.max_answer_chars} characters" + format_note
        return RewardScore(0.0, fmt, combine(0.0, fmt, cfg.format_weight), None, reason, answer_type)
    try:
        acc, extracted, reason, used_type = grade_answer(parsed.answer, ground_truth, answer_type, choices, cfg)
    except Exception as exc:  # a grader bug costs this sample its accuracy, not the run
        acc, extracted, reason, used_type = 0.0, None, f"grader error: {exc!r}", answer_type
    return RewardScore(acc, fmt, combine(acc, fmt, cfg.format_weight), extracted, reason + format_note, used_type)

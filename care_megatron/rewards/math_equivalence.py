"""Symbolic equivalence of LaTeX / plain math answers through HF ``math-verify``, with a hard time limit.

``math_verify.parse`` / ``math_verify.verify`` bound their own work with ``signal.alarm``, which
(a) only works in the main thread, (b) has whole-second resolution and (c) cancels any alarm the
caller had armed (pytest-timeout, an outer watchdog). So their built-in timeouts are switched off
and the limit is enforced here instead:

* main thread (the trainer, and every worker of ``score_batch``'s process pool): a
  ``signal.setitimer`` deadline with sub-second resolution around the whole parse + verify, raising
  a ``BaseException`` subclass that math-verify's ``except Exception`` handlers do not swallow; an
  alarm the caller had armed is re-armed afterwards with its remaining time;
* any other thread (a trainer that scores in a thread pool): the comparison is shipped to one
  persistent helper process, and the parent gives up after the limit and kills the helper (a
  fresh one starts on the next call). This also bounds C-level work (huge integer powers) that a
  Python signal handler cannot interrupt. Calls from several threads share that one helper and
  are served one at a time; for throughput use ``score_batch``'s process pool instead.

A timeout counts as "not equivalent" and is reported as such; it never raises.
"""
from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Optional

MATH_TIMEOUT = "timeout"
"""Returned by :func:`math_equal` instead of a bool when the limit was hit."""


class _Deadline(BaseException):
    """Raised by the SIGALRM handler; BaseException so ``except Exception`` in sympy/math-verify
    cannot swallow it."""


class _SilenceDisabledTimeoutWarning(logging.Filter):
    # math-verify warns once that its timeout is disabled; here it is disabled on purpose.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_SilenceDisabledTimeoutWarning())


def _signals_usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def _deadline(seconds: float):
    """Raise :class:`_Deadline` in this (main) thread after ``seconds``; restores any outer alarm."""

    def on_alarm(signum, frame):
        raise _Deadline()

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    outer_remaining, outer_interval = signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if outer_remaining > 0:
            left = outer_remaining - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)


def _wrap_math(text: str) -> str:
    # math-verify's LaTeX extractor looks for delimited math; a bare answer like "x^2+1" gets $...$.
    stripped = text.strip()
    if "$" in stripped or "\\(" in stripped or "\\[" in stripped or "\\boxed" in stripped:
        return stripped
    return f"${stripped}$"


def _parse_and_verify(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse(_wrap_math(gold), parsing_timeout=None)
    if not gold_parsed:
        gold_parsed = parse(gold, parsing_timeout=None)
    pred_parsed = parse(_wrap_math(pred), parsing_timeout=None)
    if not pred_parsed:
        pred_parsed = parse(pred, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _numeric_value(text: str) -> Optional[complex]:
    """Numeric value of a closed-form expression (``\\sqrt{2}``, ``2^{10}``), None if symbolic."""
    from math_verify import parse

    parsed = parse(_wrap_math(text), parsing_timeout=None)
    for item in parsed:
        if isinstance(item, str) or not hasattr(item, "free_symbols") or item.free_symbols:
            continue
        try:
            return complex(item.evalf(30))
        except (TypeError, ValueError, AttributeError):
            continue
    return None


_OPERATIONS = {"equal": _parse_and_verify, "value": _numeric_value}


_WARM = False


def warm_up() -> None:
    """Import math-verify with its sympy / LaTeX parsers and compare one trivial pair, untimed.

    The first comparison in a process pays several seconds of imports (4 s measured on a busy
    2-core machine); under the comparison's deadline that would score a correct answer as timed
    out in every fresh process (each scoring-pool worker, the helper process). Runs once per process.
    """
    global _WARM
    if not _WARM:
        _parse_and_verify("1", "1")
        _WARM = True


def _run_with_signal_deadline(op: str, args: tuple, timeout_s: float):
    warm_up()  # outside the deadline: the limit bounds the comparison, not one-off imports
    try:
        with _deadline(timeout_s):
            return _OPERATIONS[op](*args)
    except _Deadline:
        return MATH_TIMEOUT


def _helper_main(conn) -> None:
    """Loop of the helper process: receive (gold, pred, timeout), answer bool or MATH_TIMEOUT."""
    import math_verify  # noqa: F401  (import once, before saying ready)

    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        op, args, timeout_s = request
        try:
            result = _run_with_signal_deadline(op, args, timeout_s)
        except Exception:  # a math-verify bug must not kill the helper
            result = None
        conn.send(result)


class _HelperProcess:
    """One persistent helper process used from non-main threads, restarted after a timeout."""

    startup_timeout_s = 120.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork from a threaded parent is unsafe
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_helper_main, args=(child,), daemon=True, name="care-math-verify")
        proc.start()
        child.close()
        if not parent.poll(self.startup_timeout_s) or parent.recv() != "ready":
            proc.kill()
            raise RuntimeError("math-verify helper process did not start")
        self._proc, self._conn = proc, parent

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def run(self, op: str, args: tuple, timeout_s: float):
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._stop()
                self._start()
            self._conn.send((op, args, timeout_s))
            # The helper enforces the limit itself; the grace covers C-level work it cannot interrupt.
            if self._conn.poll(timeout_s + 1.0):
                return self._conn.recv()
            self._stop()
            return MATH_TIMEOUT

    def close(self) -> None:
        with self._lock:
            self._stop()


_HELPER = _HelperProcess()

_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_CACHE_SIZE = 4096
_CACHE_LOCK = threading.Lock()


def _run(op: str, args: tuple, timeout_s: float, force_helper: Optional[bool]):
    use_helper = (not _signals_usable()) if force_helper is None else force_helper
    try:
        if use_helper:
            return _HELPER.run(op, args, timeout_s)
        if _signals_usable():
            return _run_with_signal_deadline(op, args, timeout_s)
        return _OPERATIONS[op](*args)
    except Exception:
        return None


def _cached(op: str, args: tuple, timeout_s: float, force_helper: Optional[bool]):
    key = (op,) + args
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    result = _run(op, args, timeout_s, force_helper)
    if result != MATH_TIMEOUT:
        with _CACHE_LOCK:
            _CACHE[key] = result
            if len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return result


def math_equal(gold: str, pred: str, timeout_s: float = 5.0, force_helper: Optional[bool] = None):
    """Is ``pred`` mathematically equivalent to ``gold`` (math-verify's parse + verify)?

    Args:
        gold: reference answer, LaTeX or plain math (``\\frac{1}{2}``, ``x^2+1``, ``\\{1, 2\\}``).
        pred: the model's answer text.
        timeout_s: wall-clock limit for the whole comparison, in seconds.
        force_helper: True to use the helper process even in the main thread, False to never use it
            (a non-main-thread call then runs without a limit), None = choose by thread (tests use
            this to exercise both paths).

    Returns:
        True / False, or :data:`MATH_TIMEOUT` when the limit was hit. Never raises on bad input.
    """
    result = _cached("equal", (gold, pred), timeout_s, force_helper)
    return result if result == MATH_TIMEOUT else bool(result)


def math_value(text: str, timeout_s: float = 5.0, force_helper: Optional[bool] = None):
    """Numeric value (complex) of a closed-form expression such as ``\\sqrt{2}`` or ``2^{10}``; None
    when it is not a constant expression or cannot be parsed; :data:`MATH_TIMEOUT` on timeout."""
    return _cached("value", (text,), timeout_s, force_helper)


def clear_cache() -> None:
    """Forget cached comparisons (tests)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def shutdown_helper() -> None:
    """Stop the helper process if one is running."""
    _HELPER.close()

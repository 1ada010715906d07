"""The symbolic-equivalence time limit: main thread (signal deadline), other threads (helper
process), and an alarm armed by the caller survives."""
import signal
import threading
import time

import pytest

from care_megatron.rewards import math_equivalence
from care_megatron.rewards.math_equivalence import MATH_TIMEOUT, math_equal, math_value
from care_megatron.rewards.verifier import VerifierConfig, score

# Exponent towers: sympy evaluates 9^(9^9) as an exact integer, which takes far longer than the limit.
SLOW_GOLD, SLOW_PRED = "9^{9^{9}}", "9^{9^{8}}"


@pytest.fixture(autouse=True)
def fresh_cache():
    math_equivalence.clear_cache()
    yield
    math_equivalence.clear_cache()


def test_equivalence_and_value_basics():
    assert math_equal("\\frac{1}{2}", "0.5") is True
    assert math_equal("x^2", "x^3") is False
    assert abs(math_value("\\sqrt{2}") - 2**0.5) < 1e-12
    assert math_value("x + 1") is None
    assert math_equal("", "") is False


def test_main_thread_deadline():
    handler_before = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    assert math_equal(SLOW_GOLD, SLOW_PRED, timeout_s=0.3) == MATH_TIMEOUT
    assert time.monotonic() - start < 20.0  # unbounded, 9^(9^9) would not finish at all
    # the SIGALRM handler is restored and no alarm is left armed
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0
    assert signal.getsignal(signal.SIGALRM) is handler_before


def test_outer_alarm_is_preserved():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert math_equal(SLOW_GOLD, SLOW_PRED, timeout_s=0.2) == MATH_TIMEOUT
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 25.0 < remaining <= 30.0  # re-armed with what was left
        assert signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL
        assert not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_first_comparison_imports_are_not_under_the_deadline(monkeypatch):
    """A fresh process's first comparison (math-verify + sympy imports, seconds on a busy machine)
    is warmed up outside the deadline, so a short limit bounds only the comparison itself."""
    real = math_equivalence._parse_and_verify
    first_call = []

    def slow_first_call(gold, pred):  # the import cost of a cold process, paid once
        if not first_call:
            first_call.append(True)
            time.sleep(0.5)
        return real(gold, pred)

    monkeypatch.setattr(math_equivalence, "_parse_and_verify", slow_first_call)
    monkeypatch.setitem(math_equivalence._OPERATIONS, "equal", slow_first_call)
    monkeypatch.setattr(math_equivalence, "_WARM", False)
    math_equivalence.clear_cache()
    assert math_equal("\\frac{3}{4}", "0.75", timeout_s=0.3, force_helper=False) is True
    assert first_call  # the slow first call happened, in the warm-up


def test_timeout_scores_zero_with_reason():
    r = score(f"<think>r</think><answer>{SLOW_PRED}</answer>", SLOW_GOLD, "latex", config=VerifierConfig(math_timeout_s=0.3))
    assert r.accuracy == 0 and r.format == 1 and "timed out" in r.reason


def test_worker_thread_uses_helper_process():
    results = {}

    def run():
        results["slow"] = math_equal(SLOW_GOLD, SLOW_PRED, timeout_s=0.5)
        results["ok"] = math_equal("(x+1)^2", "x^2+2x+1", timeout_s=20.0)
        results["score"] = score("<think>r</think><answer>\\frac{2}{4}</answer>", "\\frac{1}{2}", "latex").accuracy

    thread = threading.Thread(target=run)
    start = time.monotonic()
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    assert results == {"slow": MATH_TIMEOUT, "ok": True, "score": 1.0}
    assert time.monotonic() - start < 120
    math_equivalence.shutdown_helper()


def test_forced_helper_in_main_thread_matches_inline():
    pairs = [("\\frac{1}{2}", "0.5"), ("x^2+2x+1", "(x+1)^2"), ("\\sqrt{2}", "1.5"), ("\\{1,2\\}", "\\{2,1\\}")]
    inline = [math_equal(g, p, force_helper=False) for g, p in pairs]
    math_equivalence.clear_cache()
    helper = [math_equal(g, p, timeout_s=20.0, force_helper=True) for g, p in pairs]
    math_equivalence.shutdown_helper()
    assert inline == helper == [True, True, False, True]

"""Verifier throughput: responses scored per second on one CPU core, per answer type.

Usage:
    python tools/bench_verifier.py [--n 2000] [--think-chars 1500] [--workers 0] [--seed 0]

Responses are synthetic but shaped like rollouts: a rationale of ``--think-chars`` characters, then
an answer span, half of them correct, in the surface forms models produce (``(B)``, ``12 cm``,
``\\frac{1}{2}``, ...). Every (ground truth, answer) pair is distinct, so the symbolic-equivalence
cache never hides the cost of math-verify. The process pins itself to one core (Linux) so the
number is per core. ``--workers N`` additionally times ``score_batch`` with an N-process pool.
Prints numbers only; it asserts nothing about time.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from care_megatron.rewards import math_equivalence  # noqa: E402
from care_megatron.rewards.parsing import parse_response  # noqa: E402
from care_megatron.rewards.batch_scoring import score_batch  # noqa: E402
from care_megatron.rewards.verifier import score  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rationale(rng: random.Random, chars: int) -> str:
    words = ["the", "bar", "is", "taller", "so", "we", "add", "3", "and", "4", "then", "compare", "angles", "of", "triangle"]
    out, size = [], 0
    while size < chars:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def make_cases(kind: str, n: int, rng: random.Random, think_chars: int):
    cases = []
    for i in range(n):
        correct = i % 2 == 0
        if kind == "multiple_choice":
            opts = [f"{v} cm" for v in rng.sample(range(1, 500), 4)]
            key = rng.randrange(4)
            pick = key if correct else (key + 1) % 4
            letter = "ABCD"[pick]
            answer = rng.choice([letter, f"({letter})", f"Option {letter}", f"The answer is {letter}.", opts[pick]])
            truth, choices, atype = "ABCD"[key], opts, "multiple_choice"
        elif kind == "integer":
            v = rng.randrange(-10_000, 1_000_000)
            got = v if correct else v + rng.randrange(1, 9)
            answer = rng.choice([f"{got}", f"{got:,}", f"{got} apples", f"x = {got}", f"\\boxed{{{got}}}"])
            truth, choices, atype = str(v), None, "integer"
        elif kind == "float":
            num, den = rng.randrange(1, 999), rng.randrange(2, 97)
            value = num / den if correct else num / den * 1.01
            answer = rng.choice([f"{value:.6f}", f"{value:.4e}", f"\\frac{{{num}}}{{{den}}}" if correct else f"{value:.5f}"])
            truth, choices, atype = f"{num / den:.8f}", None, "float"
        elif kind == "latex":
            a, b = rng.randrange(2, 60), rng.randrange(2, 60)
            truth = f"\\frac{{\\sqrt{{{a}}}}}{{{b}}}"
            answer = rng.choice([f"\\frac{{{a}}}{{{b}\\sqrt{{{a}}}}}", f"\\sqrt{{{a}}}/{b}"]) if correct else f"\\frac{{\\sqrt{{{a + 1}}}}}{{{b}}}"
            truth = rng.choice([truth, f"(x+{a})^2"]) if i % 4 < 2 else truth
            if truth.startswith("(x"):
                answer = f"x^2+{2 * a}x+{a * a}" if correct else f"x^2+{2 * a + 1}x+{a * a}"
            choices, atype = None, "latex"
        else:  # text
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(4, 12)))
            got = word if correct else word + "s"
            answer = rng.choice([got, got.upper() + ".", f"The {got}!"])
            truth, choices, atype = word, None, "text"
        response = f"<think>{rationale(rng, think_chars)}</think>\n<answer>{answer}</answer>"
        cases.append((response, truth, atype, choices))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="responses per answer type (latex uses n // 10)")
    parser.add_argument("--think-chars", type=int, default=1500, help="rationale length in characters")
    parser.add_argument("--workers", type=int, default=0, help="also time score_batch with this many processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rng = random.Random(args.seed)
    print(f"hardware: {cpu_name()} ({platform.machine()}), python {platform.python_version()}, "
          f"1 core pinned{' (sched_setaffinity)' if hasattr(os, 'sched_setaffinity') else ' (not pinned: no sched_setaffinity)'}")
    print(f"responses: rationale {args.think_chars} chars + answer; half correct; unique pairs (no cache hits)")
    score("<think>x</think><answer>\\frac{1}{2}</answer>", "\\sqrt{2}", "latex")  # import math-verify / sympy once
    print(f"{'answer type':>16} {'responses':>10} {'seconds':>9} {'resp/s':>10} {'accuracy':>9}")
    all_cases = []
    for kind in ("multiple_choice", "integer", "float", "text", "latex"):
        n = max(1, args.n // 10) if kind == "latex" else args.n
        cases = make_cases(kind, n, rng, args.think_chars)
        all_cases += cases
        math_equivalence.clear_cache()
        start = time.perf_counter()
        acc = sum(score(r, t, a, c).accuracy for r, t, a, c in cases)
        elapsed = time.perf_counter() - start
        print(f"{kind:>16} {n:>10} {elapsed:>9.3f} {n / elapsed:>10.0f} {acc / n:>9.3f}")
    print("parse_response on 100k-character responses (linear-time parser):")
    for label, body in (("plain text", "x" * 100_000), ("'<' * 100k", "<" * 100_000), ("'<think>' * 14k", "<think>" * 14_285)):
        text = "<think>" + body + "</think><answer>4</answer>"
        reps = 20
        start = time.perf_counter()
        for _ in range(reps):
            parse_response(text)
        elapsed = (time.perf_counter() - start) / reps
        print(f"{label:>18}: {elapsed * 1e3:8.2f} ms per response")
    if args.workers > 0:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        math_equivalence.clear_cache()
        responses, truths, types, choices = map(list, zip(*all_cases))
        start = time.perf_counter()
        score_batch(responses, truths, types, choices, num_workers=args.workers)
        elapsed = time.perf_counter() - start
        print(f"score_batch, {args.workers} processes (pool start-up included): {len(responses)} responses "
              f"in {elapsed:.2f}s = {len(responses) / elapsed:.0f} resp/s")


if __name__ == "__main__":
    main()

"""Run metrics: one JSON line per step, TensorBoard scalars, and a progress bar with reward and ETA."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def _finite_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


class MetricsLogger:
    """Writes ``metrics.jsonl`` (a fresh run starts it anew; a resumed run keeps the lines up to its
    checkpoint step and drops later ones, so no step is logged twice),
    TensorBoard events under ``tensorboard/``, and drives a tqdm bar showing step, reward and ETA."""

    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int = 0, desc: str = "rl",
                 filename: str = "metrics.jsonl", tensorboard: bool = True, progress: bool = True,
                 resumed: bool = False, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:  # non-zero ranks of a distributed run log nothing
            return
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / filename
        self._keep_until(start_step if resumed else -1)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard" / desc))
            except ImportError:  # tensorboard is a core dependency; tolerate its absence in stripped installs
                self._tb = None
        disable = not progress or os.environ.get("CARE_NO_PROGRESS") == "1"
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, disable=disable)
        self._t0 = time.time()

    def _keep_until(self, step: int) -> None:
        """Keep only lines with step <= ``step`` (-1: none)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", -1) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(l + "\n" for l in kept))

    def log(self, step: int, metrics: dict[str, Any], advance: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self._t0, 3), **metrics}
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in _finite_scalars(metrics).items():
                self._tb.add_scalar(k, v, step)
        if advance:
            shown = {k: f"{metrics[k]:.3f}" for k in ("reward/mean", "loss", "eval/accuracy") if isinstance(metrics.get(k), (int, float))}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def rl_step_metrics(rollouts, advantages, info: dict | None, result) -> dict[str, float]:
    """One RL step's metrics: spec section 8 diagnostics from the rollouts and advantages, plus the
    update's. Loss metrics are globally normalised, so their micro-batch sum is the step value; clip
    fractions are rebuilt from summed counts; per-micro-batch means are averaged."""
    import numpy as np
    import torch

    from care_megatron.algorithm.diagnostics import advantage_diagnostics, clip_fractions

    def field(name):
        return torch.tensor([float(getattr(r, name)) for r in rollouts])

    metrics = advantage_diagnostics(field("reward"), field("accuracy"), advantages, field("format"),
                                    field("think_length"), field("answer_length"), info)
    metrics.update({k: v for k, v in result.metrics.items() if not k.startswith(("count/", "clip_frac/", "ratio_"))})
    metrics.update(clip_fractions(result.metrics))
    parts = max(result.metrics.get("micro_batches", 1.0), 1.0)
    metrics.update({k: v / parts for k, v in result.metrics.items() if k.startswith("ratio_")})
    metrics.update(loss=result.loss, grad_norm=result.grad_norm, lr=result.learning_rate, skipped=float(result.skipped))
    metrics["length/response_mean"] = float(np.mean([len(r.completion.token_ids) for r in rollouts]))
    return metrics


def write_samples(path: str | Path, step: int, rollouts, keep: int = 4) -> None:
    """Append a few rollouts (and up to two RGR samples) with their verifier reasons to ``samples.jsonl``."""
    with Path(path).open("a") as fh:
        for r in rollouts[:keep] + [r for r in rollouts if r.reflected_from >= 0][:2]:
            fh.write(json.dumps({"step": step, "id": r.record.id, "answer": r.record.answer, "response": r.response_text,
                                 "reward": r.reward, "reason": r.reason, "reflected": r.reflected_from >= 0}) + "\n")

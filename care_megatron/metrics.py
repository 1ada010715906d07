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
                 resumed: bool = False, enabled: bool = True, companions: tuple[str, ...] = ("groups.jsonl",)) -> None:
        self.enabled = enabled
        if not enabled:  # non-zero ranks of a distributed run log nothing
            return
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / filename
        for name in (filename, *companions):  # per-step files written beside it (the trainer's groups.jsonl)
            keep_lines_until(self.dir / name, start_step if resumed else -1)
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
            shown = {k: f"{metrics[k]:.3f}" for k in ("reward/mean", "loss", "eval/accuracy", "eval_sampled/accuracy") if isinstance(metrics.get(k), (int, float))}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def keep_lines_until(path: Path, step: int) -> None:
    """Keep only the JSONL lines of ``path`` with ``step`` <= ``step`` (-1: none; a cut line is dropped)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", -1) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(l + "\n" for l in kept))


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def read_run_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` that may still be running or was killed: [] when the file
    does not exist yet, and a line cut short by a kill is skipped (the resumed run writes it again)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


# keys of care_advantages' ``info`` the diagnostics read: one entry per group / one per rollout
_GROUP_KEYS = ("group_ids", "anchored", "rescue", "saturated", "num_negatives", "rgr_target")
_ROW_KEYS = ("role", "z_scores", "group_of", "is_reflected", "in_subgroup")
_FIELDS = ("reward", "accuracy", "format", "think_length", "answer_length")


def diagnostic_payload(rollouts, advantages, info: dict | None) -> dict:
    """The per-rollout / per-group tensors the step diagnostics read (small; what DP ranks exchange).
    ``rows['slot']``: each rollout's group as an index 0..n_groups-1 in ascending group order (the
    order of ``info['group_ids']``); ``ids``: each rollout's record id."""
    import torch

    rows = {name: torch.tensor([float(getattr(r, name)) for r in rollouts], dtype=torch.float64) for name in _FIELDS}
    rows["response_length"] = torch.tensor([float(len(r.completion.token_ids)) for r in rollouts], dtype=torch.float64)
    rows["advantage"] = advantages.detach().double().cpu()
    rows["reflected"] = torch.tensor([float(r.reflected_from >= 0) for r in rollouts], dtype=torch.float64)
    groups = torch.tensor([r.group for r in rollouts], dtype=torch.long)
    rows["slot"] = torch.unique(groups, sorted=True, return_inverse=True)[1].double() if len(rollouts) else groups.double()
    care = None if info is None else {k: info[k].detach().cpu() for k in _GROUP_KEYS + _ROW_KEYS}
    return {"rows": rows, "info": care, "ids": [str(r.record.id) for r in rollouts]}


def merge_diagnostic_payloads(payloads: list[dict]) -> dict:
    """Concatenate the payloads of several data-parallel ranks (groups renumbered: ``group_of`` and the
    ``slot`` row are offset by the groups of the ranks before). Equal to the payload of all rollouts in one batch."""
    import torch

    slots, offset = [], 0
    for p in payloads:
        slots.append(p["rows"]["slot"] + offset)
        offset += int(p["rows"]["slot"].max()) + 1 if p["rows"]["slot"].numel() else 0
    rows = {k: torch.cat(slots) if k == "slot" else torch.cat([p["rows"][k] for p in payloads])
            for k in payloads[0]["rows"]}
    ids = [i for p in payloads for i in p.get("ids", [])]
    if any(p["info"] is None for p in payloads):
        return {"rows": rows, "info": None, "ids": ids}
    info, offset, group_of = {}, 0, []
    for p in payloads:
        group_of.append(p["info"]["group_of"] + offset)
        offset += int(p["info"]["group_ids"].numel())
    for k in _GROUP_KEYS + _ROW_KEYS:
        info[k] = torch.cat(group_of) if k == "group_of" else torch.cat([p["info"][k] for p in payloads])
    return {"rows": rows, "info": info, "ids": ids}


def group_records(payload: dict, step: int, method: str) -> list[dict]:
    """One record per prompt group of a (merged) payload: the ``groups.jsonl`` lines of a step.

    Every method: ``step``, ``prompt_id``, ``group`` (index in the step), ``method``, ``accuracy`` and
    ``reward_mean`` (over the group's original rollouts, RGR samples excluded), ``all_negative`` (no
    original rollout correct), ``decoded_tokens`` (the group's decoded response tokens, its RGR sample's
    included). CARE (``info`` present) adds ``anchored``, ``rescue``, ``saturated``, ``k_prime``,
    ``anchor_z`` (the anchor's pre-scaling z-score; None unless anchored), ``neg_z`` (the selected
    negatives' pre-scaling z-scores, RGR samples excluded; [] unless anchored), ``anchor_advantage``,
    ``rgr_triggered``, ``rgr_correct`` (None without a sample) and ``rgr_tokens``."""
    from care_megatron.algorithm.care import SubgroupRole

    rows, info, ids = payload["rows"], payload["info"], payload.get("ids") or []
    slot = rows["slot"].long()
    reflected = rows["reflected"].bool()
    records = []
    for g in range(int(slot.max()) + 1 if slot.numel() else 0):
        members = (slot == g).nonzero().flatten()  # slots are 0..n_groups-1: never empty
        original = members[~reflected[members]]
        base = original if original.numel() else members
        accuracy = rows["accuracy"][base]
        record = {"step": int(step), "prompt_id": ids[int(members[0])] if ids else None, "group": g, "method": method,
                  "accuracy": float(accuracy.mean()), "reward_mean": float(rows["reward"][base].mean()),
                  "all_negative": bool((accuracy < 1).all()),
                  "decoded_tokens": int(rows["response_length"][members].sum())}
        if info is not None:
            anchored = bool(info["anchored"][g])
            role, z = info["role"][members], info["z_scores"][members].double()
            is_anchor = role == int(SubgroupRole.ANCHOR)
            has_anchor = anchored and bool(is_anchor.any())
            negatives = (role == int(SubgroupRole.NEGATIVE)) & ~reflected[members]
            rgr = members[reflected[members]]
            record.update(
                anchored=anchored, rescue=bool(info["rescue"][g]), saturated=bool(info["saturated"][g]),
                k_prime=int(info["num_negatives"][g]),
                anchor_z=float(z[is_anchor][0]) if has_anchor else None,
                neg_z=[float(v) for v in z[negatives].tolist()] if anchored else [],
                anchor_advantage=float(rows["advantage"][members[is_anchor][0]]) if has_anchor else None,
                rgr_triggered=bool(rgr.numel()),
                rgr_correct=bool(rows["accuracy"][rgr[0]] >= 1) if rgr.numel() else None,
                rgr_tokens=int(rows["response_length"][rgr].sum()))
        records.append(record)
    return records


def write_group_records(path: str | Path, records: list[dict]) -> None:
    """Append ``records`` (:func:`group_records`) to ``groups.jsonl`` (one JSON object per line)."""
    if records:
        with Path(path).open("a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))


def ppo_ratio_metrics(update_metrics: dict[str, float]) -> dict[str, float]:
    """``ppo/ratio_mean`` / ``ppo/ratio_min`` / ``ppo/ratio_max`` (token importance ratios exp(logp -
    logp_old) over every update's response tokens) and ``ppo/approx_kl`` (their mean logp_old - logp,
    verl's ``ppo_kl``), from the losses' summed / min / max ratio statistics; empty without tokens."""
    tokens = update_metrics.get("count/response_tokens", 0.0)
    if not tokens or "count/ratio_sum" not in update_metrics:
        return {}
    out = {"ppo/ratio_mean": update_metrics["count/ratio_sum"] / tokens,
           "ppo/approx_kl": -update_metrics["count/log_ratio_sum"] / tokens}
    for bound in ("min", "max"):
        value = update_metrics.get(f"{bound}/ratio")
        if value is not None and math.isfinite(value):
            out[f"ppo/ratio_{bound}"] = value
    return out


def rl_step_metrics(rollouts, advantages, info: dict | None, result, group=None,
                    with_payload: bool = False) -> dict[str, float] | tuple[dict[str, float], dict]:
    """One RL step's metrics: docs/algorithm.md section 9 diagnostics from the rollouts and advantages, plus the
    update's. Loss metrics are globally normalised, so their micro-batch sum is the step value; clip
    fractions are rebuilt from summed counts; per-micro-batch means are averaged.

    ``group``: the data-parallel process group; with more than one rank, every rank's rollouts enter
    the diagnostics (``result`` is already reduced over data parallelism by the backend).
    ``with_payload``: also return the (merged) diagnostic payload, for :func:`group_records`."""
    import numpy as np
    import torch.distributed as dist

    from care_megatron.algorithm.diagnostics import advantage_diagnostics, clip_fractions

    payload = diagnostic_payload(rollouts, advantages, info)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, payload, group=group)
        payload = merge_diagnostic_payloads(gathered)
    rows = payload["rows"]
    metrics = advantage_diagnostics(rows["reward"], rows["accuracy"], rows["advantage"], rows["format"],
                                    rows["think_length"], rows["answer_length"], payload["info"])
    metrics.update({k: v for k, v in result.metrics.items() if not k.startswith(("count/", "clip_frac/", "min/", "max/"))})
    metrics.update(clip_fractions(result.metrics))
    metrics.update(ppo_ratio_metrics(result.metrics))
    metrics.update(loss=result.loss, grad_norm=result.grad_norm, lr=result.learning_rate, skipped=float(result.skipped))
    # over the original rollouts, like reward/* (RGR continuations are reported under rgr/*)
    original = rows["response_length"]
    if payload["info"] is not None:
        original = original[~payload["info"]["is_reflected"].bool()]
    metrics["length/response_mean"] = float(np.mean(original.numpy())) if len(original) else float("nan")
    return (metrics, payload) if with_payload else metrics


def write_samples(path: str | Path, step: int, rollouts, keep: int = 4) -> None:
    """Append a few rollouts (and up to two RGR samples) with their verifier reasons to ``samples.jsonl``."""
    with Path(path).open("a") as fh:
        for r in rollouts[:keep] + [r for r in rollouts if r.reflected_from >= 0][:2]:
            fh.write(json.dumps({"step": step, "id": r.record.id, "answer": r.record.answer, "response": r.response_text,
                                 "reward": r.reward, "reason": r.reason, "reflected": r.reflected_from >= 0}) + "\n")

"""The CARE paper's analysis figures from the runs' records: one command per figure, each a PNG and the
JSON of the numbers behind it.

Figures (``FIGURE``; docs/experiments.md has what each shows and every definition):

* ``fig2``: advantage signature (section 4.2): pre-scaling z-score of the anchor against sqrt(K') and of
  each selected negative against -1/sqrt(K'), per realised K' (``groups.jsonl`` of CARE runs);
* ``fig5``: negative selector (section 4.3): macro held-out accuracy and the anchor advantage per step;
* ``fig6``: negative-penalty scale (section 4.3): stepwise deltas vs ``neg_scale`` 1.0 (paired by seed and
  step) of ``clip_frac/neg_adv_answer`` and ``adv/neg_var_ratio``;
* ``fig7``: all-negative rescue ON vs OFF (section 4.3): accuracy gain of the triggered prompt over the
  next H steps, and the update magnitude ``update/param_norm`` on triggered steps;
* ``fig9_10``: K x update-size equalisation (appendix 9.1): held-out accuracy and KL against steps;
* ``fig12``: reflected-failure scale (appendix 9.3): per-RGR-trigger accuracy gain over the next H steps;
* ``tokens``: held-out accuracy against cumulative decoded tokens, with the area under the curve;
* ``all``: every figure above.

Each figure has a fixed list of variants: config files of ``examples/configs/ablations/`` (``FIGURES``).
A variant's own ``algorithm`` section (not its ``base:``) is turned into dotted overrides and applied on
top of ``--config`` and the command's overrides, so the same figure runs at any scale; an ablation file
that changes anything besides ``algorithm`` and ``train.output_dir`` is refused (its figure would then
not be the algorithm change alone). Run ``k`` of every variant has ``train.seed = k`` and otherwise the
same config (same data order, budget and decoding), so variants are paired by seed.

Runs live in ``OUT/runs/<variant>/seed<k>/`` and are shared between figures: ``fig5`` then ``fig2`` with
the same ``OUT`` reuses ``table2_care``'s runs. ``fig7`` and ``fig12`` measure whether a prompt improves
when it is seen again, so by default they train on a small pool, ``data.train_size`` = 4 x
``data.prompts_per_step``: the prompt order is reshuffled every epoch (4 steps), so a prompt comes back
1 to 7 steps later, always inside the default horizon of 8 (with a pool of E steps per epoch the gap
ranges over 1 .. 2E - 1 steps). Their runs therefore live in ``OUT/runs/<variant>.train_size<N>/``;
``data.train_size=...`` among the overrides replaces the default. Every run directory records the config
and overrides it was trained with (``paper_figures_run.json``); a directory whose record differs from what
a figure asks for is an error, not silently reused.

Unfinished runs are trained here one after another (an interrupted run resumes from its newest
checkpoint), ``--jobs N`` trains N at once, each in its own ``python -m care_megatron.cli train`` process
with ``train.threads=1`` (unless the overrides set it), logging to ``<run>/train.log``; ``--slurm``
prints one ``sbatch`` line per unfinished run (``--submit`` submits them) and stops; run the command again
once they are done. ``--no-run`` never trains, it draws from the finished runs. ``--runs
VARIANT=DIR[,DIR...]`` draws from existing run directories instead (the k-th directory of every variant is
paired with the k-th of the others: list them in seed order).

Usage::

    python tools/paper_figures.py fig5 --config examples/configs/tiny_cpu.yaml --out runs/figures --seeds 3 --jobs 2
    python tools/paper_figures.py fig7 --config examples/configs/qwen2_5_vl_7b.yaml --out runs/figures --slurm
    python tools/paper_figures.py fig6 --runs neg_scale_0p5=runs/a/s0,runs/a/s1 neg_scale_1p0=runs/b/s0,runs/b/s1 --out figs
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import compare_algorithms as compare  # noqa: E402
from care_megatron.config.loader import load_config, load_yaml  # noqa: E402
from care_megatron.stats import mean_interval  # noqa: E402

ABLATIONS = ROOT / "examples" / "configs" / "ablations"
RUN_RECORD = "paper_figures_run.json"
"""File in every run directory this tool trains: the config and overrides of the run."""
SMALL_POOL_EPOCH_STEPS = 4
"""fig7 / fig12 default: ``data.train_size`` = this many steps' prompts (see the module docstring)."""
DEFAULT_HORIZON = 8
DEFAULT_SMOOTH = 5
MAX_SCATTER_POINTS = 20000


@dataclass(frozen=True)
class Figure:
    name: str
    title: str
    variants: tuple[str, ...]
    labels: dict = field(default_factory=dict)
    small_pool: bool = False
    """Trains on ``data.train_size`` = SMALL_POOL_EPOCH_STEPS x ``data.prompts_per_step`` unless overridden."""
    needs_groups: bool = False
    """Reads ``groups.jsonl``."""


FIGURES = {
    "fig2": Figure("fig2", "Advantage signature: z against sqrt(K') and -1/sqrt(K')", ("table2_care",),
                   {"table2_care": "CARE"}, needs_groups=True),
    "fig5": Figure("fig5", "Negative selector", ("table2_care", "selector_random", "selector_mixed", "selector_farthest"),
                   {"table2_care": "nearest (cosine top-K, default)", "selector_random": "random",
                    "selector_mixed": "mixed", "selector_farthest": "farthest"}),
    "fig6": Figure("fig6", "Negative-penalty scale: stepwise deltas vs neg_scale 1.0",
                   ("neg_scale_0p25", "neg_scale_0p5", "neg_scale_0p75", "neg_scale_1p0"),
                   {"neg_scale_0p25": "s = 0.25", "neg_scale_0p5": "s = 0.5", "neg_scale_0p75": "s = 0.75",
                    "neg_scale_1p0": "s = 1.0 (baseline)"}),
    "fig7": Figure("fig7", "All-negative rescue ON vs OFF", ("table2_care", "rescue_off"),
                   {"table2_care": "rescue ON", "rescue_off": "rescue OFF"}, small_pool=True, needs_groups=True),
    "fig9_10": Figure("fig9_10", "K x update-size equalisation",
                      ("k2_eq_on", "k2_eq_off", "k4_eq_on", "k4_eq_off", "k6_eq_on", "k6_eq_off"),
                      {f"k{k}_eq_{e}": f"K = {k}, Eq {e}" for k in (2, 4, 6) for e in ("on", "off")}),
    "fig12": Figure("fig12", "Reflected-failure scale: per-trigger accuracy gain",
                    ("reflect_neg_scale_0p1", "reflect_neg_scale_0p25", "reflect_neg_scale_0p5", "reflect_neg_scale_1p0"),
                    {f"reflect_neg_scale_{s.replace('.', 'p')}": f"s_refl = {s}" for s in ("0.1", "0.25", "0.5", "1.0")},
                    small_pool=True, needs_groups=True),
    "tokens": Figure("tokens", "Token efficiency: held-out accuracy against decoded tokens",
                     ("table2_grpo", "table2_care_no_rgr", "table2_care"),
                     {"table2_grpo": "GRPO", "table2_care_no_rgr": "CARE w/o RGR", "table2_care": "CARE"}),
}
FIG6_BASELINE = "neg_scale_1p0"
FIG6_METRICS = (("clip_frac/neg_adv_answer", "clip rate, negative-advantage answer tokens"),
                ("adv/neg_var_ratio", "variance ratio Var(A | failed) / Var(A)"))
FIG7_ON, FIG7_OFF = "table2_care", "rescue_off"


class FigureError(Exception):
    """A figure cannot be drawn from the runs it was given (message says why)."""


# ------------------------------------------------------------------------------------ variants -> overrides
def _override_value(value) -> str:
    """A config value as the text of a dotted override that reads back to the same value."""
    if isinstance(value, str):
        return value if load_yaml(value) == value else json.dumps(value)
    return "null" if value is None else json.dumps(value)


def flatten_overrides(prefix: str, value) -> list[str]:
    """``{"care": {"k": 2}}`` under ``algorithm`` -> ``["algorithm.care.k=2"]`` (an empty mapping stays one)."""
    if isinstance(value, dict) and value:
        return [o for k, v in value.items() for o in flatten_overrides(f"{prefix}.{k}", v)]
    return [f"{prefix}={_override_value(value)}"]


def variant_file(variant: str) -> Path:
    path = ABLATIONS / f"{variant}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in ABLATIONS.glob("*.yaml")))
        raise ValueError(f"variant {variant!r}: no {path}; known: {known}")
    return path


def variant_overrides(path: str | Path) -> list[str]:
    """The dotted overrides of an ablation file's own ``algorithm`` section (its ``base:`` is not read: the
    variant goes on top of the user's config). A file that sets anything besides ``algorithm`` and
    ``train.output_dir`` (replaced by the tool's run directory) is refused, naming the field."""
    path = Path(path)
    data = load_yaml(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"variant file {path}: top level must be a mapping of sections")
    for section, content in data.items():
        if section in ("base", "algorithm"):
            continue
        fields = sorted(set(content) - ({"output_dir"} if section == "train" else set())) \
            if isinstance(content, dict) else [None]
        if not fields:
            continue
        name = section if fields[0] is None else f"{section}.{fields[0]}"
        raise ValueError(f"variant file {path}: sets {name!r}; a figure variant may change only the 'algorithm' "
                         f"section (and train.output_dir), so that the figure isolates the algorithm change")
    algorithm = data.get("algorithm") or {}
    if not isinstance(algorithm, dict):
        raise ValueError(f"variant file {path}: 'algorithm' must be a mapping")
    return flatten_overrides("algorithm", algorithm)


def _keys(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].strip() for o in overrides if "=" in o}


def small_pool_overrides(base_config, user_overrides: list[str]) -> list[str]:
    """fig7 / fig12's default ``data.train_size`` (none when the user sets it)."""
    if "data.train_size" in _keys(user_overrides):
        return []
    return [f"data.train_size={SMALL_POOL_EPOCH_STEPS * base_config.data.prompts_per_step}"]


# ------------------------------------------------------------------------------------ planning and training
@dataclass
class PlannedRun:
    key: str
    """Directory name under ``OUT/runs``: the variant, with ``.train_size<N>`` for a small-pool figure."""
    variant: str
    seed: int
    directory: Path
    overrides: list[str]
    steps: int
    init_from: str | None
    figures: set = field(default_factory=set)
    """The figures that draw this run."""
    uses: set = field(default_factory=set)
    """(figure, variant) pairs drawn from this run: variants with the same effective config share one run."""


def effective_identity(config) -> str:
    """What a run computes: the whole config with ``algorithm.care`` completed by CareConfig's defaults,
    without the run directory and thread count. Two variants with the same identity (``neg_scale_0p5``
    and ``table2_care``: one writes the default out, the other leaves it) are the same experiment."""
    import dataclasses

    from care_megatron.algorithm.care import CareConfig

    data = dataclasses.asdict(config)
    data["algorithm"]["care"] = dataclasses.asdict(CareConfig(**(config.algorithm.care or {})))
    data["train"].pop("output_dir", None)
    data["train"].pop("threads", None)
    return json.dumps(data, sort_keys=True, default=str)


def canonical_variants(config_path: str | None, base_overrides: list[str], wanted: list[str]) -> dict[str, str]:
    """Variant -> the variant whose runs it uses: among ``wanted`` and every variant of the figure catalogue,
    the first in catalogue order (then ``wanted`` order) with the same effective config, so any figure
    command picks the same run directory for the same experiment."""
    catalogue = list(dict.fromkeys([v for f in FIGURES.values() for v in f.variants] + list(wanted)))
    first: dict[str, str] = {}
    out = {}
    for variant in catalogue:
        identity = effective_identity(load_config(config_path, [*base_overrides, *variant_overrides(variant_file(variant))]))
        out[variant] = first.setdefault(identity, variant)
    return {v: out[v] for v in wanted}


def plan_runs(figures: list[Figure], config_path: str | None, user_overrides: list[str], seeds: int, out: Path,
              variants: list[str] | None = None, threads_one: bool = False) -> list[PlannedRun]:
    """Every (variant, seed) run the figures need, each with its full override list (loaded here, so a bad
    override fails before anything trains, naming the field)."""
    base = load_config(config_path, user_overrides)
    planned: dict[tuple[str, int], PlannedRun] = {}
    user_keys = _keys(user_overrides)
    for figure in figures:
        extra = small_pool_overrides(base, user_overrides) if figure.small_pool else []
        wanted = list(variants or figure.variants)
        canonical = canonical_variants(config_path, [*extra, *user_overrides], wanted)
        for drawn in wanted:
            variant = canonical[drawn]
            if variant != drawn:
                print(f"note: {drawn} is the same experiment as {variant} (same effective config): "
                      f"{figure.name} draws {variant}'s runs for it", file=sys.stderr)
            own = variant_overrides(variant_file(variant))
            clash = sorted(user_keys & _keys(own))
            if clash:
                print(f"note: variant {variant} sets {', '.join(clash)}; the variant's value replaces the override",
                      file=sys.stderr)
            for seed in range(seeds):
                overrides = [*extra, *user_overrides, *own, f"train.seed={seed}"]
                config = load_config(config_path, overrides)
                key = f"{variant}.train_size{config.data.train_size}" if figure.small_pool else variant
                directory = out / "runs" / key / f"seed{seed}"
                overrides.append(f"train.output_dir={directory}")
                if threads_one and "train.threads" not in user_keys:
                    overrides.append("train.threads=1")
                run = PlannedRun(key, variant, seed, directory, overrides, config.train.steps, config.train.init_from)
                kept = planned.setdefault((key, seed), run)
                kept.figures.add(figure.name)
                kept.uses.add((figure.name, drawn))
    return list(planned.values())


def _recorded(config_path: str | None, overrides: list[str]) -> dict:
    kept = [o for o in overrides if o.split("=", 1)[0] not in ("train.output_dir", "train.threads")]
    return {"config": str(Path(config_path).resolve()) if config_path else None, "overrides": kept}


def check_record(run: PlannedRun, config_path: str | None) -> None:
    """Refuse a run directory trained with another config or overrides than this run's."""
    path = run.directory / RUN_RECORD
    if not path.exists():
        if (run.directory / "metrics.jsonl").exists():
            print(f"warning: {run.directory} has no {RUN_RECORD}: cannot check which config it was trained with",
                  file=sys.stderr)
        return
    recorded, wanted = json.loads(path.read_text()), _recorded(config_path, run.overrides)
    if recorded != wanted:
        raise ValueError(f"{run.directory} was trained with config {recorded.get('config')} and overrides "
                         f"{recorded.get('overrides')}, but this command asks for config {wanted['config']} and "
                         f"overrides {wanted['overrides']}; use another --out (or delete that run)")


def write_record(run: PlannedRun, config_path: str | None) -> None:
    run.directory.mkdir(parents=True, exist_ok=True)
    (run.directory / RUN_RECORD).write_text(json.dumps(_recorded(config_path, run.overrides), indent=1) + "\n")


def _train_subprocess(run: PlannedRun, config_path: str | None) -> int:
    argv = [sys.executable, "-m", "care_megatron.cli", "train", *(["--config", config_path] if config_path else []),
            *run.overrides, "--no-progress", *(["--resume"] if (run.directory / "checkpoints").is_dir() else [])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with open(run.directory / "train.log", "a") as log:
        log.write("$ " + shlex.join(argv) + "\n")
        log.flush()
        return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def train_runs(runs: list[PlannedRun], config_path: str | None, jobs: int) -> list[str]:
    """Train ``runs`` here (``jobs`` at once, each in its own process when > 1); returns the failed ones."""
    failed, total, start = [], len(runs), time.perf_counter()
    for run in runs:
        if run.init_from and not Path(run.init_from).exists():
            raise ValueError(f"train.init_from: {run.init_from} does not exist; run care-sft with the same config "
                             f"first (or set train.init_from=null to start from model.name)")
        write_record(run, config_path)

    def started(i: int, run: PlannedRun) -> float:
        print(f"[{i}/{total}] start {run.key}/seed{run.seed} -> {run.directory}", flush=True)
        return time.perf_counter()

    def finished(i: int, run: PlannedRun, t0: float, ok: bool) -> None:
        state = "done" if ok else f"FAILED (see {run.directory / 'train.log'})"
        print(f"[{i}/{total}] {state} {run.key}/seed{run.seed} in {time.perf_counter() - t0:.1f} s "
              f"(elapsed {time.perf_counter() - start:.1f} s)", flush=True)

    if jobs <= 1:
        for i, run in enumerate(runs, 1):
            t0 = started(i, run)
            compare.run_locally(config_path, run.overrides, run.directory)
            finished(i, run, t0, True)
    else:
        def one(i: int, run: PlannedRun) -> tuple[int, PlannedRun, float, bool]:
            t0 = started(i, run)
            return i, run, t0, _train_subprocess(run, config_path) == 0

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in as_completed([pool.submit(one, i, r) for i, r in enumerate(runs, 1)]):
                i, run, t0, ok = future.result()
                finished(i, run, t0, ok)
                if not ok:
                    failed.append(f"{run.key}/seed{run.seed}")
    print(f"trained {total - len(failed)} of {total} runs in {time.perf_counter() - start:.1f} s", flush=True)
    return failed


# ------------------------------------------------------------------------------------ reading runs
@dataclass
class RunData:
    directory: Path
    rows: list[dict]
    config: dict | None = None
    _groups: list[dict] | None = None

    @property
    def groups(self) -> list[dict]:
        if self._groups is None:
            self._groups = read_groups(self.directory)
        return self._groups


def read_groups(directory: Path) -> list[dict]:
    """``groups.jsonl`` records sorted by (step, group); a (step, group) written twice (a resumed run that
    repeated a step) keeps its last record; a line cut short by a kill is skipped."""
    path = Path(directory) / "groups.jsonl"
    if not path.exists():
        return []
    latest = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            latest[(int(record["step"]), record.get("group"), record.get("prompt_id"))] = record
    return [latest[k] for k in sorted(latest, key=lambda k: (k[0], -1 if k[1] is None else k[1], str(k[2])))]


def load_run(directory: str | Path) -> RunData:
    directory = Path(directory)
    if not (directory / "metrics.jsonl").exists():
        raise ValueError(f"run directory {directory}: no metrics.jsonl")
    config = None
    if (directory / "config.yaml").exists():
        config = load_yaml((directory / "config.yaml").read_text())
    return RunData(directory, compare.read_rows(directory), config)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def step_series(rows: list[dict], key: str, train_only: bool = False) -> dict[int, float]:
    """step -> the last finite value of ``key`` logged at that step (``train_only``: steps >= 1)."""
    out = {}
    for row in rows:
        step = row.get("step")
        if isinstance(step, int) and (step >= 1 or not train_only) and _finite(row.get(key)):
            out[step] = float(row[key])
    return dict(sorted(out.items()))


def trailing_mean(series: dict[int, float], window: int) -> dict[int, float]:
    """Each step's value replaced by the mean of it and the ``window - 1`` values logged before it."""
    steps, values = list(series), list(series.values())
    return {s: sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i, s in enumerate(steps)}


def step_band(per_seed: dict[int, dict[int, float]]) -> dict:
    """Mean and 95% t-interval over seeds at every step that each seed logged."""
    seeds = [s for s in per_seed if per_seed[s]]
    if not seeds:
        return {"step": [], "mean": [], "low": [], "high": [], "n": 0}
    steps = sorted(set.intersection(*(set(per_seed[s]) for s in seeds)))
    stats = [mean_interval([per_seed[s][t] for s in seeds]) for t in steps]
    return {"step": steps, "mean": [st["mean"] for st in stats],
            "low": [st["low"] if st["low"] is not None else st["mean"] for st in stats],
            "high": [st["high"] if st["high"] is not None else st["mean"] for st in stats], "n": len(seeds)}


def final_value(series: dict[int, float]) -> float | None:
    return series[max(series)] if series else None


# ------------------------------------------------------------------------------------ analysis (pure)
def ols(x: list[float], y: list[float]) -> dict:
    """Least-squares line y = slope x + intercept and Pearson r (None where x or y has no spread)."""
    n = len(x)
    if n < 2:
        return {"slope": None, "intercept": None, "r": None, "n": n}
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    if sxx <= 0:
        return {"slope": None, "intercept": None, "r": None, "n": n}
    slope = sxy / sxx
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else None
    return {"slope": slope, "intercept": my - slope * mx, "r": r, "n": n}


def signature_points(groups: list[dict]) -> list[dict]:
    """Per anchored CARE group with K' >= 1: its K', anchor z and selected negatives' z."""
    points = []
    for g in groups:
        k = g.get("k_prime")
        if not g.get("anchored") or not isinstance(k, int) or k < 1:
            continue
        anchor = g.get("anchor_z")
        points.append({"k_prime": k, "anchor_z": float(anchor) if _finite(anchor) else None,
                       "neg_z": [float(z) for z in g.get("neg_z") or [] if _finite(z)]})
    return points


def signature(points: list[dict]) -> dict:
    """fig2's numbers: per K' the bucket means (95% t-interval over groups; a group's negatives are averaged
    first) beside the theory sqrt(K') / -1/sqrt(K'), and the least-squares fit and Pearson r of the observed
    z-scores against the theory for anchors, negatives and both pooled (every anchor and negative a point)."""
    buckets = {}
    ax, ay, nx, ny = [], [], [], []
    for p in points:
        k = p["k_prime"]
        b = buckets.setdefault(k, {"anchor": [], "neg_group_means": [], "neg_points": 0, "groups": 0})
        b["groups"] += 1
        if p["anchor_z"] is not None:
            b["anchor"].append(p["anchor_z"])
            ax.append(math.sqrt(k))
            ay.append(p["anchor_z"])
        if p["neg_z"]:
            b["neg_group_means"].append(sum(p["neg_z"]) / len(p["neg_z"]))
            b["neg_points"] += len(p["neg_z"])
            nx += [-1.0 / math.sqrt(k)] * len(p["neg_z"])
            ny += p["neg_z"]
    per_k = {}
    for k in sorted(buckets):
        b = buckets[k]
        per_k[str(k)] = {"groups": b["groups"], "theory_anchor": math.sqrt(k), "theory_neg": -1.0 / math.sqrt(k),
                         "anchor": mean_interval(b["anchor"]), "neg": mean_interval(b["neg_group_means"]),
                         "neg_points": b["neg_points"]}
    return {"per_kprime": per_k, "fit": {"anchor": ols(ax, ay), "negative": ols(nx, ny), "pooled": ols(ax + nx, ay + ny)},
            "groups": len(points), "anchor_points": len(ay), "negative_points": len(ny)}


def accuracy_gains(groups: list[dict], triggers: list[dict], horizon: int) -> dict:
    """ΔAcc@H per trigger (a group record at step t): mean ``accuracy`` of the groups of the same
    ``prompt_id`` in steps (t, t + H] minus the trigger group's own accuracy. Triggers whose prompt is not
    seen again within H steps are dropped and counted (``censored``: of those, the ones whose horizon runs
    past the last logged step)."""
    by_prompt: dict = {}
    for g in groups:
        by_prompt.setdefault(g.get("prompt_id"), []).append(g)
    last_step = max((g["step"] for g in groups), default=0)
    gains, dropped, censored = [], 0, 0
    for trig in triggers:
        t = trig["step"]
        later = [g["accuracy"] for g in by_prompt.get(trig.get("prompt_id"), [])
                 if t < g["step"] <= t + horizon and _finite(g.get("accuracy"))]
        if not later or trig.get("prompt_id") is None:
            dropped += 1
            censored += t + horizon > last_step
            continue
        gains.append({"step": t, "prompt_id": trig["prompt_id"], "accuracy_t": float(trig["accuracy"]),
                      "accuracy_after": sum(later) / len(later), "revisits": len(later),
                      "gain": sum(later) / len(later) - float(trig["accuracy"])})
    return {"gains": gains, "kept": len(gains), "dropped": dropped, "censored": censored,
            "mean": sum(x["gain"] for x in gains) / len(gains) if gains else None}


def paired_deltas(baseline: dict[int, float], variant: dict[int, float], window: int = 1) -> dict[int, float]:
    """variant - baseline at every step both logged (one seed), then the trailing mean over ``window`` steps."""
    delta = {t: variant[t] - baseline[t] for t in sorted(set(baseline) & set(variant))}
    return trailing_mean(delta, window) if window > 1 else delta


def interpolate(curve: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear value of a sorted curve at x (clamped to its ends)."""
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


def normalised_auc(curve: list[tuple[float, float]], low: float, high: float) -> float | None:
    """Trapezoid area of the piecewise-linear curve over [low, high], divided by high - low (an average accuracy)."""
    curve = sorted(curve)
    if not curve or high <= low:
        return None
    xs = [low, *[x for x, _ in curve if low < x < high], high]
    ys = [interpolate(curve, x) for x in xs]
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
    return area / (high - low)


def common_range(curves: list[list[tuple[float, float]]]) -> tuple[float, float] | None:
    """[largest first x, smallest last x] over the curves: the token range every run covers."""
    curves = [c for c in curves if c]
    if not curves:
        return None
    return max(min(x for x, _ in c) for c in curves), min(max(x for x, _ in c) for c in curves)


def run_shape(run: RunData, fallback_config=None) -> tuple[int, int]:
    """(data.prompts_per_step, rollout.group_size) of a run: its config.yaml, else the base config, else defaults."""
    if run.config:
        return int(run.config["data"]["prompts_per_step"]), int(run.config["rollout"]["group_size"])
    if fallback_config is None:
        from care_megatron.config.schema import RunConfig

        fallback_config = RunConfig()
        print(f"warning: {run.directory} has no config.yaml; estimating tokens with the default prompts per step "
              f"and group size", file=sys.stderr)
    return fallback_config.data.prompts_per_step, fallback_config.rollout.group_size


def cumulative_tokens(run: RunData, fallback_config=None) -> tuple[dict[int, float], str]:
    """step -> decoded tokens up to and including that step (step 0: 0), and the source: ``exact`` when every
    training step logged ``tokens/decoded``, else ``estimate`` (``compare_algorithms.decoded_tokens``: the
    exact count of the steps that logged it, the estimate from mean lengths for the others)."""
    train_rows = {}
    for row in run.rows:
        if isinstance(row.get("step"), int) and row["step"] >= 1 and ("loss" in row or "reward/mean" in row
                                                                       or "tokens/decoded" in row):
            train_rows[row["step"]] = {**train_rows.get(row["step"], {}), **row}
    exact = bool(train_rows) and all(_finite(r.get("tokens/decoded")) for r in train_rows.values())
    if not exact:
        prompts, group = run_shape(run, fallback_config)
    total, out = 0.0, {0: 0.0}
    for step in sorted(train_rows):
        row = train_rows[step]
        total += float(row["tokens/decoded"]) if exact else compare.decoded_tokens(row, prompts, group)
        out[step] = total
    return out, "exact" if exact else "estimate"


# ------------------------------------------------------------------------------------ plotting helpers
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_band(ax, x, band: dict, label: str, **style):
    if not x:
        return
    line, = ax.plot(x, band["mean"], label=label, **style)
    ax.fill_between(x, band["low"], band["high"], color=line.get_color(), alpha=0.2)


def _finish(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _cell(stat: dict | None, signed: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean']:{'+' if signed else ''}.4f}"
    return text + (f" ± {stat['half_width']:.4f}" if stat.get("half_width") is not None else "")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _label(figure: Figure, variant: str) -> str:
    return figure.labels.get(variant, variant)


# ------------------------------------------------------------------------------------ figures
# Each takes {variant: {seed: RunData}}, the parsed arguments and the PNG path; returns (numbers, summary lines).
def figure_fig2(figure: Figure, runs: dict, args, png: Path) -> tuple[dict, list[str]]:
    points = []
    used = {}
    for variant, seeds in runs.items():
        for seed, run in seeds.items():
            mine = signature_points(run.groups)
            points += mine
            used.setdefault(variant, []).append(seed)
    if not points:
        raise FigureError("no anchored CARE group with K' >= 1 in groups.jsonl of the runs")
    result = signature(points)
    plt = _pyplot()
    import random

    sample = points if sum(1 + len(p["neg_z"]) for p in points) <= MAX_SCATTER_POINTS else \
        random.Random(0).sample(points, max(1, MAX_SCATTER_POINTS * len(points) // sum(1 + len(p["neg_z"]) for p in points)))
    result["points_plotted_groups"] = len(sample)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, side, theory_key, title in ((axes[0], "anchor", "theory_anchor", "anchor z vs sqrt(K')"),
                                        (axes[1], "neg", "theory_neg", "negative z vs -1/sqrt(K')")):
        if side == "anchor":
            xs = [math.sqrt(p["k_prime"]) for p in sample if p["anchor_z"] is not None]
            ys = [p["anchor_z"] for p in sample if p["anchor_z"] is not None]
        else:
            xs = [-1 / math.sqrt(p["k_prime"]) for p in sample for _ in p["neg_z"]]
            ys = [z for p in sample for z in p["neg_z"]]
        ax.scatter(xs, ys, s=6, alpha=0.15, color="grey", label="individual")
        bx, by, err = [], [], []
        for k, bucket in result["per_kprime"].items():
            stat = bucket[side]
            if stat["mean"] is None:
                continue
            bx.append(bucket[theory_key])
            by.append(stat["mean"])
            err.append(stat["half_width"] or 0.0)
        ax.errorbar(bx, by, yerr=err, fmt="o", color="C0", capsize=3, label="bucket mean (95% CI over groups)")
        for x, k in zip(bx, [k for k, b in result["per_kprime"].items() if b[side]["mean"] is not None]):
            ax.annotate(f"K'={k}", (x, by[bx.index(x)]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        lims = [min(xs + bx + [0.0]), max(xs + bx + [0.0])]
        ax.plot(lims, lims, "k--", lw=0.8, label="theory (y = x)")
        fit = result["fit"]["anchor" if side == "anchor" else "negative"]
        if fit["slope"] is not None:
            ax.plot(lims, [fit["slope"] * x + fit["intercept"] for x in lims], color="C3", lw=1,
                    label=f"OLS slope {fit['slope']:.3f}, r {fit['r'] if fit['r'] is not None else float('nan'):.3f}")
        ax.set_xlabel("theory" + (" sqrt(K')" if side == "anchor" else " -1/sqrt(K')"))
        ax.set_ylabel("observed pre-scaling z")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _finish(fig, png)
    result["seeds"] = used
    rows = [[k, str(b["groups"]), f"{b['theory_anchor']:.3f}", _cell(b["anchor"]), f"{b['theory_neg']:.3f}",
             _cell(b["neg"])] for k, b in result["per_kprime"].items()]
    lines = _table(["K'", "groups", "sqrt(K')", "anchor z", "-1/sqrt(K')", "negative z"], rows)
    for name, fit in result["fit"].items():
        if fit["slope"] is not None:
            lines.append(f"{name}: slope {fit['slope']:.4f}, intercept {fit['intercept']:.4f}, "
                         f"r {'-' if fit['r'] is None else format(fit['r'], '.4f')} (n = {fit['n']})")
        else:
            lines.append(f"{name}: no fit (n = {fit['n']}, no spread in the theory values)")
    return result, lines


def figure_fig5(figure: Figure, runs: dict, args, png: Path) -> tuple[dict, list[str]]:
    result = {"smooth": args.smooth, "variants": {}}
    panels = [("eval/macro_accuracy", "macro held-out accuracy (greedy)"),
              ("eval_sampled/macro_accuracy", "macro held-out accuracy (sampled, mean@N)"),
              ("adv/anchor_mean", f"anchor advantage ({args.smooth}-step trailing mean)")]
    for variant, seeds in runs.items():
        entry, fallback = {}, []
        for key, _ in panels:
            per_seed = {}
            for seed, run in seeds.items():
                series = step_series(run.rows, key, train_only=key.startswith("adv/"))
                if key == "eval/macro_accuracy" and not series:  # a run that logged no macro average
                    series = step_series(run.rows, "eval/accuracy")
                    fallback.append(seed)
                per_seed[seed] = trailing_mean(series, args.smooth) if key.startswith("adv/") else series
            entry[key] = {"band": step_band(per_seed),
                          "final": mean_interval([final_value(s) for s in per_seed.values()])}
            if key.startswith("adv/"):
                entry[key]["mean_over_steps"] = mean_interval(
                    [sum(s.values()) / len(s) for s in (step_series(r.rows, key, True) for r in seeds.values()) if s])
        entry["seeds_without_macro_accuracy"] = fallback  # these drew eval/accuracy instead
        result["variants"][variant] = entry
    present = [(k, t) for k, t in panels if any(v[k]["band"]["step"] for v in result["variants"].values())]
    if not present:
        raise FigureError("no eval/macro_accuracy, eval_sampled/macro_accuracy or adv/anchor_mean in the runs")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], present):
        for i, (variant, entry) in enumerate(result["variants"].items()):
            _draw_band(ax, entry[key]["band"]["step"], entry[key]["band"], _label(figure, variant), color=f"C{i}")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _finish(fig, png)
    rows = [[_label(figure, v), _cell(e["eval/macro_accuracy"]["final"]), _cell(e["eval_sampled/macro_accuracy"]["final"]),
             _cell(e["adv/anchor_mean"]["mean_over_steps"])] for v, e in result["variants"].items()]
    return result, _table(["selector", "final macro acc (greedy)", "final macro acc (sampled)",
                           "anchor advantage, mean over steps"], rows)


def figure_fig6(figure: Figure, runs: dict, args, png: Path) -> tuple[dict, list[str]]:
    if FIG6_BASELINE not in runs:
        raise FigureError(f"fig6 needs the baseline variant {FIG6_BASELINE} (the stepwise deltas are taken against it)")
    base = runs[FIG6_BASELINE]
    result = {"baseline": FIG6_BASELINE, "smooth": args.smooth, "variants": {}}
    for variant, seeds in runs.items():
        if variant == FIG6_BASELINE:
            continue
        paired = sorted(set(seeds) & set(base))
        entry = {"paired_seeds": paired}
        for key, _ in FIG6_METRICS:
            raw = {s: paired_deltas(step_series(base[s].rows, key, True), step_series(seeds[s].rows, key, True))
                   for s in paired}
            smoothed = {s: trailing_mean(d, args.smooth) for s, d in raw.items()}
            entry[key] = {"band": step_band(smoothed),
                          "mean_delta": mean_interval([sum(d.values()) / len(d) for d in raw.values() if d]),
                          "share_steps_below_zero": mean_interval(
                              [sum(v < 0 for v in d.values()) / len(d) for d in raw.values() if d])}
        result["variants"][variant] = entry
    if not result["variants"]:
        raise FigureError("fig6 needs at least one neg_scale variant besides the baseline")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, title) in zip(axes, FIG6_METRICS):
        for i, (variant, entry) in enumerate(result["variants"].items()):
            _draw_band(ax, entry[key]["band"]["step"], entry[key]["band"], _label(figure, variant), color=f"C{i}")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xlabel("step")
        ax.set_title(f"Δ {title}\nvs {_label(figure, FIG6_BASELINE)}, {args.smooth}-step trailing mean", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _finish(fig, png)
    rows = [[_label(figure, v), *[_cell(e[k]["mean_delta"], True) for k, _ in FIG6_METRICS],
             *[_cell(e[k]["share_steps_below_zero"]) for k, _ in FIG6_METRICS]] for v, e in result["variants"].items()]
    return result, _table(["scale", "Δ clip rate (neg. answer)", "Δ variance ratio", "share of steps Δclip < 0",
                           "share of steps Δvar < 0"], rows)


def _gains_per_seed(seeds: dict, trigger, horizon: int) -> dict:
    out = {}
    for seed, run in seeds.items():
        groups = run.groups
        if not groups:
            raise FigureError(f"{run.directory}: no groups.jsonl (runs from before the trainer wrote it)")
        out[seed] = accuracy_gains(groups, [g for g in groups if trigger(g)], horizon)
    return out


def _gain_summary(per_seed: dict) -> dict:
    gains = [x["gain"] for d in per_seed.values() for x in d["gains"]]
    return {"per_seed_mean": mean_interval([d["mean"] for d in per_seed.values()]),
            "pooled": mean_interval(gains), "kept": sum(d["kept"] for d in per_seed.values()),
            "dropped": sum(d["dropped"] for d in per_seed.values()),
            "censored": sum(d["censored"] for d in per_seed.values())}


def figure_fig7(figure: Figure, runs: dict, args, png: Path) -> tuple[dict, list[str]]:
    result = {"horizon": args.horizon, "variants": {}}
    for variant, seeds in runs.items():
        per_seed = _gains_per_seed(seeds, lambda g: bool(g.get("all_negative")), args.horizon)
        norms, other = {}, {}
        for seed, run in seeds.items():
            triggered = {g["step"] for g in run.groups if g.get("all_negative")}
            series = step_series(run.rows, "update/param_norm", True)
            norms[seed] = [series[t] for t in sorted(triggered) if t in series]
            other[seed] = [v for t, v in series.items() if t not in triggered]
        result["variants"][variant] = {
            "gains": {str(s): d for s, d in per_seed.items()}, **_gain_summary(per_seed),
            "param_norm_triggered": {str(s): v for s, v in norms.items()},
            "param_norm_triggered_per_seed_mean": mean_interval([sum(v) / len(v) for v in norms.values() if v]),
            "param_norm_triggered_pooled": mean_interval([x for v in norms.values() for x in v]),
            "param_norm_other_steps_per_seed_mean": mean_interval([sum(v) / len(v) for v in other.values() if v])}
    if FIG7_ON in runs and FIG7_OFF in runs:
        on, off = result["variants"][FIG7_ON], result["variants"][FIG7_OFF]
        paired = sorted(set(runs[FIG7_ON]) & set(runs[FIG7_OFF]))
        result["on_minus_off"] = {
            "paired_seeds": paired,
            "gain": mean_interval([on["gains"][str(s)]["mean"] - off["gains"][str(s)]["mean"] for s in paired
                                   if on["gains"][str(s)]["mean"] is not None and off["gains"][str(s)]["mean"] is not None]),
            "param_norm_triggered": mean_interval(
                [sum(on["param_norm_triggered"][str(s)]) / len(on["param_norm_triggered"][str(s)])
                 - sum(off["param_norm_triggered"][str(s)]) / len(off["param_norm_triggered"][str(s)])
                 for s in paired if on["param_norm_triggered"][str(s)] and off["param_norm_triggered"][str(s)]])}
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = list(result["variants"])
    labels = [_label(figure, v) for v in names]
    for ax, data, means, title in (
            (axes[0], [[x["gain"] for d in result["variants"][v]["gains"].values() for x in d["gains"]] for v in names],
             [result["variants"][v]["pooled"]["mean"] for v in names], f"ΔAcc@{args.horizon} per all-negative trigger"),
            (axes[1], [[x for xs in result["variants"][v]["param_norm_triggered"].values() for x in xs] for v in names],
             [result["variants"][v]["param_norm_triggered_pooled"]["mean"] for v in names],
             "update/param_norm on triggered steps")):
        shown = [(i, d) for i, d in enumerate(data) if d]
        if shown:
            ax.boxplot([d for _, d in shown], positions=[i for i, _ in shown], widths=0.5, showfliers=True)
        for i, m in enumerate(means):
            if m is not None:
                ax.plot(i, m, "D", color="C3", label="mean" if i == 0 else None)
                ax.annotate(f"{m:.3g}", (i, m), textcoords="offset points", xytext=(8, 0), fontsize=7)
        ax.set_xticks(range(len(names)), labels)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].axhline(0.0, color="k", lw=0.8)
    _finish(fig, png)
    rows = [[_label(figure, v), str(e["kept"]), f"{e['dropped']} ({e['censored']} at the end)",
             _cell(e["per_seed_mean"]), _cell(e["pooled"]), _cell(e["param_norm_triggered_per_seed_mean"]),
             _cell(e["param_norm_other_steps_per_seed_mean"])] for v, e in result["variants"].items()]
    lines = _table(["variant", "triggers kept", "dropped (no revisit)", f"ΔAcc@{args.horizon} (seeds)",
                    f"ΔAcc@{args.horizon} (pooled)", "param norm, triggered", "param norm, other steps"], rows)
    if "on_minus_off" in result:
        lines.append(f"ON - OFF, paired by seed: ΔAcc {_cell(result['on_minus_off']['gain'], True)}, "
                     f"param norm {_cell(result['on_minus_off']['param_norm_triggered'], True)}")
    return result, lines


def figure_fig9_10(figure: Figure, runs: dict, args, png: Path) -> tuple[dict, list[str]]:
    panels = [("eval/accuracy", "held-out accuracy (greedy)", False),
              ("eval_sampled/accuracy", "held-out accuracy (sampled, mean@N)", False),
              ("kl", "KL to reference", True)]
    result = {"variants": {}}
    for variant, seeds in runs.items():
        entry = {}
        for key, _, train_only in panels:
            per_seed = {s: step_series(r.rows, key, train_only) for s, r in seeds.items()}
            entry[key] = {"band": step_band(per_seed), "final": mean_interval([final_value(v) for v in per_seed.values()])}
        result["variants"][variant] = entry
    present = [p for p in panels if any(v[p[0]]["band"]["step"] for v in result["variants"].values())]
    if not present:
        raise FigureError("no eval/accuracy or kl in the runs")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.8), squeeze=False)
    for ax, (key, title, _) in zip(axes[0], present):
        for variant, entry in result["variants"].items():
            k = variant.split("_")[0]
            color = {"k2": "C0", "k4": "C1", "k6": "C2"}.get(k)
            style = {"color": color} if color else {}
            _draw_band(ax, entry[key]["band"]["step"], entry[key]["band"], _label(figure, variant),
                       linestyle="--" if variant.endswith("_off") else "-", **style)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _finish(fig, png)
    rows = [[_label(figure, v), *[_cell(e[k]["final"]) for k, _, _ in panels]] for v, e in result["variants"].items()]
    return result, _table(["variant", "final acc (greedy)", "final acc (sampled)", "final KL"], rows)


def figure_fig12(figure: Figure, runs: dict, args, png: Path) -> tuple[dict, list[str]]:
    result = {"horizon": args.horizon, "variants": {}}
    last = max((row.get("step", 0) for seeds in runs.values() for r in seeds.values() for row in r.rows), default=1)
    width = args.bin_steps or max(1, math.ceil(last / 10))
    result["bin_steps"] = width
    for variant, seeds in runs.items():
        per_seed = _gains_per_seed(seeds, lambda g: bool(g.get("rgr_triggered")), args.horizon)
        binned = {}
        for seed, d in per_seed.items():
            bins = {}
            for x in d["gains"]:
                bins.setdefault((x["step"] - 1) // width, []).append(x["gain"])
            binned[seed] = {b: sum(v) / len(v) for b, v in bins.items()}
        all_bins = sorted({b for v in binned.values() for b in v})
        stats = [mean_interval([v[b] for v in binned.values() if b in v]) for b in all_bins]
        band = {"step": [b * width + (width + 1) / 2 for b in all_bins], "mean": [s["mean"] for s in stats],
                "low": [s["low"] if s["low"] is not None else s["mean"] for s in stats],
                "high": [s["high"] if s["high"] is not None else s["mean"] for s in stats],
                "n": [s["n"] for s in stats]}
        result["variants"][variant] = {"gains": {str(s): d for s, d in per_seed.items()}, **_gain_summary(per_seed),
                                       "binned": band}
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    names = list(result["variants"])
    for i, variant in enumerate(names):
        band = result["variants"][variant]["binned"]
        _draw_band(axes[0], band["step"], band, _label(figure, variant), color=f"C{i}", marker="o", ms=3)
        stat = result["variants"][variant]["per_seed_mean"]
        if stat["mean"] is not None:
            axes[1].errorbar([i], [stat["mean"]], yerr=[[stat["mean"] - (stat["low"] if stat["low"] is not None else stat["mean"])],
                                                        [(stat["high"] if stat["high"] is not None else stat["mean"]) - stat["mean"]]],
                             fmt="o", color=f"C{i}", capsize=4)
    axes[0].axhline(0.0, color="k", lw=0.8)
    axes[0].set_xlabel(f"training step (bins of {width})")
    axes[0].set_title(f"mean ΔAcc@{args.horizon} per RGR trigger", fontsize=9)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].axhline(0.0, color="k", lw=0.8)
    axes[1].set_xticks(range(len(names)), [_label(figure, v) for v in names], fontsize=7, rotation=20)
    axes[1].set_title("overall (mean of per-seed means, 95% CI)", fontsize=9)
    axes[1].grid(alpha=0.3)
    _finish(fig, png)
    rows = [[_label(figure, v), str(e["kept"]), f"{e['dropped']} ({e['censored']} at the end)", _cell(e["per_seed_mean"]),
             _cell(e["pooled"])] for v, e in result["variants"].items()]
    return result, _table(["variant", "triggers kept", "dropped (no revisit)", f"ΔAcc@{args.horizon} (seeds)",
                           f"ΔAcc@{args.horizon} (pooled)"], rows)


def figure_tokens(figure: Figure, runs: dict, args, png: Path) -> tuple[dict, list[str]]:
    keys = (("eval/accuracy", "held-out accuracy (greedy)"), ("eval_sampled/accuracy", "held-out accuracy (sampled, mean@N)"))
    result = {"variants": {}, "token_source": {}}
    curves = {}
    for variant, seeds in runs.items():
        for seed, run in seeds.items():
            tokens, source = cumulative_tokens(run, getattr(args, "base_config", None))
            result["token_source"].setdefault(variant, {})[str(seed)] = source
            if source != "exact":
                print(f"warning: {run.directory}: no tokens/decoded on every step; decoded tokens estimated from "
                      f"length/response_mean (compare_algorithms.decoded_tokens)", file=sys.stderr)
            for key, _ in keys:
                series = step_series(run.rows, key)
                curve = [(tokens[t], v) for t, v in series.items() if t in tokens]
                if curve:
                    curves.setdefault(key, {}).setdefault(variant, {})[seed] = curve
    if not curves:
        raise FigureError("no eval/accuracy in the runs")
    for key, _ in keys:
        if key not in curves:
            continue
        span = common_range([c for v in curves[key].values() for c in v.values()])
        entry = {"token_range": list(span) if span else None, "variants": {}}
        for variant, seeds in curves[key].items():
            aucs = {s: normalised_auc(c, *span) if span else None for s, c in seeds.items()}
            entry["variants"][variant] = {
                "auc": {str(s): a for s, a in aucs.items()}, "auc_mean": mean_interval(list(aucs.values())),
                "final": mean_interval([sorted(c)[-1][1] for c in seeds.values()]),
                "tokens_total": mean_interval([sorted(c)[-1][0] for c in seeds.values()]),
                "curves": {str(s): c for s, c in seeds.items()},
                "band": compare.band(list(seeds.values()))}
        methods = list(entry["variants"])
        reference = "table2_grpo" if "table2_grpo" in methods else None
        if reference:
            for variant in methods:
                if variant != reference:
                    a, b = entry["variants"][variant]["auc"], entry["variants"][reference]["auc"]
                    entry["variants"][variant]["auc_delta_vs_grpo"] = mean_interval(
                        [a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None])
        result[key] = entry
    present = [(k, t) for k, t in keys if k in result]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(present), figsize=(5.5 * len(present), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], present):
        for i, (variant, entry) in enumerate(result[key]["variants"].items()):
            auc = entry["auc_mean"]["mean"]
            _draw_band(ax, entry["band"]["x"], entry["band"],
                       f"{_label(figure, variant)} (AUC {auc:.3f})" if auc is not None else _label(figure, variant),
                       color=f"C{i}")
        if result[key]["token_range"]:
            ax.axvline(result[key]["token_range"][1], color="k", lw=0.8, ls=":", label="end of common range")
        ax.set_xlabel("cumulative decoded tokens")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _finish(fig, png)
    lines = []
    for key, title in present:
        rng = result[key]["token_range"]
        lines.append(f"{title}: AUC over tokens [{rng[0]:.0f}, {rng[1]:.0f}], normalised by the range" if rng else title)
        rows = [[_label(figure, v), _cell(e["auc_mean"]), _cell(e.get("auc_delta_vs_grpo"), True), _cell(e["final"]),
                 f"{e['tokens_total']['mean']:.3g}",
                 ",".join(sorted(set(result["token_source"].get(v, {}).values())))] for v, e in result[key]["variants"].items()]
        lines += _table(["method", "AUC (avg acc)", "Δ AUC vs GRPO", "final acc", "tokens", "token count"], rows)
    return result, lines


DRAW = {"fig2": figure_fig2, "fig5": figure_fig5, "fig6": figure_fig6, "fig7": figure_fig7, "fig9_10": figure_fig9_10,
        "fig12": figure_fig12, "tokens": figure_tokens}


# ------------------------------------------------------------------------------------ output
def _clean(value):
    """JSON-safe: tuples as lists, non-finite floats as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def draw_figure(name: str, runs: dict, args, out: Path, command: str) -> dict:
    figure = FIGURES[name]
    if figure.needs_groups:
        for variant, seeds in runs.items():
            missing = [str(r.directory) for r in seeds.values() if not (r.directory / "groups.jsonl").exists()]
            if missing:
                raise FigureError(f"{name} reads groups.jsonl, missing in {', '.join(missing)} "
                                  f"(runs from before the trainer wrote it)")
    png = out / f"{name}.png"
    numbers, lines = DRAW[name](figure, runs, args, png)
    payload = {"figure": name, "title": figure.title, "command": command, "png": str(png),
               "runs": {v: {str(s): str(r.directory) for s, r in seeds.items()} for v, seeds in runs.items()},
               "labels": {v: _label(figure, v) for v in runs}, **numbers}
    (out / f"{name}.json").write_text(json.dumps(_clean(payload), indent=1, allow_nan=False) + "\n")
    print(f"\n== {name}: {figure.title} -> {png}, {out / f'{name}.json'}")
    print("\n".join(lines))
    return payload


def parse_runs(items: list[str]) -> dict[str, list[Path]]:
    runs: dict[str, list[Path]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--runs {item!r}: expected VARIANT=RUN_DIR[,RUN_DIR...]")
        variant, dirs = item.split("=", 1)
        paths = [Path(d) for d in dirs.split(",") if d]
        if not variant or not paths:
            raise ValueError(f"--runs {item!r}: expected VARIANT=RUN_DIR[,RUN_DIR...]")
        runs.setdefault(variant, []).extend(paths)
    return runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="fig7 and fig12 train on data.train_size = 4 x data.prompts_per_step by default (a prompt comes back "
               "1-7 steps later, inside the default --horizon 8); data.train_size=N among the overrides replaces it. "
               "Definitions of every number: docs/experiments.md.")
    parser.add_argument("figure", choices=[*FIGURES, "all"], help="which figure")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every run (config mode)")
    parser.add_argument("--config", default=None, help="base YAML config (default: the built-in tiny CPU run)")
    parser.add_argument("--runs", nargs="+", action="extend", default=None, metavar="VARIANT=RUN_DIR[,RUN_DIR...]",
                        help="draw from existing run directories (k-th directory of each variant = seed k); no training")
    parser.add_argument("--out", required=True, help="output directory (runs/ and the figures' PNG + JSON)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per variant (config mode)")
    parser.add_argument("--variants", type=lambda text: [v for v in text.split(",") if v], action="extend",
                        default=None, metavar="NAME[,NAME...]",
                        help="replace the figure's variants by these ablation files (names in examples/configs/ablations)")
    parser.add_argument("--no-run", action="store_true", help="never train; draw from the finished runs")
    parser.add_argument("--slurm", action="store_true", help="print one sbatch line per unfinished run and stop")
    parser.add_argument("--submit", action="store_true", help="with --slurm: submit them")
    parser.add_argument("--sbatch", default="examples/slurm/care_qwen2_5_vl_7b.sbatch",
                        help="sbatch script taking CONFIG from the environment and overrides as arguments")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train this many runs at once, each its own process with train.threads=1 (default 1: in-process)")
    parser.add_argument("--horizon", type=int, default=DEFAULT_HORIZON, help="H of ΔAcc@H, in steps (fig7, fig12)")
    parser.add_argument("--smooth", type=int, default=DEFAULT_SMOOTH,
                        help="trailing-mean window in steps: fig5's anchor advantage, fig6's deltas (1 = none)")
    parser.add_argument("--bin-steps", type=int, default=0, help="fig12's step bin width (0: a tenth of the run)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    command = "python tools/paper_figures.py " + shlex.join(argv)
    for flag, value, low in (("--seeds", args.seeds, 1), ("--jobs", args.jobs, 1), ("--horizon", args.horizon, 1),
                             ("--smooth", args.smooth, 1), ("--bin-steps", args.bin_steps, 0)):
        if value < low:
            parser.error(f"{flag} must be >= {low}")
    names = list(FIGURES) if args.figure == "all" else [args.figure]
    if args.variants and args.figure == "all":
        parser.error("--variants replaces one figure's variants; name a figure, not all")
    out = Path(args.out)
    args.base_config = None
    try:
        if args.runs is not None:
            if args.overrides or args.config or args.slurm:
                parser.error("--runs draws existing runs: no --config, --slurm or overrides")
            given = parse_runs(args.runs)
            data = {v: {k: load_run(d) for k, d in enumerate(dirs)} for v, dirs in given.items()}
            per_figure = {}
            for name in names:
                wanted = list(args.variants or FIGURES[name].variants)
                # the figure's own order first; a single figure also draws any other variant it was given
                order = [*[v for v in wanted if v in given], *([] if args.figure == "all" else
                                                              [v for v in given if v not in wanted])]
                chosen = {v: data[v] for v in order}
                if chosen:
                    per_figure[name] = chosen
            executed, failed = [], []
        else:
            figures = [FIGURES[n] for n in names]
            plan = plan_runs(figures, args.config, args.overrides, args.seeds, out, args.variants,
                             threads_one=args.jobs > 1)
            args.base_config = load_config(args.config, args.overrides)
            for run in plan:
                check_record(run, args.config)
            unfinished = [r for r in plan if not compare.is_finished(r.directory, r.steps)]
            if args.slurm:
                for run in unfinished:
                    line = compare.sbatch_line(args.sbatch, args.config, run.overrides,
                                               f"fig-{run.key}-s{run.seed}", run.directory)
                    print(line)
                    if args.submit:
                        write_record(run, args.config)
                        subprocess.run(shlex.split(line), check=True)
                return {"sbatch": len(unfinished)}
            executed, failed = [], []
            if unfinished and not args.no_run:
                failed = train_runs(unfinished, args.config, args.jobs)
                executed = [f"{r.key}/seed{r.seed}" for r in unfinished if f"{r.key}/seed{r.seed}" not in failed]
            per_figure = {}
            for name in names:
                keyed = {}
                for run in plan:
                    if name not in run.figures:
                        continue
                    if compare.is_finished(run.directory, run.steps):
                        loaded = load_run(run.directory)
                        for figure_name, drawn in sorted(run.uses):
                            if figure_name == name:
                                keyed.setdefault(drawn, {})[run.seed] = loaded
                    else:
                        print(f"warning: {run.directory} is not finished; {name} leaves it out", file=sys.stderr)
                if keyed:
                    per_figure[name] = keyed
    except ValueError as exc:
        print(f"paper_figures: {exc}", file=sys.stderr)
        raise SystemExit(2)
    out.mkdir(parents=True, exist_ok=True)
    results, errors = {}, {}
    for name in names:
        if name not in per_figure:
            errors[name] = "no run of its variants (finished, or given with --runs)"
            print(f"\n== {name}: skipped, {errors[name]}", file=sys.stderr)
            continue
        try:
            results[name] = draw_figure(name, per_figure[name], args, out, command)
        except FigureError as exc:
            errors[name] = str(exc)
            print(f"\n== {name}: not drawn: {exc}", file=sys.stderr)
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
    if errors and len(names) == 1:
        raise SystemExit(2)
    return {"figures": results, "errors": errors, "executed": executed, "failed": failed}


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result.get("failed") else 0)

"""Time the vectorised ``care_advantages`` against a plain per-group Python loop.

The loop implementation below (``care_advantages_loop``) is the straightforward reading of
``shared/CARE_SPEC.md`` sections 2-5, one group and one rollout at a time with Python lists; the
tests in ``tests/algorithm/test_care_parity.py`` check the vectorised version equals it on random
batches. Usage::

    python tools/bench_advantages.py [--groups 512] [--group-size 8] [--dim 256] [--threads 1]
    python tools/bench_advantages.py --device cuda   # also time on the accelerator and check it
                                                     # gives the CPU's advantages and losses
"""
from __future__ import annotations

import argparse
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _cos_dist(a: list[float], b: list[float]) -> float:
    return 1.0 - sum(x * y for x, y in zip(a, b))


def _normalise(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / max(norm, 1e-12) for x in v]


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return 0.5 * (s[(n - 1) // 2] + s[n // 2])


def care_advantages_loop(group_index, rewards, correct, think_lengths, answer_lengths, think_embeddings,
                         sequence_logprobs, config, reflected_from=None):
    """Reference: same contract as ``care_advantages`` (advantages + a subset of ``info``), one group at a time."""
    n = len(rewards)
    gi = [int(x) for x in group_index]
    r = [float(x) for x in rewards.double()]
    ok = [bool(x) for x in correct]
    tl = [int(x) for x in think_lengths]
    al = [int(x) for x in answer_lengths]
    lp = [float(x) for x in sequence_logprobs.double()]
    emb = [_normalise([float(x) for x in row]) for row in think_embeddings.double()]
    refl = [-1] * n if reflected_from is None else [int(x) for x in reflected_from]
    k = config.k
    group_ids = sorted(set(gi))
    gen = torch.Generator().manual_seed(config.seed)
    width = max([sum(1 for i in range(n) if gi[i] == g and refl[i] < 0) for g in group_ids], default=0)
    keys = torch.rand((len(group_ids), width), generator=gen, dtype=torch.float64).tolist()
    reflection_of = {refl[j]: j for j in range(n) if refl[j] >= 0}

    adv = [0.0] * n
    out = {"anchor_index": [], "num_negatives": [], "rgr_target": [], "rescue": [], "negative_indices": []}
    for g_num, g in enumerate(group_ids):
        members = [i for i in range(n) if gi[i] == g and refl[i] < 0]
        key = {i: keys[g_num][c] for c, i in enumerate(members)}
        pos = [i for i in members if ok[i]]
        fails = [i for i in members if not ok[i]]
        lead, negs, rescue, target = -1, [], False, -1
        if pos and fails:
            if config.anchor_rule == "shortest_think":
                lead = min(pos, key=lambda i: (tl[i], al[i], i))
            elif config.anchor_rule == "max_reward":
                lead = min(pos, key=lambda i: (-r[i], tl[i], al[i], i))
            else:
                lead = min(pos, key=lambda i: (key[i], i))
            d = {i: _cos_dist(emb[i], emb[lead]) for i in fails}
            kp = min(k, config.preselect_m, len(fails))
            nearest_order = sorted(fails, key=lambda i: (d[i], i))
            farthest_order = sorted(fails, key=lambda i: (-d[i], i))
            if config.negative_selector == "cosine":
                pre = nearest_order[: config.preselect_m]
                negs = [pre[0]]
                while len(negs) < kp:
                    rest = [i for i in pre if i not in negs]
                    negs.append(max(rest, key=lambda i: (min(_cos_dist(emb[i], emb[j]) for j in negs), -i)))
            elif config.negative_selector == "random":
                negs = sorted(fails, key=lambda i: (key[i], i))[:kp]
            elif config.negative_selector == "farthest":
                negs = farthest_order[:kp]
            else:
                n_near = (kp + 1) // 2
                negs = nearest_order[:n_near]
                negs += [i for i in farthest_order if i not in negs][: kp - n_near]
            target = min(negs, key=lambda i: (d[i], i))
            sub = [lead] + [reflection_of.get(i, i) for i in negs]
            sub_r = [r[i] for i in sub]
        elif not pos and len(members) >= 2 and config.rescue:
            rescue = True
            lead = min(members, key=lambda i: (-r[i], -lp[i], i))
            kp = min(k, len(members) - 1)
            while len(negs) < kp:
                rest = [i for i in members if i != lead and i not in negs]
                negs.append(max(rest, key=lambda i: (min(_cos_dist(emb[i], emb[j]) for j in [lead] + negs), -i)))
            sub = [lead] + negs
            sub_r = [config.rescue_delta] + [-config.rescue_delta / kp] * kp
        else:
            out["anchor_index"].append(-1)
            out["num_negatives"].append(0)
            out["rgr_target"].append(-1)
            out["rescue"].append(False)
            out["negative_indices"].append([])
            continue
        m = len(sub_r)
        if config.robust_stats:
            cut = int(math.floor(0.2 * m))
            trimmed = sorted(sub_r)[cut: m - cut]
            mu = sum(trimmed) / len(trimmed)
            med = _median(sub_r)
            sigma = 1.4826 * _median([abs(x - med) for x in sub_r])
            if not sigma > config.eps:
                mean = sum(sub_r) / m
                sigma = math.sqrt(sum((x - mean) ** 2 for x in sub_r) / m)
        else:
            mu = sum(sub_r) / m
            sigma = math.sqrt(sum((x - mu) ** 2 for x in sub_r) / m)
        eq = math.sqrt(k / kp) if (config.equalize and kp < k) else 1.0
        for slot, (i, ri) in enumerate(zip(sub, sub_r)):
            z = (ri - mu) / (sigma + config.eps)
            if slot == 0:
                a = z
            elif refl[i] >= 0 and ok[i]:
                a = z
            elif refl[i] >= 0:
                a = -config.reflect_neg_scale * abs(z)
            else:
                a = -config.neg_scale * abs(z)
            adv[i] = a * eq
        out["anchor_index"].append(lead)
        out["num_negatives"].append(kp)
        out["rgr_target"].append(target)
        out["rescue"].append(rescue)
        out["negative_indices"].append(sub[1:])
    return torch.tensor(adv, dtype=torch.float64), out


def random_batch(groups: int, group_size: int, dim: int, seed: int = 0, p_correct: float = 0.35):
    """A batch shaped like a real step: binary accuracy with a format bonus, random lengths and embeddings."""
    gen = torch.Generator().manual_seed(seed)
    n = groups * group_size
    group_index = torch.arange(groups).repeat_interleave(group_size)
    difficulty = torch.rand(groups, generator=gen).repeat_interleave(group_size)
    correct = torch.rand(n, generator=gen) < p_correct * 2 * difficulty
    fmt = (torch.rand(n, generator=gen) < 0.8).float()
    rewards = 0.9 * correct.float() + 0.1 * fmt
    think = torch.randint(0, 64, (n,), generator=gen)
    answer = torch.randint(1, 8, (n,), generator=gen)
    emb = torch.randn(n, dim, generator=gen)
    logprobs = -torch.rand(n, generator=gen) * 50
    return group_index, rewards, correct, think, answer, emb, logprobs


def main() -> None:
    from care_megatron.algorithm.care import CareConfig, care_advantages

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256, help="embedding size D")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default=None, help="also run on this device (e.g. cuda) and compare with CPU")
    parser.add_argument("--skip-loop", action="store_true", help="do not time the slow loop reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = CareConfig()
    batch = random_batch(args.groups, args.group_size, args.dim)

    for _ in range(3):
        care_advantages(*batch, config)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fast, _ = care_advantages(*batch, config)
        times.append(time.perf_counter() - t0)
    fast_ms = 1e3 * sorted(times)[len(times) // 2]

    loop_ms = max_diff = None
    if not args.skip_loop:
        loop_times = []
        for _ in range(3):
            t0 = time.perf_counter()
            slow, _ = care_advantages_loop(*batch, config)
            loop_times.append(time.perf_counter() - t0)
        loop_ms = 1e3 * sorted(loop_times)[1]
        max_diff = float((fast.double() - slow).abs().max())

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"hardware: {cpu}; torch {torch.__version__}; threads={torch.get_num_threads()}")
    print(f"batch: {args.groups} groups x {args.group_size} rollouts, D={args.dim}")
    print(f"care_advantages (vectorised): {fast_ms:.2f} ms (median of {args.repeats})")
    if loop_ms is not None:
        print(f"care_advantages_loop (per-group Python): {loop_ms:.1f} ms (median of 3)")
        print(f"speed-up: {loop_ms / fast_ms:.1f}x; max |difference| = {max_diff:.2e}")
    if args.device:
        device_check(batch, config, fast, args.device, args.repeats)


def device_check(batch, config, cpu_advantages, device: str, repeats: int) -> None:
    """Time care_advantages on ``device`` and compare advantages and every policy loss with the CPU."""
    from care_megatron.algorithm.care import care_advantages
    from care_megatron.algorithm.policy_losses import (METHOD_DEFAULTS, PolicyLossConfig, build_token_advantages,
                                                       compute_normalisers, get_policy_loss)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    moved = [t.to(device) for t in batch]
    for _ in range(3):
        care_advantages(*moved, config)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dev_adv, dev_info = care_advantages(*moved, config)
        sync()
        times.append(time.perf_counter() - t0)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    print(f"device {name}: care_advantages {1e3 * sorted(times)[len(times) // 2]:.2f} ms (median of {repeats})")
    adv_diff = float((dev_adv.cpu().double() - cpu_advantages.double()).abs().max())
    _, cpu_info = care_advantages(*batch, config)
    same_sets = all(torch.equal(dev_info[k].cpu(), cpu_info[k]) for k in ("anchor_index", "negative_indices", "rgr_target"))
    print(f"device vs CPU: max |advantage difference| = {adv_diff:.2e}; same anchors / negatives / RGR targets: {same_sets}")

    gen = torch.Generator().manual_seed(0)
    num_seq, length = 64, 48
    seq_ids = torch.arange(num_seq).repeat_interleave(length)
    mask = torch.rand(num_seq * length, generator=gen) < 0.8
    regions = torch.randint(0, 3, (num_seq * length,), generator=gen)
    logp = -torch.rand(num_seq * length, generator=gen) * 4
    old = logp + (torch.rand(num_seq * length, generator=gen) - 0.5) * 0.6
    ref = logp + (torch.rand(num_seq * length, generator=gen) - 0.5)
    entropy = torch.rand(num_seq * length, generator=gen)
    seq_adv = torch.randn(num_seq, generator=gen)
    positive = torch.rand(num_seq, generator=gen) < 0.5
    worst = 0.0
    for method in sorted(METHOD_DEFAULTS):
        cfg = PolicyLossConfig.for_method(method, kl_coef=0.02, entropy_coef=0.01)
        results = []
        for dev in ("cpu", device):
            lp = logp.detach().clone().to(dev).requires_grad_(True)
            ids = seq_ids.to(dev)
            _, tok = build_token_advantages(method, seq_adv.to(dev), ids, mask.to(dev), regions.to(dev), positive.to(dev))
            norm = compute_normalisers(mask.to(dev), ids, max_response_length=length)
            loss, _ = get_policy_loss(method)(lp, old.to(dev), tok, mask.to(dev), ids, norm, cfg,
                                              ref_logprobs=ref.to(dev), entropy=entropy.to(dev), region_ids=regions.to(dev))
            loss.backward()
            results.append((loss.detach().cpu(), lp.grad.cpu()))
        diff = max(float((results[0][0] - results[1][0]).abs()), float((results[0][1] - results[1][1]).abs().max()))
        worst = max(worst, diff)
        print(f"  loss {method}: CPU {float(results[0][0]):+.6f} device {float(results[1][0]):+.6f} max diff {diff:.2e}")
    print(f"device vs CPU losses and gradients: worst difference {worst:.2e}")


if __name__ == "__main__":
    main()

"""CARE's anchored path through ``RLTrainer.step``, on scripted rollouts (``scripted_engine.py``).

One step holds two anchored groups (one RGR success, one RGR failure), one all-negative group
(rescue) and one all-positive group (saturated). Every expected number below comes from the
closed forms of docs/algorithm.md, written out here, never from a file the code wrote:

* rewards: r = 0.9 * accuracy + 0.1 * format (w_fmt = 0.1);
* two reward values in a subgroup of n with p at the higher one: z_high = sqrt((n - p) / p),
  z_low = -sqrt(p / (n - p)) (one anchor and K' negatives: sqrt(K') and -1/sqrt(K'));
* negatives -s |z| (s = 0.5), failed reflection -0.25 |z|, successful reflection its z;
* rescue: pseudo-rewards delta, -delta/K' -> the same two-value z-scores;
* equalisation sqrt(K / K') for K' < K (K = 4);
* region weights: answer 1, think 0.005 (positive) / 0 (failure), no answer span -> 1 everywhere;
* at the first step the policy is the behaviour and the reference policy (rho = 1, k3 = 0), so
  loss = -sum_i A_i W_i / (W_i + eps) / N_seq, W_i the weight sum of sequence i, N_seq the number of
  sequences with a non-zero advantage.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scripted_engine  # noqa: E402
from care_megatron.config import load_config  # noqa: E402
from care_megatron.rewards.regions import Region  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
G, K, EPS = 4, 4, 1e-6
SCRIPTED = [
    "data.tasks=[count_shapes]", "data.train_size=16", "data.eval_size=0", "data.prompts_per_step=4",
    "rollout.group_size=4", "rollout.max_new_tokens=40", "train.micro_batch_tokens=1024", "train.threads=1",
    "train.init_from=null", "train.eval_every=0", "train.lr=0.001",
]


def scripted_config(tmp_path, *extra):
    return load_config(ROOT / "examples/configs/tiny_cpu_shapes.yaml", [*SCRIPTED, f"train.output_dir={tmp_path}", *extra])


def two_value_z(n: int, p: int, gap: float) -> tuple[float, float]:
    """z-scores of a subgroup of n with p members ``gap`` above the others: population std
    sigma = gap sqrt(p (n - p)) / n, z = (r - mu) / (sigma + eps); for eps -> 0 they are
    sqrt((n - p) / p) and -sqrt(p / (n - p))."""
    sigma = gap * math.sqrt(p * (n - p)) / n
    return gap * (n - p) / n / (sigma + EPS), -gap * p / n / (sigma + EPS)


def equalise(kprime: int) -> float:
    return math.sqrt(K / kprime) if kprime < K else 1.0


def expected_advantages() -> dict[int, float]:
    """Row -> A for the 16 rollouts (row = 4 * slot + index) and the reflected rows 16 (slot 0) and 17 (slot 1)."""
    adv = {row: 0.0 for row in range(18)}
    # slot 0: anchor row 1 (max_reward: r = 1.0 beats row 0's 0.9, a correct answer without <think>,
    # which the shortest_think ablation would anchor on); row 0 is outside the subgroup (0).
    # Negatives rows 2, 3 (K' = 2); RGR target row 2 (tie -> lower
    # index) reflected successfully: subgroup {anchor 1.0, reflected 1.0, row 3 0.1}: p = 2 of n = 3
    z_pos, z_neg = two_value_z(3, 2, 0.9)
    adv[1] = adv[16] = z_pos * equalise(2)
    adv[3] = -0.5 * abs(z_neg) * equalise(2)
    # slot 1: anchor row 4, negatives rows 5, 6, 7 (K' = 3); target row 5, reflection fails (reward 0.1)
    z_a, z_n = two_value_z(4, 1, 0.9)
    adv[4] = z_a * equalise(3)
    adv[17] = -0.25 * abs(z_n) * equalise(3)
    adv[6] = adv[7] = -0.5 * abs(z_n) * equalise(3)
    # slot 2: all negative -> rescue: pseudo-anchor row 8 (the only formatted failure), K' = 3
    z_p, z_r = two_value_z(4, 1, 0.1 + 0.1 / 3)  # delta = 0.1 against -delta / K'

    adv[8] = z_p * equalise(3)
    adv[9] = adv[10] = adv[11] = -0.5 * abs(z_r) * equalise(3)
    # slot 3: saturated, all 0
    return adv


EXPECTED_REWARDS = [0.9, 1.0, 0.1, 0.1, 1.0, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1]


def closed_form_weights(regions: torch.Tensor, response: torch.Tensor, positive: bool) -> torch.Tensor:
    has_answer = bool(((regions == int(Region.ANSWER)) & response).any())
    if not has_answer:
        return response.float()
    think = 0.005 if positive else 0.0
    w = torch.where(regions == int(Region.ANSWER), 1.0, torch.where(regions == int(Region.THINK), think, 0.0))
    return torch.where(response, w, 0.0)


def run_scripted_step(tmp_path, *extra, steps: int = 1):
    from care_megatron.trainer import RLTrainer

    trainer = RLTrainer(scripted_config(tmp_path, *extra), progress=False)
    trainer.engine = scripted_engine.ScriptedRolloutEngine(trainer.tokenizer, trainer.data.train, G,
                                                           trainer.config.data.tag_config)
    captured = {"packed": [], "advantages": [], "seeds": []}
    real_train_step, real_advantages = trainer.backend.train_step, trainer.advantages

    def train_step(packed, loss_fn, normalisers):
        captured["packed"].append((packed, normalisers))
        params = [p for p in trainer.backend.model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        result = real_train_step(packed, loss_fn, normalisers)
        captured.setdefault("update_norms", []).append(
            math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(params, before))))
        return result

    def advantages(rollouts, embeddings, care_config=None):
        out = real_advantages(rollouts, embeddings, care_config)
        captured["advantages"].append((rollouts, out))
        captured["seeds"].append(care_config.seed)
        return out

    trainer.backend.train_step, trainer.advantages = train_step, advantages
    metrics = [trainer.step(step) for step in range(steps)]
    return trainer, metrics, captured


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    return run_scripted_step(tmp_path_factory.mktemp("scripted"), steps=2)


def test_script_gives_the_intended_groups(scripted_run):
    _, _, captured = scripted_run
    rollouts, (adv, info) = captured["advantages"][1]  # the call after RGR, on the step's final rollout list
    assert [r.reward for r in rollouts] == pytest.approx(EXPECTED_REWARDS, abs=1e-6)
    assert [r.reflected_from for r in rollouts[16:]] == [2, 5]
    assert info["anchored"].tolist() == [True, True, False, False]
    assert info["rescue"].tolist() == [False, False, True, False]
    assert info["saturated"].tolist() == [False, False, False, True]
    assert info["anchor_index"].tolist() == [1, 4, 8, -1]
    assert info["num_negatives"].tolist() == [2, 3, 3, 0]
    # the reflection request continues row 2's / row 5's rationale with the repair cue
    engine_requests = [r for r in scripted_run[0].engine.requests if "/rgr" in r.request_id]
    assert [r.request_id for r in engine_requests[:2]] == ["s0/rgr2/rgr", "s0/rgr5/rgr"]


def test_advantages_follow_the_closed_forms(scripted_run):
    _, _, captured = scripted_run
    _, (adv, _) = captured["advantages"][1]
    expected = expected_advantages()
    got = adv.tolist()
    for row, value in expected.items():
        assert got[row] == pytest.approx(value, rel=1e-5, abs=1e-6), row
    # spelled out once (eps -> 0): slot 0 -> +1, +1, -1 ; slot 1 -> 2, -1/6, -1/3, -1/3 ; rescue -> 2, -1/3 x 3
    assert [got[1], got[16], got[3], got[0]] == pytest.approx([1.0, 1.0, -1.0, 0.0], rel=1e-4)
    assert [got[4], got[17], got[6], got[8], got[9]] == pytest.approx([2.0, -1 / 6, -1 / 3, 2.0, -1 / 3], rel=1e-4)


def test_token_weights_advantages_and_loss(scripted_run):
    _, metrics, captured = scripted_run
    rollouts, _ = captured["advantages"][1]
    packed, normalisers = captured["packed"][0]
    expected = expected_advantages()
    assert normalisers["num_sequences"] == 18.0  # every sequence has an answer span or weighs 1 everywhere
    # CARE's N_seq (spec section 6): the sequences with a non-zero advantage, rows 1, 16, 3 (slot 0),
    # 4, 17, 6, 7 (slot 1) and 8-11 (rescue): 11; rows 2 and 5 were replaced by their reflections
    assert normalisers["num_advantaged_sequences"] == 11.0
    loss = 0.0
    seen = set()
    for mb in packed:
        seq_ids = mb.token_sequence_ids()
        for local, row in enumerate(mb.sequence_indices.tolist()):
            tokens = seq_ids == local
            response = mb.loss_mask[tokens].bool()
            weights = closed_form_weights(mb.region_ids[tokens], response, rollouts[row].correct)
            assert torch.allclose(mb.token_fields["token_weights"][tokens], weights), row
            total = float(weights.sum())
            assert torch.allclose(mb.token_fields["token_advantages"][tokens],
                                  expected[row] * weights / (total + EPS), atol=1e-7), row
            loss -= expected[row] * total / (total + EPS)
            seen.add(row)
    assert seen == set(range(18))
    # the failed think of row 3 weighs 0, the positive think of row 1 0.005, a malformed row 9 everywhere
    assert metrics[0]["loss"] == pytest.approx(loss / 11.0, rel=1e-5, abs=1e-7)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert metrics[0]["skipped"] == 0.0 and metrics[0]["grad_norm"] > 0


def test_metrics_cover_the_original_rollouts_and_rgr_apart(scripted_run):
    _, metrics, _ = scripted_run
    m = metrics[0]
    original = EXPECTED_REWARDS[:16]
    assert m["reward/mean"] == pytest.approx(sum(original) / 16)
    assert m["accuracy/mean"] == pytest.approx(7 / 16)
    assert m["format/mean"] == pytest.approx(12 / 16)
    assert m["rgr/trigger_rate"] == 0.5 and m["rgr/success_rate"] == 0.5
    assert m["rgr/reward_mean"] == pytest.approx((1.0 + 0.1) / 2)
    assert m["rescue/rate"] == 0.25 and m["groups/anchored_rate"] == 0.5 and m["groups/saturated_rate"] == 0.25
    assert m["kprime/mean"] == pytest.approx((2 + 3 + 3) / 3)


def test_group_records_decoded_tokens_and_update_norm(scripted_run):
    """groups.jsonl (one line per group and step), tokens/decoded and update/param_norm, against the script's
    closed forms and the rollouts / parameters themselves."""
    import json

    trainer, metrics, captured = scripted_run
    rollouts, _ = captured["advantages"][1]
    lines = [json.loads(line) for line in (trainer.out / "groups.jsonl").read_text().splitlines()]
    assert [(r["step"], r["group"]) for r in lines] == [(s, g) for s in (1, 2) for g in range(4)]
    first = lines[:4]
    assert [r["prompt_id"] for r in first] == [rollouts[4 * g].record.id for g in range(4)]
    assert [r["accuracy"] for r in first] == pytest.approx([0.5, 0.25, 0.0, 1.0])
    assert [r["all_negative"] for r in first] == [False, False, True, False]
    assert [(r["anchored"], r["rescue"], r["saturated"], r["k_prime"]) for r in first] == [
        (True, False, False, 2), (True, False, False, 3), (False, True, False, 3), (False, False, True, 0)]
    z_pos, z_neg = two_value_z(3, 2, 0.9)  # slot 0 after the successful reflection of row 2
    z_a, z_n = two_value_z(4, 1, 0.9)      # slot 1
    assert first[0]["anchor_z"] == pytest.approx(z_pos, rel=1e-5) and first[0]["neg_z"] == pytest.approx([z_neg], rel=1e-5)
    assert first[1]["anchor_z"] == pytest.approx(z_a, rel=1e-5) and first[1]["neg_z"] == pytest.approx([z_n, z_n], rel=1e-5)
    assert first[2]["anchor_z"] is None and first[2]["neg_z"] == [] and first[3]["anchor_z"] is None
    assert first[0]["anchor_advantage"] == pytest.approx(expected_advantages()[1], rel=1e-5)
    assert first[1]["anchor_advantage"] == pytest.approx(expected_advantages()[4], rel=1e-5)
    assert [(r["rgr_triggered"], r["rgr_correct"]) for r in first] == [(True, True), (True, False), (False, None),
                                                                     (False, None)]
    length = [len(r.completion.token_ids) for r in rollouts]
    assert [r["rgr_tokens"] for r in first] == [length[16], length[17], 0, 0]
    assert [r["decoded_tokens"] for r in first] == [sum(length[4 * g:4 * g + 4]) + (length[16 + g] if g < 2 else 0)
                                                    for g in range(4)]
    assert metrics[0]["tokens/decoded"] == sum(length) and metrics[0]["tokens/rgr_decoded"] == length[16] + length[17]
    # one optimizer update per step here: the step's parameter change is that update's
    assert metrics[0]["update/param_norm"] == pytest.approx(captured["update_norms"][0], rel=1e-6)
    assert metrics[1]["update/param_norm"] == pytest.approx(captured["update_norms"][1], rel=1e-6)
    assert metrics[0]["update/param_norm"] > 0
    assert metrics[0]["adv/anchor_mean"] == pytest.approx((expected_advantages()[1] + expected_advantages()[4]) / 2,
                                                          rel=1e-5)


def test_each_step_draws_fresh_care_and_rgr_seeds(scripted_run):
    trainer, _, captured = scripted_run
    care_seeds = captured["seeds"]  # two calls per step (before / after RGR) share the step's seed
    assert care_seeds[0] == care_seeds[1] and care_seeds[2] == care_seeds[3] and care_seeds[0] != care_seeds[2]
    main0, rgr0, main1, rgr1 = trainer.engine.seeds  # generate calls: rollouts, RGR, per step
    assert len({main0, rgr0, main1, rgr1}) == 4


def test_derive_seed_separates_steps_ranks_and_streams():
    from care_megatron.trainer import derive_seed

    seeds = {derive_seed(0, step, rank, stream) for step in range(3) for rank in range(2) for stream in ("care", "rgr")}
    assert len(seeds) == 12 and all(0 <= s < 2 ** 31 for s in seeds)
    assert derive_seed(0, 5, 1, "rgr") == derive_seed(0, 5, 1, "rgr")  # a resumed run redraws the same
    assert derive_seed(0, 5, 1, "care") != derive_seed(1, 5, 1, "care")


@pytest.mark.parametrize("mode,prefix_has_cue,has_prefix", [("resample", False, True), ("fresh", False, False)])
def test_rgr_controls_change_only_the_request(tmp_path, mode, prefix_has_cue, has_prefix):
    from care_megatron.rollout.reflection import REPAIR_CUE

    trainer, metrics, _ = run_scripted_step(tmp_path, f"algorithm.rgr_mode={mode}")
    requests = [r for r in trainer.engine.requests if "/rgr" in r.request_id]
    assert len(requests) == 2
    for request in requests:
        prefix = trainer.tokenizer.decode(request.prefix_ids)
        assert bool(request.prefix_ids) == has_prefix
        assert (REPAIR_CUE in prefix) == prefix_has_cue
    assert metrics[0]["rgr/trigger_rate"] == 0.5


def test_think_weight_neg_unmasks_failed_think(tmp_path):
    """The "fail-think unmasked" ablation: failed <think> tokens weigh think_weight_neg."""
    _, _, captured = run_scripted_step(tmp_path, "algorithm.care={think_weight_neg: 0.005}", "algorithm.rgr=false")
    rollouts, _ = captured["advantages"][0]
    packed, _ = captured["packed"][0]
    checked = 0
    for mb in packed:
        seq_ids = mb.token_sequence_ids()
        for local, row in enumerate(mb.sequence_indices.tolist()):
            tokens = seq_ids == local
            think = (mb.region_ids[tokens] == int(Region.THINK)) & mb.loss_mask[tokens].bool()
            if not rollouts[row].correct and rollouts[row].format == 1.0:
                assert torch.allclose(mb.token_fields["token_weights"][tokens][think], torch.tensor(0.005))
                checked += 1
    assert checked == 6  # rows 2, 3, 5, 6, 7, 8


def test_switches_rescue_equalisation_k_and_reflect_scale_reach_the_step(tmp_path):
    """algorithm.care={k: 3, equalize: false, rescue: false, reflect_neg_scale: 0.5} on the same script:
    no sqrt(K/K') factor, the all-negative group gets nothing, the failed reflection the full scale."""
    _, metrics, captured = run_scripted_step(
        tmp_path, "algorithm.care={k: 3, equalize: false, rescue: false, reflect_neg_scale: 0.5}")
    _, (adv, info) = captured["advantages"][1]
    expected = {row: 0.0 for row in range(18)}
    z_pos, z_neg = two_value_z(3, 2, 0.9)  # slot 0: K' = 2, reflected success
    expected[1] = expected[16] = z_pos
    expected[3] = -0.5 * abs(z_neg)
    z_a, z_n = two_value_z(4, 1, 0.9)  # slot 1: K' = min(3, 3) = 3, failed reflection at scale 0.5
    expected[4] = z_a
    expected[17] = expected[6] = expected[7] = -0.5 * abs(z_n)
    assert adv.tolist() == pytest.approx([expected[row] for row in range(18)], rel=1e-5, abs=1e-6)
    assert info["rescue"].tolist() == [False] * 4 and metrics[0]["rescue/rate"] == 0.0

"""Several optimizer updates per RL step (docs/algorithm.md section 6, ``training/updates.py``) on the
real trainer and the scripted rollouts of ``scripted_engine.py``.

With ``data.prompts_per_step=4`` and ``train.prompts_per_update=2`` the step's prompt groups are cut,
in order, into two mini-batches: groups 0 and 1 with their RGR rows 16 and 17 (update 1), groups 2
and 3 (update 2). Update 2 runs on the weights update 1 left, so its importance ratios move off 1
and the clips act. Every expectation is computed here from its own formulas:

* the single-update step equals the pre-schedule path (pack everything once, one ``train_step``)
  to the bit;
* update 2's loss, clip and dual-clip counts equal the closed forms evaluated on the model after
  update 1 (a plain Hugging Face forward per sequence);
* the parameters after a two-update step equal a reference update loop written from EasyR1's /
  verl's actor update (mini-batches, a loss per mini-batch, one clipped AdamW step each) for the
  grpo, dapo, gspo and care losses.
"""
import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scripted_engine  # noqa: E402
from test_scripted_step import EPS, G, closed_form_weights, expected_advantages, scripted_config  # noqa: E402

DUAL_CLIP = 1.5
"""c of the dual clip in the closed-form test: low enough that update 2's negative-advantage tokens
(the malformed rows 9-11, pushed up by update 1) cross it, so the cap is exercised."""
KL_CLAMP = 10.0
SPEC_COEFFICIENTS = {"care": (0.2, 0.28, 0.02), "grpo": (0.2, 0.2, 0.02), "dapo": (0.2, 0.28, 0.0),
                     "gspo": (3e-4, 4e-4, 0.0)}
"""(eps_low, eps_high, beta) of docs/algorithm.md section 7."""


# ------------------------------------------------------------------------------- capturing a step
def capture_step(tmp_path, *overrides):
    """One ``RLTrainer.step`` on the scripted engine, recording what the reference paths need: the
    backend before the step, the step's sequences (with their behaviour log-probs), rollouts,
    advantages, reference log-probs per sequence, and for each ``train_step`` call its micro-batches,
    normalisers, the policy's weights before it and its result."""
    from care_megatron.trainer import RLTrainer

    trainer = RLTrainer(scripted_config(tmp_path, *overrides), progress=False)
    trainer.engine = scripted_engine.ScriptedRolloutEngine(trainer.tokenizer, trainer.data.train, G)
    backend = trainer.backend
    run = SimpleNamespace(trainer=trainer, backend_state=copy.deepcopy(backend.state_dict_for_checkpoint()),
                          model_before=copy.deepcopy(backend.model), packed_lists=[], advantages=None,
                          reference={}, updates=[])
    real_pack, real_advantages = trainer.pack, trainer.advantages
    real_forward, real_train_step = backend.forward_logprobs, backend.train_step

    def pack(sequences):
        run.packed_lists.append(list(sequences))
        return real_pack(sequences)

    def advantages(rollouts, embeddings, care_config=None):
        out = real_advantages(rollouts, embeddings, care_config)
        run.rollouts, run.advantages = rollouts, out[0]
        return out

    def forward_logprobs(micro_batches, **kwargs):
        outputs = real_forward(micro_batches, **kwargs)
        if kwargs.get("model") == "reference":
            for mb, out in zip(micro_batches, outputs):
                bounds = mb.cu_seqlens.tolist()
                for k, row in enumerate(mb.sequence_indices.tolist()):
                    run.reference[row] = out.logprobs[bounds[k]:bounds[k + 1]].detach().clone()
        return outputs

    def train_step(micro_batches, loss_fn, normalisers):
        before = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
        result = real_train_step(micro_batches, loss_fn, normalisers)
        run.updates.append(SimpleNamespace(micro_batches=micro_batches, normalisers=normalisers, before=before,
                                           result=result))
        return result

    trainer.pack, trainer.advantages = pack, advantages
    backend.forward_logprobs, backend.train_step = forward_logprobs, train_step
    run.metrics = trainer.step(0)
    by_id = {seq.sequence_id: seq for sequences in run.packed_lists for seq in sequences}
    run.sequences = [by_id[row] for row in range(len(run.rollouts))]  # to_sequence numbers them by row
    return run


def rows_by_group_halves(groups: list[int], parts: int) -> list[list[int]]:
    """The test's own mini-batch split: prompt groups in order of first appearance, cut into
    ``parts`` equal contiguous runs; every row of a group goes with it."""
    order = []
    for group in groups:
        if group not in order:
            order.append(group)
    size = len(order) // parts
    return [[row for row, group in enumerate(groups) if group in order[k * size:(k + 1) * size]] for k in range(parts)]


def sequence_logprobs(model, seq, mrope, temperature: float) -> torch.Tensor:
    """log p(token t | tokens < t) of one sequence from a plain Hugging Face forward of it alone
    (full logits / temperature, log-softmax); 0 at the first token, like the backends."""
    out = model(input_ids=seq.input_ids[None], position_ids=mrope.positions(seq)[:, None, :],
                pixel_values=seq.pixel_values, image_grid_thw=seq.image_grid_thw, use_cache=False)
    logp = torch.log_softmax(out.logits[0].float() / temperature, -1)[:-1].gather(-1, seq.input_ids[1:, None])[:, 0]
    return torch.cat([logp.new_zeros(1), logp])


def clipped_token_loss(ratio, advantage, eps_low: float, eps_high: float, dual_clip: float):
    """-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), capped at c |A| where A < 0."""
    loss = -torch.minimum(ratio * advantage, ratio.clamp(1 - eps_low, 1 + eps_high) * advantage)
    return torch.where(advantage < 0, torch.minimum(loss, dual_clip * advantage.abs()), loss)


def k3(logp, ref):
    """exp(ref - logp) - (ref - logp) - 1, bounded above by the kl clamp."""
    d = ref - logp
    return (torch.exp(d) - d - 1).clamp(max=KL_CLAMP)


def region_token_advantages(seq, advantage: float, positive: bool) -> torch.Tensor:
    """CARE's A_hat = A w / (sum w + eps) over the whole sequence (spec section 6)."""
    weights = closed_form_weights(seq.region_ids, seq.loss_mask, positive)
    return advantage * weights / (float(weights.sum()) + EPS)


# ------------------------------------------------------------------------------- 1. one update
def test_one_update_per_step_is_the_single_update_path_to_the_bit(tmp_path):
    """prompts_per_update == prompts_per_step: the step is the pre-schedule path (the whole step
    packed once, one set of normalisers, one ``train_step``) to the bit: loss, gradient norm, loss
    metrics and every parameter."""
    from care_megatron.training import step_inputs
    from care_megatron.training.registry import build_backend

    run = capture_step(tmp_path, "train.prompts_per_update=4")
    trainer, cfg = run.trainer, run.trainer.config
    assert len(run.updates) == 1 and run.metrics["ppo/updates"] == 1.0
    old = build_backend(cfg, copy.deepcopy(run.model_before))
    old.load_state_dict_from_checkpoint(copy.deepcopy(run.backend_state))
    packed = trainer.pack(run.sequences)
    positive = torch.tensor([r.correct for r in run.rollouts])
    step_inputs.attach_loss_inputs(
        packed, trainer.method, run.advantages, positive, trainer.care_config.think_weight_pos,
        cfg.rollout.max_new_tokens, cfg.rollout.tis_cap, think_weight_neg=trainer.care_config.think_weight_neg)
    normalisers = step_inputs.loss_normalisers(packed, cfg.rollout.max_new_tokens)
    for mb, out in zip(packed, old.forward_logprobs(packed, model="reference")):
        mb.token_fields["ref_logprobs"] = out.logprobs.detach().cpu()
    normalisers = step_inputs.reduce_normalisers(normalisers, None)
    expected = old.train_step(packed, trainer.loss_fn, normalisers)

    assert run.updates[0].normalisers == normalisers
    assert run.metrics["loss"] == expected.loss and run.metrics["grad_norm"] == expected.grad_norm
    assert run.metrics["lr"] == expected.learning_rate and run.metrics["skipped"] == 0.0
    for key, value in expected.metrics.items():
        if not key.startswith(("count/", "clip_frac/", "min/", "max/")):
            assert run.metrics[key] == value, key
    assert run.updates[0].result.metrics == expected.metrics
    new_params = dict(trainer.backend.model.named_parameters())
    for name, p in old.model.named_parameters():
        assert torch.equal(new_params[name], p), name
    assert any(not torch.equal(p, q) for p, q in zip(run.model_before.parameters(), old.model.parameters()))


# ------------------------------------------------------------------------------- 2. closed forms
@pytest.fixture(scope="module")
def two_update_step(tmp_path_factory):
    return capture_step(tmp_path_factory.mktemp("two_updates"), "train.prompts_per_update=2",
                        f"algorithm.dual_clip={DUAL_CLIP}")


def test_two_updates_split_the_groups_in_order(two_update_step):
    run = two_update_step
    groups = [r.group for r in run.rollouts]
    assert groups == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [0, 1]  # the RGR rows sit at the end of the list
    seen = [sorted(row for mb in update.micro_batches for row in mb.sequence_indices.tolist())
            for update in run.updates]
    assert seen == [[0, 1, 2, 3, 4, 5, 6, 7, 16, 17], list(range(8, 16))]
    assert run.metrics["ppo/updates"] == 2.0 and run.metrics["ppo/skipped_updates"] == 0.0
    # mini-batch normalisers: update 1 has rows 1, 3, 16 (slot 0) and 4, 6, 7, 17 (slot 1) with a
    # non-zero advantage, update 2 the rescue group's rows 8-11 (the saturated slot 3 has none)
    assert [u.normalisers["num_advantaged_sequences"] for u in run.updates] == [7.0, 4.0]
    assert [u.normalisers["num_sequences"] for u in run.updates] == [10.0, 8.0]


def test_second_update_follows_the_closed_forms(two_update_step):
    """Update 2's token ratios against the weights update 1 left, its clipped / dual-clipped token
    losses over N_seq, the KL to the initial policy, and its clip counts, all from the formulas of
    spec section 6 evaluated on a plain HF forward."""
    from care_megatron.rewards.regions import Region

    run = two_update_step
    trainer = run.trainer
    eps_low, eps_high, beta = SPEC_COEFFICIENTS["care"]
    after_first = copy.deepcopy(run.model_before)
    after_first.load_state_dict({**after_first.state_dict(), **run.updates[1].before})
    temperature = trainer.backend.temperature
    advantages = expected_advantages()
    rows = list(range(8, 16))
    n_seq = 4  # rows 8 (pseudo-anchor), 9, 10, 11 (malformed negatives); the saturated rows 12-15 have A = 0
    assert sum(advantages[row] != 0 for row in rows) == n_seq
    pg = kl = 0.0
    tokens = 0
    counts = dict.fromkeys(("pos_tokens", "pos_clipped", "neg_tokens", "neg_clipped", "dual", "neg_answer_tokens",
                            "neg_answer_clipped"), 0)
    with torch.no_grad():
        for row in rows:
            seq = run.sequences[row]
            response = seq.loss_mask
            logp = sequence_logprobs(after_first, seq, trainer.mrope, temperature)[response]
            ref = sequence_logprobs(run.model_before, seq, trainer.mrope, temperature)[response]
            old = seq.token_fields["old_logprobs"][response]
            a_hat = region_token_advantages(seq, advantages[row], run.rollouts[row].correct)[response]
            ratio = torch.exp(logp - old)
            pg += float(clipped_token_loss(ratio, a_hat, eps_low, eps_high, DUAL_CLIP).sum())
            kl += float(k3(logp, ref).sum())
            tokens += int(response.sum())
            pos, neg = a_hat > 0, a_hat < 0
            answer = seq.region_ids[response] == int(Region.ANSWER)
            counts["pos_tokens"] += int(pos.sum())
            counts["pos_clipped"] += int((pos & (ratio > 1 + eps_high)).sum())
            counts["neg_tokens"] += int(neg.sum())
            counts["neg_clipped"] += int((neg & (ratio < 1 - eps_low)).sum())
            counts["dual"] += int((neg & (ratio > DUAL_CLIP)).sum())
            counts["neg_answer_tokens"] += int((neg & answer).sum())
            counts["neg_answer_clipped"] += int((neg & answer & (ratio < 1 - eps_low)).sum())
    second = run.updates[1].result
    m = second.metrics
    assert m["pg_loss"] == pytest.approx(pg / n_seq, rel=1e-5, abs=1e-7)
    assert m["kl"] == pytest.approx(kl / tokens, rel=1e-4, abs=1e-8) and kl > 0
    assert second.loss == pytest.approx(pg / n_seq + beta * kl / tokens, rel=1e-5, abs=1e-7)
    assert m["count/tokens/pos_adv"] == counts["pos_tokens"] and m["count/clipped/pos_adv"] == counts["pos_clipped"]
    assert m["count/tokens/neg_adv"] == counts["neg_tokens"] and m["count/clipped/neg_adv"] == counts["neg_clipped"]
    assert m["count/dual_clipped"] == counts["dual"]
    assert m["count/tokens/neg_adv_answer"] == counts["neg_answer_tokens"]
    assert m["count/clipped/neg_adv_answer"] == counts["neg_answer_clipped"]
    assert m["count/response_tokens"] == tokens
    # the clips really act in update 2 (PPO clip on the positive side, the dual cap on the negative)
    assert counts["pos_clipped"] > 0 and counts["dual"] > 0
    # ... and not in update 1, which runs on the behaviour policy itself
    first = run.updates[0].result.metrics
    assert first["min/ratio"] == first["max/ratio"] == 1.0 and first["count/clipped/all"] == 0
    # the step's report: both updates' counts summed, the ratio range over both
    negative_tokens = first["count/tokens/neg_adv"] + counts["neg_tokens"]
    assert run.metrics["clip_frac/dual"] == pytest.approx(counts["dual"] / negative_tokens)
    assert run.metrics["ppo/ratio_max"] == m["max/ratio"] > 1 + eps_high


def test_a_vanishing_learning_rate_keeps_every_ratio_at_one(tmp_path):
    """train.lr must be > 0; at 1e-60 AdamW's step lr * m / (sqrt(v) + eps) rounds to 0 in float32,
    so update 1 leaves the weights bit-identical and every ratio of update 2 is exactly 1."""
    run = capture_step(tmp_path, "train.prompts_per_update=2", "train.lr=1e-60")
    assert len(run.updates) == 2
    after = dict(run.trainer.backend.model.named_parameters())
    for name, p in run.model_before.named_parameters():
        assert torch.equal(after[name], p), name
    for update in run.updates:
        m = update.result.metrics
        assert m["min/ratio"] == m["max/ratio"] == 1.0 and m["count/ratio_sum"] == m["count/response_tokens"] > 0
        assert m["count/log_ratio_sum"] == 0.0 and m["count/clipped/all"] == 0 and m["count/dual_clipped"] == 0
    assert run.metrics["ppo/ratio_mean"] == 1.0 and run.metrics["ppo/approx_kl"] == 0.0


# ------------------------------------------------------------------------------- 3. reference loop
REFERENCE_LR = 1e-5
"""AdamW normalises each gradient entry by its own running magnitude, so an entry whose gradient is
about Adam's eps (1e-8) moves by a fair fraction of lr on float32 summation-order noise alone (two
correct implementations differ by ~5% of lr there); at 1e-5 that noise stays under the 1e-6
parameter tolerance. The clip ranges below are narrowed so that the ~3% ratio moves of update 2 at
this learning rate still cross them."""
REFERENCE_CLIPS = {"grpo": (0.01, 0.01, 1.001), "dapo": (0.01, 0.02, 1.001), "care": (0.01, 0.02, 1.001),
                   "gspo": (1e-5, 1e-5, 3.0)}
"""(eps_low, eps_high, dual clip c) of the reference-loop runs; beta stays the method's (section 7)."""


def reference_minibatch_loss(method: str, rows, logps, run, eps_low: float, eps_high: float, dual_clip: float,
                             beta: float) -> torch.Tensor:
    """One mini-batch's loss from the spec's formulas (sections 6-7), normalised over the mini-batch:
    token-mean for grpo / dapo, the sequence ratio over N_seq for gspo (no dual clip), region-weighted
    A_hat over the sequences with a non-zero advantage for care; k3 KL token-mean where beta > 0."""
    advantages = run.advantages.tolist()
    responses = {row: run.sequences[row].loss_mask for row in rows}
    num_tokens = sum(int(mask.sum()) for mask in responses.values())
    pg = kl = 0.0
    for row in rows:
        seq, mask = run.sequences[row], responses[row]
        logp, old = logps[row][mask], seq.token_fields["old_logprobs"][mask]
        if method == "gspo":
            s = torch.exp((logp - old).mean())
            a = torch.tensor(advantages[row])
            pg = pg - torch.minimum(s * a, s.clamp(1 - eps_low, 1 + eps_high) * a)
        else:
            a_hat = (region_token_advantages(seq, advantages[row], run.rollouts[row].correct)[mask] if method == "care"
                     else torch.full_like(logp, advantages[row]))
            pg = pg + clipped_token_loss(torch.exp(logp - old), a_hat, eps_low, eps_high, dual_clip).sum()
        if beta:
            kl = kl + k3(logp, run.reference[row][mask]).sum()
    if method == "care":
        divisor = sum(advantages[row] != 0 for row in rows)
    elif method == "gspo":
        divisor = sum(bool(mask.any()) for mask in responses.values())
    else:
        divisor = num_tokens
    return pg / divisor + beta * kl / num_tokens


def reference_update_loop(method: str, run, updates: int, epochs: int, coefficients: tuple):
    """EasyR1 / verl's actor update, written out: the step's rows split into mini-batches of whole
    prompt groups in order; per mini-batch zero the gradients, the mini-batch loss on per-token
    log-probs of a plain HF forward per sequence, backward, clip the global gradient norm, one AdamW
    step (the backend's lr, betas, eps, weight decay; constant learning rate); ``epochs`` passes over
    the same mini-batches in the same order (verl's ``ppo_epochs``). Returns each update's (loss,
    gradient norm before clipping, parameters after it)."""
    model = copy.deepcopy(run.model_before).train()
    hyper = run.trainer.backend.optimizer.defaults
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"],
                                  weight_decay=hyper["weight_decay"])
    temperature = run.trainer.backend.temperature
    reports = []
    for rows in rows_by_group_halves([r.group for r in run.rollouts], updates) * epochs:
        optimizer.zero_grad(set_to_none=True)
        logps = {row: sequence_logprobs(model, run.sequences[row], run.trainer.mrope, temperature) for row in rows}
        loss = reference_minibatch_loss(method, rows, logps, run, *coefficients)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                              run.trainer.config.train.grad_clip)
        optimizer.step()
        reports.append((float(loss.detach()), float(norm),
                        {name: p.detach().clone() for name, p in model.named_parameters()}))
    return reports


@pytest.mark.parametrize("method,epochs", [("grpo", 1), ("dapo", 1), ("gspo", 1), ("gspo", 2), ("care", 1)])
def test_two_update_step_equals_a_reference_update_loop(tmp_path, method, epochs):
    """The trainer's two-update step (twice over with ``train.ppo_epochs=2``) and the reference loop
    agree on each update's loss and gradient norm and on every parameter after each update (within
    1e-6); the later updates run off the behaviour policy and their clips act. (GSPO's sequence
    ratios of update 2 move against the clipped side: its clip acts in the second epoch, when the
    first mini-batch comes round again on weights that already favour it.)"""
    eps_low, eps_high, dual_clip = REFERENCE_CLIPS[method]
    beta = SPEC_COEFFICIENTS[method][2]
    run = capture_step(tmp_path, f"algorithm.name={method}", "train.prompts_per_update=2", f"train.ppo_epochs={epochs}",
                       f"train.lr={REFERENCE_LR}", f"algorithm.clip_low={eps_low}", f"algorithm.clip_high={eps_high}",
                       f"algorithm.dual_clip={dual_clip}")
    trainer = run.trainer
    lc = trainer.loss_config
    assert (lc.clip_low, lc.clip_high, lc.kl_coef, lc.dual_clip, lc.kl_clamp) == (eps_low, eps_high, beta, dual_clip,
                                                                                  KL_CLAMP)
    assert len(run.updates) == 2 * epochs and run.metrics["ppo/updates"] == 2 * epochs
    assert beta == 0 or len(run.reference) == len(run.sequences)
    if method == "dapo":  # the saturated group was dropped and refilled: group ids 0, 1, 2, 4
        assert sorted({r.group for r in run.rollouts}) == [0, 1, 2, 4]
    reports = reference_update_loop(method, run, 2, epochs, (eps_low, eps_high, dual_clip, beta))
    final = {name: p.detach() for name, p in trainer.backend.model.named_parameters()}
    trainer_after = [update.before for update in run.updates[1:]] + [final]
    for (loss, norm, params), update, after in zip(reports, run.updates, trainer_after):
        assert update.result.loss == pytest.approx(loss, rel=1e-5, abs=1e-7)
        assert update.result.grad_norm == pytest.approx(norm, rel=1e-5)
        worst = max(float((after[name] - p).abs().max()) for name, p in params.items())
        assert worst <= 1e-6, (method, worst)
    before = dict(run.model_before.named_parameters())
    with torch.no_grad():
        moved = max(float((p - before[name]).abs().max()) for name, p in reports[-1][2].items())
    assert moved > 1.5 * REFERENCE_LR  # the updates moved the weights, so the comparison says something
    later = [update.result.metrics for update in run.updates[1:]]
    assert all(m["min/ratio"] < 1 < m["max/ratio"] for m in later)
    if method != "gspo":
        assert later[0]["count/clipped/all"] > 0 and later[0]["count/dual_clipped"] > 0, later[0]
    elif epochs == 2:
        assert sum(m["count/clipped/all"] for m in later) > 0

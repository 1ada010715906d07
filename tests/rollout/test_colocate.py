"""Phase order and timing of the colocated RL step."""
import pytest
import torch

from care_megatron.rollout.colocate import PHASES, PhaseTimer, StepSchedule, sync_weights
from care_megatron.rollout.hf_engine import HFRolloutEngine


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_full_step_in_order_with_timings():
    clock = FakeClock()
    syncs = []
    schedule = StepSchedule(PhaseTimer(sync=lambda: syncs.append(1), clock=clock))
    schedule.begin_step()
    durations = {name: float(i + 1) for i, name in enumerate(PHASES)}
    for name in PHASES:
        with schedule.phase(name):
            clock.now += durations[name]
        if name == "generate":  # an RGR resample is a second generate
            with schedule.phase("generate"):
                clock.now += 0.5
    metrics = schedule.end_step()
    assert schedule.entered == list(PHASES[:3]) + ["generate"] + list(PHASES[3:])
    assert metrics["timing/generate"] == pytest.approx(durations["generate"] + 0.5)
    assert metrics["timing/train"] == pytest.approx(durations["train"])
    assert metrics["timing/step"] == pytest.approx(sum(durations.values()) + 0.5)
    assert len(syncs) == 2 * (len(PHASES) + 1)


def test_out_of_order_and_misuse_raise():
    schedule = StepSchedule(PhaseTimer(sync=None))
    with pytest.raises(RuntimeError, match="outside begin_step"):
        with schedule.phase("generate"):
            pass
    schedule.begin_step()
    with schedule.phase("wake_rollout"):
        pass
    with schedule.phase("generate"):  # skipping update_weights is allowed
        pass
    with pytest.raises(RuntimeError, match="'update_weights' out of order"):
        with schedule.phase("update_weights"):
            pass
    with pytest.raises(RuntimeError, match="'wake_rollout' out of order"):
        with schedule.phase("wake_rollout"):
            pass
    with pytest.raises(ValueError, match="unknown phase"):
        with schedule.phase("nap"):
            pass
    with pytest.raises(RuntimeError, match="not ended"):
        schedule.begin_step()
    schedule.end_step()
    schedule.begin_step()  # a new step starts from the top again
    with schedule.phase("wake_rollout"):
        pass


class BucketBackend:
    def __init__(self, model):
        self.model = model

    def export_weights(self, bucket_bytes):
        from care_megatron.rollout.sglang_engine import bucket_named_tensors

        yield from bucket_named_tensors(((n, t.detach()) for n, t in self.model.state_dict().items()), bucket_bytes)


def test_sync_weights_into_hf_engine(tokenizer):
    from _rollout_helpers import build_model

    source, target = build_model(tokenizer, seed=1), build_model(tokenizer, seed=2)
    sent = sync_weights(BucketBackend(source), HFRolloutEngine(target, tokenizer), bucket_bytes=4096)
    assert sent == sum(t.numel() * t.element_size() for t in source.state_dict().values())
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor)


def test_hf_engine_follows_the_tagged_wake_order(tokenizer, image_processor):
    """The HF engine takes the colocated step's tagged calls: it generates only once both the
    weights and the KV cache are awake, and an unknown tag is refused."""
    from _rollout_helpers import build_model, make_request
    from care_megatron.rollout.base import RolloutEngine, SamplingParams

    engine = HFRolloutEngine(build_model(tokenizer, seed=1), tokenizer)
    assert isinstance(engine, RolloutEngine)
    request = [make_request(tokenizer, image_processor, "a", "what is 2 + 3")]
    engine.sleep()
    engine.wake(tags=("weights",))
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(request, SamplingParams(max_new_tokens=2))
    engine.wake(tags=("kv_cache",))
    assert len(engine.generate(request, SamplingParams(max_new_tokens=2))) == 1
    engine.sleep(tags=("kv_cache",))
    assert engine.released == {"kv_cache"}
    with pytest.raises(ValueError, match="unknown memory tag"):
        engine.wake(tags=("kv",))

"""``care_megatron.cli`` with a rollout engine that draws from its process's global torch RNG: what
torchrun starts for the per-rank RNG resume test (``test_resume.py``).

The run's own engines never touch the global stream (the HF engine samples under ``fork_rng`` with
the step's seed, SGLang in its own process), so without this engine a lost per-rank RNG state would
change nothing a test can see. This engine stands for anything that does draw from it (an unseeded
sampler, dropout): it picks each rollout's scripted completion (``scripted_engine.py``) with
``torch.randint`` and then draws one number per response token, as a per-token sampler would. A
response counts the shapes out loud ("1 2 3 so 3"), so its length, and the number of draws, follows
the record's answer: ranks holding different prompts leave the global stream in different states.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scripted_engine  # noqa: E402


class GlobalRngEngine(scripted_engine.ScriptedRolloutEngine):
    """Scripted completions chosen with the global torch RNG (RGR requests answered as scripted)."""

    def _text(self, request) -> str:
        if not scripted_engine._ROLLOUT_ID.match(request.request_id):
            return super()._text(request)
        slot = scripted_engine.ROLLOUT_SCRIPT[int(torch.randint(len(scripted_engine.ROLLOUT_SCRIPT), ()))]
        kind, _ = slot[int(torch.randint(len(slot), ()))]
        answer = self._answer(request)
        counting = " ".join(str(n) for n in range(1, int(answer) + 1))
        text = scripted_engine.rollout_text(kind, counting + " so {a}", answer)
        torch.rand(len(self.tokenizer.encode(text, add_special_tokens=False)))  # one draw per token
        return text


def build_global_rng_engine(config, model, tokenizer) -> GlobalRngEngine:
    from care_megatron.data.dataset import build_records

    data = build_records(config.data)
    return GlobalRngEngine(tokenizer, data.train + data.eval, config.rollout.group_size)


if __name__ == "__main__":
    import care_megatron.rollout.builder as builder

    builder.build_rollout_engine = build_global_rng_engine
    from care_megatron.cli import main

    sys.exit(main(sys.argv[1], sys.argv[2:]))

"""``care_megatron.cli`` with the scripted rollout engine installed: what torchrun starts for the
Megatron side of the scripted-step parity test (``test_scripted_step.py``).

With ``CARE_TEST_RECORD_UPDATES=<dir>`` every ``MegatronBackend.train_step`` (one optimizer update)
appends to ``<dir>/rank<r>.jsonl`` the normalisers it was given and this rank's own counts over its
micro-batches (``loss_normalisers``), so a test can check that each mini-batch's normalisers are the
sums over the data-parallel ranks."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scripted_engine  # noqa: E402

scripted_engine.install()


def record_updates(directory: str) -> None:
    import torch.distributed as dist

    from care_megatron.training.megatron.backend import MegatronBackend
    from care_megatron.training.step_inputs import loss_normalisers

    real_train_step = MegatronBackend.train_step

    def train_step(self, micro_batches, loss_fn, normalisers):
        local = loss_normalisers(micro_batches, int(normalisers["max_response_length"]))
        with open(Path(directory) / f"rank{dist.get_rank()}.jsonl", "a") as fh:
            fh.write(json.dumps({"seen": normalisers, "local": local}) + "\n")
        return real_train_step(self, micro_batches, loss_fn, normalisers)

    MegatronBackend.train_step = train_step


if os.environ.get("CARE_TEST_RECORD_UPDATES"):
    record_updates(os.environ["CARE_TEST_RECORD_UPDATES"])

from care_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))

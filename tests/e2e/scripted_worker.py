"""``care_megatron.cli`` with the scripted rollout engine installed: what torchrun starts for the
Megatron side of the scripted-step parity test (``test_scripted_step.py``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scripted_engine  # noqa: E402

scripted_engine.install()

from care_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))

"""Run megatron-core on CPU (gloo): the two adjustments it needs, confined to this module.

Megatron-Core assumes CUDA in two places that matter for a CPU test run:

1. ``torch.cuda.current_device()`` is used as the ``device=`` of freshly created parameters and
   buffers (e.g. the rotary ``inv_freq``). On CPU we map it to the string ``"cpu"``.
2. The CUDA RNG tracker (``tensor_parallel.random.get_cuda_rng_tracker().fork()``) wraps weight
   initialisation and dropout; ``model_parallel_cuda_manual_seed`` seeds it through
   ``torch.cuda.manual_seed``. On CPU we install a tracker whose named states are CPU generator
   states, so ``fork()`` works and stays deterministic per tensor-parallel rank.

3. (checkpointing only) ``dist_checkpointing``'s file writer calls ``torch.cuda.synchronize()``
   before reading tensors; on a CPU-only build that raises, so it becomes a no-op here.

4. (checkpointing only) the same writer collects results through a ``multiprocessing`` Manager
   started with the *spawn* method, which re-imports ``__main__`` and hangs or fails inside
   spawned test workers; :func:`prepare_checkpoint_writer` pre-creates that queue with *fork*
   (safe here: no CUDA context exists in CPU mode).

5. (pipeline parallelism only) the pipeline schedules allocate their token counter with a literal
   ``device="cuda"``; :func:`enable_cpu_mode` points the schedules module's ``torch`` at a proxy
   whose ``zeros`` maps that device to the CPU (every other attribute is torch's own), so Megatron's
   real 1F1B / interleaved schedules and p2p communication run over gloo.

6. (pipeline parallelism with tied embeddings, model construction only) ``GPTModel`` moves the last
   stage's copy of the embedding with ``weight.data.cuda()`` before all-reducing it over the
   embedding group; :func:`model_construction` makes ``Tensor.cuda`` return the tensor unchanged
   while a model is built in CPU mode.

7. (activation recomputation only) Megatron's checkpoint function saves and restores the CUDA RNG
   state around the recomputed forward; on a CPU-only build there is none, so those two helpers
   of ``tensor_parallel.random`` become no-ops (the CPU generator and the tracker's named states are
   still saved and restored).

Nothing else in the package patches Megatron. :func:`enable_cpu_mode` is idempotent and a no-op
when CUDA is available (unless ``force=True``, which tests use).
"""
from __future__ import annotations

import contextlib

import torch

_ENABLED = False


class CpuRngStatesTracker:
    """Drop-in for Megatron's ``CudaRNGStatesTracker`` that forks the CPU generator instead.

    Same interface as the CUDA tracker (``reset``, ``add``, ``fork``, ``get_states``,
    ``set_states``, ``is_initialized``), so Megatron layers call it unchanged.
    """

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._current_state_name = "default-rng"

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        if name in self.states_:
            raise ValueError(f"rng state {name!r} already exists")
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.seeds_.add(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name!r} was not added (call seed_model_parallel_rng first)")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        previous_name, self._current_state_name = self._current_state_name, name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)
            self._current_state_name = previous_name


def _cpu_current_device():
    return "cpu"


def enable_cpu_mode(force: bool = False) -> bool:
    """Apply the two CPU adjustments (see module docstring). Returns True when CPU mode is on."""
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    # 1. Device of freshly created Megatron tensors.
    torch.cuda.current_device = _cpu_current_device
    # 3. dist_checkpointing's writer synchronises CUDA streams; there are none on CPU.
    torch.cuda.synchronize = lambda device=None: None
    # 2. RNG tracker: install the CPU tracker as Megatron's global one.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker(force_reset=True)
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRngStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # 7. Recomputation: no CUDA RNG state to save / restore.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: None
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
    # 5. Pipeline schedules' literal device="cuda".
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuDeviceTorch(torch)
    _ENABLED = True
    return True


@contextlib.contextmanager
def model_construction():
    """Build Megatron modules in CPU mode (item 6): ``Tensor.cuda`` is the identity inside the block."""
    if not _ENABLED:
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


class _CpuDeviceTorch:
    """``torch`` as seen by Megatron's schedules module on CPU: ``zeros(..., device="cuda")`` -> CPU."""

    def __init__(self, module):
        self._module = module

    def zeros(self, *args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return self._module.zeros(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


def cpu_mode_enabled() -> bool:
    return _ENABLED


def seed_model_parallel_rng(seed: int, tp_rank: int) -> None:
    """Seed Megatron's RNG tracker: ``model_parallel_cuda_manual_seed`` on GPU, the CPU tracker here.

    Seeds follow Megatron's scheme (data-parallel seed = ``seed``; tensor-parallel seed =
    ``seed + 2718 + tp_rank``) so a CPU run draws the same streams per rank as its GPU layout.
    """
    if not _ENABLED:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


def prepare_checkpoint_writer() -> None:
    """CPU mode: give dist_checkpointing's async file writer a fork-started results queue (item 4)."""
    if not _ENABLED:
        return
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()

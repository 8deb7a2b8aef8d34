"""The patches that let megatron-core 0.16+ run on CPU with the gloo backend.

Each patch fixes one place where megatron-core assumes CUDA; all of them were
found by running the real schedules, DDP and optimizer on CPU. They are applied
together by ``apply_cpu_compat()``, which is idempotent and a no-op when CUDA is
available, so GPU runs use megatron-core untouched.
"""

from __future__ import annotations

import contextlib
from math import inf
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def cpu_compat_active() -> bool:
    """True once the CPU patches are in place in this process."""
    return _applied


# --------------------------------------------------------------------------- #
# 1. Device queries: `torch.cuda.current_device()` / `synchronize()` are called
#    unconditionally in p2p communication, the memory buffer and DDP.
# --------------------------------------------------------------------------- #
def _patch_device_queries() -> None:
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None


# --------------------------------------------------------------------------- #
# 1b. Streams: megatron-core 0.19's DDP grad sync asks `torch.cuda.current_stream()`
#     for the compute stream and waits on it. On CPU work is synchronous: a stream
#     whose every operation is a no-op.
# --------------------------------------------------------------------------- #
class NoOpStream:
    """What ``torch.cuda.current_stream()`` returns without CUDA."""

    device = torch.device("cpu")

    def synchronize(self) -> None:
        return None

    def wait_stream(self, stream) -> None:
        return None

    def wait_event(self, event) -> None:
        return None

    def record_event(self, event=None):
        return event

    def query(self) -> bool:
        return True


NO_OP_STREAM = NoOpStream()


def _patch_current_stream() -> None:
    torch.cuda.current_stream = lambda device=None: NO_OP_STREAM


# --------------------------------------------------------------------------- #
# 2. Tensors created on "cuda": schedules (`total_num_tokens`), p2p shapes,
#    DDP buffers and the local multi-tensor ops pass `device="cuda"` or
#    `device=torch.cuda.current_device()`. A global TorchFunctionMode maps any
#    CUDA device argument to CPU, and `.cuda()` / `.to("cuda")` to no-ops.
# --------------------------------------------------------------------------- #
def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


_CPU = torch.device("cpu")


class CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA device arguments of torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron checks `param.type() == "torch.cuda.FloatTensor"` to pick
            # its fp32/fp16 code paths; CPU tensors answer with the CUDA name.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


_mode: CudaToCpuMode | None = None


def _enter_cuda_to_cpu_mode() -> None:
    global _mode
    _mode = CudaToCpuMode()
    _mode.__enter__()  # stays on the mode stack for the life of the process


# --------------------------------------------------------------------------- #
# 3. RNG tracker: megatron forks named CUDA generator states
#    (model-parallel-rng, data-parallel-rng, expert-parallel-rng) around weight
#    init and dropout. On CPU the same names fork CPU generator states.
# --------------------------------------------------------------------------- #
def _make_cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """CudaRNGStatesTracker with the named states kept as CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    tracker_cls = _make_cpu_rng_tracker_class()
    mrandom.CudaRNGStatesTracker = tracker_cls
    # A tracker created before the patch (at import time) is replaced too.
    if mrandom._CUDA_RNG_STATE_TRACKER is not None and not isinstance(
        mrandom._CUDA_RNG_STATE_TRACKER, tracker_cls
    ):
        mrandom._CUDA_RNG_STATE_TRACKER = tracker_cls()
    # The data-parallel ("default") state is the CPU generator on CPU.
    orig_seed = mrandom.model_parallel_cuda_manual_seed

    def model_parallel_manual_seed(seed, *args, **kwargs):
        torch.manual_seed(seed)
        return orig_seed(seed, *args, **kwargs)

    mrandom.model_parallel_cuda_manual_seed = model_parallel_manual_seed
    import megatron.core.tensor_parallel as tp_pkg

    tp_pkg.model_parallel_cuda_manual_seed = model_parallel_manual_seed


# --------------------------------------------------------------------------- #
# 4. Global memory buffer (sequence-parallel all-gathers) allocates on
#    `torch.cuda.current_device()`; covered by the mode in (2), kept explicit
#    here so the buffer never depends on the mode being active.
# --------------------------------------------------------------------------- #
def _patch_global_memory_buffer() -> None:
    from functools import reduce
    import operator

    from megatron.core import utils as mutils

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        required_len = reduce(operator.mul, tensor_shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < required_len:
            buf = torch.empty(required_len, dtype=dtype, device=_CPU, requires_grad=False)
            self.buffer[(name, dtype)] = buf
        return buf[0:required_len].view(*tensor_shape)

    mutils.GlobalMemoryBuffer.get_tensor = get_tensor


# --------------------------------------------------------------------------- #
# 5. Gradient clipping asserts `param.grad.type() == 'torch.cuda.FloatTensor'`
#    and builds norms on CUDA: a CPU implementation of the global grad norm and
#    of the clip, with the same reductions over the same groups.
# --------------------------------------------------------------------------- #
def get_grad_norm_fp32_cpu(grads_for_norm, norm_type=2, grad_stats_parallel_group=None) -> float:
    """Global grad norm over model-parallel (or all, for the distributed optimizer) ranks."""
    from megatron.core.utils import get_data_parallel_group_if_dtensor, to_local_if_dtensor

    if isinstance(grads_for_norm, torch.Tensor):
        grads_for_norm = [grads_for_norm]
    dp_group = None
    for grad in grads_for_norm:
        dp_group = get_data_parallel_group_if_dtensor(grad, dp_group)
    grads = [to_local_if_dtensor(g).float() for g in grads_for_norm]
    norm_type = float(norm_type)
    if norm_type == inf:
        total = torch.tensor([max((g.abs().max().item() for g in grads), default=0.0)])
        op = torch.distributed.ReduceOp.MAX
    else:
        total = torch.zeros(1, dtype=torch.float64)
        for g in grads:
            total += torch.linalg.vector_norm(g, norm_type).double() ** norm_type
        op = torch.distributed.ReduceOp.SUM
    if dp_group:
        torch.distributed.all_reduce(total, op=op, group=dp_group)
    torch.distributed.all_reduce(total, op=op, group=grad_stats_parallel_group)
    value = total.item()
    return value if norm_type == inf else value ** (1.0 / norm_type)


def clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Scales grads in place by max_norm / total_norm when that is below 1."""
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for param in parameters:
            grad = getattr(param, attr, None)
            if grad is not None:
                to_local_if_dtensor(grad).detach().mul_(clip_coeff)


def _patch_grad_clipping() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    for module in (clip_grads, optimizer):
        module.get_grad_norm_fp32 = get_grad_norm_fp32_cpu
        module.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32_cpu
    try:
        from megatron.core.optimizer import layer_wise_optimizer

        layer_wise_optimizer.get_grad_norm_fp32 = get_grad_norm_fp32_cpu
    except ImportError:  # not in every megatron-core release
        pass


PATCHES: dict[str, Callable[[], None]] = {
    "device_queries": _patch_device_queries,
    "current_stream": _patch_current_stream,
    "cuda_to_cpu_tensors": _enter_cuda_to_cpu_mode,
    "rng_tracker": _patch_rng_tracker,
    "global_memory_buffer": _patch_global_memory_buffer,
    "grad_clipping": _patch_grad_clipping,
}


def apply_cpu_compat(force: bool = False) -> bool:
    """Apply every CPU patch once. Returns True when the patches are active.

    Does nothing when CUDA is available, unless ``force`` (tests only).
    """
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available() and not force:
        return False
    for patch in PATCHES.values():
        patch()
    _applied = True
    return True

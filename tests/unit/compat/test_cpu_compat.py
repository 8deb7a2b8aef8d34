"""Each CPU patch of megatron_hpt.compat, checked on its own against megatron-core."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_hpt.compat import PATCHES, apply_cpu_compat, cpu_compat_active
from megatron_hpt.compat.cpu import clip_grad_by_total_norm_fp32_cpu, get_grad_norm_fp32_cpu


def setup_module(module):
    assert apply_cpu_compat() is True
    if not dist.is_initialized():
        from megatron_hpt.parallel.launch import free_port

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def teardown_module(module):
    if dist.is_initialized():
        dist.destroy_process_group()


def test_apply_is_idempotent_and_lists_every_patch():
    assert cpu_compat_active()
    assert apply_cpu_compat() is True
    assert set(PATCHES) == {
        "device_queries",
        "current_stream",
        "cuda_to_cpu_tensors",
        "rng_tracker",
        "global_memory_buffer",
        "grad_clipping",
    }


def test_device_queries():
    assert torch.cuda.current_device() == 0
    assert torch.cuda.synchronize() is None


def test_current_stream_is_a_no_op_stream():
    """megatron-core 0.19's DDP grad sync waits on the compute stream (a CPU build of torch
    raises "Torch not compiled with CUDA enabled" there)."""
    from megatron_hpt.compat.cpu import NO_OP_STREAM

    stream = torch.cuda.current_stream()
    assert stream is NO_OP_STREAM and torch.cuda.current_stream(0) is NO_OP_STREAM
    other = object()
    assert stream.wait_stream(other) is None and stream.wait_event(other) is None
    assert stream.synchronize() is None and stream.query() is True
    assert stream.record_event(other) is other


def test_cuda_factory_calls_land_on_cpu():
    # The forms megatron uses in schedules, p2p and DDP.
    for device in ("cuda", torch.device("cuda"), torch.cuda.current_device(), "cuda:0"):
        t = torch.zeros(3, dtype=torch.int, device=device)
        assert t.device.type == "cpu" and t.tolist() == [0, 0, 0]
    x = torch.ones(2)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert torch.empty(4, device="cuda").shape == (4,)


def test_tensor_type_reports_cuda_names_for_megatron_dtype_checks():
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    # explicit conversions still work
    assert torch.ones(1).type(torch.float64).dtype == torch.float64


def test_rng_tracker_forks_named_cpu_states():
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    from megatron.core import parallel_state as mps

    mps.initialize_model_parallel(1, 1, create_gloo_process_groups=True)
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        names = set(tracker.get_states())
        assert names == {"model-parallel-rng", "data-parallel-rng", "expert-parallel-rng"}
        before = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(4)
        # the default CPU stream is untouched by a fork
        assert torch.equal(before, torch.get_rng_state())
        with tracker.fork():
            b = torch.rand(4)
        # the forked stream advanced (no repeat), and is reproducible from the seed
        assert not torch.equal(a, b)
        expected = torch.Generator().manual_seed(123 + 2718)  # megatron's TP seed offset, TP rank 0
        assert torch.equal(a, torch.rand(4, generator=expected))
        assert isinstance(mrandom._CUDA_RNG_STATE_TRACKER, mrandom.CudaRNGStatesTracker)
    finally:
        mps.destroy_model_parallel()


def test_global_memory_buffer_allocates_on_cpu_and_reuses():
    from megatron.core.utils import GlobalMemoryBuffer

    buf = GlobalMemoryBuffer()
    t1 = buf.get_tensor((2, 3), torch.float32, "x")
    t2 = buf.get_tensor((3,), torch.float32, "x")
    assert t1.device.type == "cpu" and t1.shape == (2, 3)
    assert t2.data_ptr() == t1.data_ptr()  # same storage, no new allocation


def test_grad_norm_and_clip_match_torch():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 7, generator=g)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3
    ref = [p.detach().clone() for p in params]
    for r, p in zip(ref, params):
        r.grad = p.grad.clone()
    norm = get_grad_norm_fp32_cpu([p.grad for p in params], 2, None)
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert abs(norm - expected.item()) < 1e-5
    clip_grad_by_total_norm_fp32_cpu(params, 1.0, norm)
    for r, p in zip(ref, params):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-6)
    inf_norm = get_grad_norm_fp32_cpu([p.grad for p in params], float("inf"), None)
    assert abs(inf_norm - max(p.grad.abs().max().item() for p in params)) < 1e-7


def test_megatron_optimizer_uses_the_cpu_clipping():
    from megatron.core.optimizer import clip_grads, optimizer

    assert optimizer.get_grad_norm_fp32 is get_grad_norm_fp32_cpu
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grad_by_total_norm_fp32_cpu
    assert clip_grads.get_grad_norm_fp32 is get_grad_norm_fp32_cpu

"""The collective-device check on this CPU machine: it stands in for NCCL, so a tensor the
project creates without a device and hands to a collective is the error NCCL would raise;
tensors created on ``collective_device(group)``, or computed from others, pass; megatron's
own calls and the CPU compatibility layer are not checked."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.distributed as dist

from megatron_hpt.compat import apply_cpu_compat
from megatron_hpt.parallel import collectives
from megatron_hpt.parallel.collectives import CollectiveDeviceError, collective_device


@pytest.fixture()
def checked():
    """A one-rank gloo group with the check installed (as init_parallel does under the tests)."""
    from megatron_hpt.models.checkpoint_format import process_group

    apply_cpu_compat()  # tensors created on "cuda" land on the CPU
    was_installed = collectives.check_installed()
    collectives.install_collective_device_check()
    try:
        with process_group():
            yield
    finally:
        if not was_installed:
            collectives.uninstall_collective_device_check()


def run_as(module: str, code: str) -> dict:
    """Run ``code`` as if it were a line of ``module`` (the check looks at the calling module)."""
    scope = {"__name__": module, "torch": torch, "dist": dist, "collective_device": collective_device}
    exec(compile(textwrap.dedent(code), f"<{module}>", "exec"), scope)
    return scope


def test_collective_device_is_nccls_on_a_cpu_machine_under_the_check(checked):
    assert collectives.simulating()
    assert collective_device() == torch.device("cuda", 0)
    t = run_as("megatron_hpt.probe", "t = torch.ones(2, device=collective_device())")["t"]
    assert t.device.type == "cpu"  # created by the CPU compatibility layer on the CPU
    assert collectives.tensor_device(t) == torch.device("cuda", 0)


def test_host_tensor_from_project_code_is_refused_naming_the_line(checked):
    with pytest.raises(CollectiveDeviceError,
                       match=r"megatron_hpt\.probe:3: torch\.distributed\.all_reduce\(tensor=\.\.\.\) got a tensor on cpu, "
                             r"but the group's collective device is cuda:0 \(NCCL on GPUs\)"):
        run_as("megatron_hpt.probe", """
            flag = torch.tensor([1])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        """)
    with pytest.raises(CollectiveDeviceError, match=r"all_gather\(tensor_list=\.\.\.\)"):
        run_as("checkpoints_tools.probe", """
            x = torch.ones(2, device=collective_device())
            dist.all_gather([torch.zeros(2)], x)
        """)


def test_device_tensors_and_computed_tensors_pass(checked):
    out = run_as("megatron_hpt.probe", """
        flag = torch.tensor([3.0], device=collective_device())
        dist.all_reduce(flag)
        derived = torch.zeros(2, device=collective_device()) + 1  # computed: on the model's device
        dist.all_reduce(derived)
        host_then_computed = torch.zeros(2) * 2  # arithmetic is not followed (the check may miss this)
        dist.broadcast(host_then_computed, src=0)
        wrapped = torch.as_tensor(derived)  # the same tensor (on GPUs: on its device), not a host copy
        dist.all_reduce(wrapped)
    """)
    assert out["flag"].tolist() == [3.0] and out["derived"].tolist() == [1.0, 1.0]


def test_megatron_and_the_cpu_layer_are_not_checked(checked):
    for module in ("megatron.core.probe", "megatron_hpt.compat.probe", __name__):
        out = run_as(module, """
            t = torch.tensor([2.0])
            dist.all_reduce(t)
        """)
        assert out["t"].tolist() == [2.0]
        assert not collectives.is_host_tensor(out["t"])


def test_install_is_idempotent_and_uninstall_restores_torch():
    was_installed = collectives.check_installed()
    collectives.uninstall_collective_device_check()
    plain = (dist.all_reduce, dist.broadcast)
    try:
        collectives.install_collective_device_check()
        wrapped = dist.all_reduce
        collectives.install_collective_device_check()
        assert dist.all_reduce is wrapped and wrapped.__wrapped_collective__ is plain[0]
        assert torch.tensor is torch._C._VariableFunctions.tensor  # torch itself is never patched
        collectives.uninstall_collective_device_check()
        assert (dist.all_reduce, dist.broadcast) == plain
        assert not collectives.simulating() and collective_device() == torch.device("cpu")  # gloo, unchecked
        t = run_as("megatron_hpt.probe", "t = torch.zeros(1)")["t"]
        assert not collectives.is_host_tensor(t)  # the marker is off the mode stack
    finally:
        if was_installed:
            collectives.install_collective_device_check()


def test_torch_device_context_still_builds_on_meta(checked):
    """torch's ``with torch.device("meta")`` finds its constructors by identity: a 7B-sized
    layer built there under the check must not allocate."""
    with torch.device("meta"):
        layer = torch.nn.Linear(18944, 3584)
        t = run_as("megatron_hpt.probe", "t = torch.empty(18944, 3584)")["t"]
    assert layer.weight.device.type == "meta" and t.device.type == "meta"

"""The weight routes: /update_weights_from_disk, the weight-update group and its
session (/init_weights_update_group, /begin_weight_update,
/update_weights_from_distributed, /end_weight_update, /destroy_weights_update_group),
and /release_memory_occupation, /resume_memory_occupation.

Swapping weights, or moving them, holds the model alone (``Gate.exclusive``): it waits
for the running batch to finish (or for an in-place pause to park it), and the version
changes together with the weights, so every completion reports the weights it was
generated with. ``abort_all_requests: true`` aborts running requests first, as SGLang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import torch
from aiohttp import web

from megatron_hpt.rollout import weight_transport
from megatron_hpt.rollout.server import weights
from megatron_hpt.rollout.server.replies import json_response
from megatron_hpt.rollout.server.routes import read_object
from megatron_hpt.rollout.server.state import ServerState
from megatron_hpt.rollout.server.threads import run_blocking
from megatron_hpt.rollout.server.validation import invalid
from megatron_hpt.rollout.server.weights import WeightUpdateError

log = logging.getLogger("megatron_hpt.rollout.server")


def _failure(message: str, **extra: Any) -> web.Response:
    return json_response({"success": False, "message": message, **extra}, 400)


def _optional_str(body: dict, key: str) -> str | None:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise invalid(key, "must be a string or null", v)
    return v


class WeightRoutes:
    def __init__(self, state: ServerState):
        self.state = state
        self._lock = asyncio.Lock()
        """One weight swap or memory move at a time."""
        self._group_busy = False
        """A weight-update group rendezvous is running (one at a time)."""

    async def _exclusively(self, fn: Callable[[], Any], abort_running: bool = False) -> Any:
        """Runs ``fn`` holding the model alone (in a daemon thread, bounded wait)."""
        scheduler = self.state.scheduler
        if abort_running:
            scheduler.abort_all()
        timeout_s = self.state.options.request_deadline_s + self.state.options.watchdog_timeout_s

        def run() -> Any:
            with scheduler.gate.exclusive(timeout_s):
                return fn()

        async with self._lock:
            return await run_blocking(run, name="weights-exclusive")

    def _swap(self, named: dict[str, torch.Tensor], version: str | None, model_path: str | None) -> int:
        # Runs under Gate.exclusive: weights and version change together.
        count = weights.copy_into(self.state.model, named)
        if version is not None:
            self.state.weight_version = version
        if model_path is not None:
            self.state.model_path = model_path
        return count

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        path = body.get("model_path")
        if not isinstance(path, str):
            raise invalid("model_path", "Field required (a string)", path)
        version, abort = _optional_str(body, "weight_version"), body.get("abort_all_requests", False)
        if not isinstance(abort, bool):
            raise invalid("abort_all_requests", "must be a boolean", abort)
        try:
            named = await run_blocking(weights.read_weights_folder, path, self.state.weight_roots, name="weights-read")
            weights.check_update(self.state.model, {n: tuple(t.shape) for n, t in named.items()})
            count = await self._exclusively(lambda: self._swap(named, version, path), abort_running=abort)
        except (WeightUpdateError, TimeoutError) as e:
            return _failure(f"Failed to update weights: {e}", num_paused_requests=0)
        message = f"Succeeded to update model weights ({count} tensors)."
        if version is not None:
            message += f" Weight version updated to {version}."
        return json_response({"success": True, "message": message, "num_paused_requests": 0})

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        s = self.state
        try:
            req = weights.parse_group_request(body, "nccl" if s.device.type == "cuda" else "gloo")
        except WeightUpdateError as e:
            return _failure(f"Failed to initialize custom process group: {e}.")
        timeout_s = s.options.weight_group_timeout_s
        s.group_inits += 1
        try:
            return await self._open_group(req, timeout_s)
        finally:
            s.group_inits -= 1

    async def _open_group(self, req: weights.GroupRequest, timeout_s: float) -> web.Response:
        s = self.state
        # One rendezvous at a time (pipeline stages open theirs in turn); a call that
        # waits longer than one rendezvous may take is refused.
        give_up = time.monotonic() + timeout_s
        while self._group_busy:
            if time.monotonic() > give_up:
                return _failure(f"Failed to initialize custom process group: another group was still being initialized after {timeout_s:g} s.")
            await asyncio.sleep(0.05)
        self._group_busy = True
        try:
            if req.group_name in s.update_groups or len(s.update_groups) >= weights.MAX_UPDATE_GROUPS:
                return _failure(f"Failed to initialize custom process group: group {req.group_name!r} exists or {len(s.update_groups)} groups are open.")
            group = await run_blocking(weights.open_group, req, timeout_s, name="weights-group-init")
        except Exception as e:  # the rendezvous or the backend failed: nothing was opened
            return _failure(f"Failed to initialize custom process group: {type(e).__name__}: {e}.")
        finally:
            self._group_busy = False
        s.update_groups[req.group_name] = group
        return json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        body = await read_object(request, required=False)
        name = body.get("group_name", "weight_update_group")
        group = self.state.update_groups.pop(name, None) if isinstance(name, str) else None
        if group is None:
            return _failure("The group to be destroyed does not exist.")
        await run_blocking(weight_transport.close_update_group, group, name="weights-group-close")
        return json_response({"success": True, "message": "Succeeded to destroy custom process group."})

    async def begin_weight_update(self, request: web.Request) -> web.Response:
        self.state.session = weights.DistributedSession()
        return json_response({"success": True, "message": "Success"})

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        s = self.state
        version, load_format = _optional_str(body, "weight_version"), _optional_str(body, "load_format")
        session = s.session
        if session is None:
            return _failure("update_weights_from_distributed must run between begin_weight_update() and end_weight_update()")
        names, shapes = body.get("names"), body.get("shapes")
        try:
            dtypes = weights.check_bucket(s.model, names, body.get("dtypes"), shapes)
        except WeightUpdateError as e:
            return _failure(f"Failed to update weights: {e}")
        name = body.get("group_name", "weight_update_group")
        group = s.update_groups.get(name) if isinstance(name, str) else None
        if group is None:
            return _failure(f"Group {name} not in {list(s.update_groups)}. Please call `init_weights_update_group` first.")
        try:
            received = await run_blocking(weights.receive_bucket, group, s.device, dtypes, shapes, load_format == "flattened_bucket", name="weights-receive")
        except Exception as e:  # the broadcast failed (peer gone, timeout)
            return _failure(f"Failed to receive weights: {type(e).__name__}: {e}")
        session.staged.update(zip(names, received))
        session.version = version if version is not None else session.version
        return json_response({"success": True, "message": f"Received {len(names)} tensors; they are loaded by end_weight_update."})

    async def end_weight_update(self, request: web.Request) -> web.Response:
        """Copies a complete session's tensors in, all at once; refuses a partial one."""
        session, self.state.session = self.state.session, None
        if session is None or not session.staged:
            return json_response({"success": True, "message": "Success"})
        try:
            weights.check_update(self.state.model, {n: tuple(t.shape) for n, t in session.staged.items()})
            count = await self._exclusively(lambda: self._swap(session.staged, session.version, None))
        except (WeightUpdateError, TimeoutError) as e:
            return _failure(f"Failed to update weights: {e}")
        message = f"Succeeded to update parameter online ({count} tensors)."
        if session.version is not None:
            message += f" Weight version updated to {session.version}."
        return json_response({"success": True, "message": message})

    async def release_memory_occupation(self, request: web.Request) -> web.Response:
        return await self._move_memory(release=True)

    async def resume_memory_occupation(self, request: web.Request) -> web.Response:
        return await self._move_memory(release=False)

    async def _move_memory(self, release: bool) -> web.Response:
        """Release: weights off the accelerator (on a CPU server they stay where they are)
        and generation held; new /generate requests are refused, queued ones wait.
        Resume: the weights back, generation goes on."""
        s = self.state

        def move() -> None:
            if s.device.type != "cpu":
                weights.move_model(s.model, torch.device("cpu") if release else s.device)
            s.memory_released = release
            s.scheduler.gate.set_released(release)

        try:
            await self._exclusively(move)
        except TimeoutError as e:
            return _failure(f"Failed to {'release' if release else 'resume'} memory: {e}")
        return json_response(None)

"""The server's command line and process lifetime.

    python -m megatron_hpt.rollout.server --model-path DIR --port P [--api-key K] ...

SIGTERM and SIGINT stop the server promptly: open requests get a moment to finish, then
the process exits whatever is still running (blocking calls live in daemon threads, and
a last-resort timer ends a shutdown that still hangs).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import threading
from pathlib import Path

from aiohttp import web

from megatron_hpt.rollout.server.state import ServerOptions

log = logging.getLogger("megatron_hpt.rollout.server")

SHUTDOWN_GRACE_S = 2.0
"""How long open requests may take to finish once SIGTERM arrives."""
FORCED_EXIT_S = 15.0
"""After SIGTERM, the process ends after this long even if the shutdown hangs."""


def build_parser() -> argparse.ArgumentParser:
    """One flag per ServerOptions field (``--model-path`` for model_path, ...)."""
    p = argparse.ArgumentParser(prog="python -m megatron_hpt.rollout.server", description="The project's own SGLang-protocol rollout server.")
    for f in dataclasses.fields(ServerOptions):
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        if "type" not in extra and extra.get("action") != "append" and f.default is not None:
            extra["type"] = type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None if extra.get("action") == "append" else f.default, help=f.metadata["help"], **extra)
    return p


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    args = vars(build_parser().parse_args(argv))
    args["weight_dir"] = tuple(args["weight_dir"] or ())
    try:
        return ServerOptions(**args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    logging.basicConfig(level=options.log_level.upper(), format="[%(asctime)s] %(name)s %(levelname)s: %(message)s")
    if not Path(options.model_path, "config.json").is_file():
        raise SystemExit(f"--model-path {options.model_path!r} has no config.json: pass an HF checkpoint folder")
    import torch

    from megatron_hpt.rollout.server.state import ServerState

    torch.set_num_threads(options.threads)
    state = ServerState(options)
    asyncio.run(serve(state))


async def serve(state) -> None:
    """Serves until SIGTERM or SIGINT."""
    from megatron_hpt.rollout.server.routes import build_app

    options = state.options
    runner = web.AppRunner(build_app(state), access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    await web.TCPSite(runner, options.host, options.port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"megatron-hpt rollout server: {options.model_path} on {state.device} at http://{options.host}:{options.port}", flush=True)
    await stop.wait()
    timer = threading.Timer(FORCED_EXIT_S, _forced_exit)
    timer.daemon = True
    timer.start()
    state.scheduler.close()
    await runner.cleanup()


def _forced_exit() -> None:
    log.error("shutdown did not finish within %.0f s; exiting now", FORCED_EXIT_S)
    os._exit(1)

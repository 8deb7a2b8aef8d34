"""A rollout engine that implements only the RolloutEngine interface, records every call
the trainer makes, and serves scripted completions (no server). Running this module
trains one rank with it in place of the configured engine:

    python -m tests.e2e.standin_engine CALLS.json STALE_AT_STEP -- [recipe overrides]

CALLS.json receives the call log; STALE_AT_STEP (-1: never) is a generate() call whose
completions claim another weight version.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from megatron_hpt.rollout import Completion, RolloutEngine, WeightSender, WeightSyncTarget


@dataclass(frozen=True)
class RecordingTarget(WeightSyncTarget):
    stage: int
    group: int

    def open_sender(self) -> WeightSender:
        LOG.append(["open_sender", self.stage, self.group])
        return RecordingSender()


class RecordingSender(WeightSender):
    def send(self, named_tensors, version: str) -> None:
        names = [name for name, _ in named_tensors]
        LOG.append(["send", version, len(names)])

    def close(self) -> None:
        LOG.append(["close_sender"])


LOG: list[list] = []


class StandInEngine(RolloutEngine):
    def __init__(self, eos_id: int, stale_at: int):
        self.eos_id, self.stale_at = eos_id, stale_at
        self.weight_version = "launch"
        self.released = False
        self.calls = 0

    def generate(self, prompts, n, params, seed):
        LOG.append(["generate", len(prompts), n])
        assert not self.released, "generate() while the servers' memory is released"
        version = "someone-else" if self.calls == self.stale_at else self.weight_version
        self.calls += 1
        out = []
        for i, _ in enumerate(prompts):
            row = []
            for j in range(n):
                ids = [10 + (seed + i + j) % 40, 11 + j, self.eos_id]
                row.append(Completion(ids, [-1.0] * len(ids), "stop",
                                      {"weight_version": version, "server": "standin://0"}))
            out.append(row)
        return out

    def update_weights_from_disk(self, path, version):
        LOG.append(["update_weights_from_disk", version])
        self.weight_version = version

    def begin_weight_update(self):
        LOG.append(["begin_weight_update"])

    def weight_sync_target(self, stage=0):
        return RecordingTarget(stage=stage, group=1)

    def end_weight_update(self, version):
        LOG.append(["end_weight_update", version])
        self.weight_version = version

    def abort_weight_update(self):
        LOG.append(["abort_weight_update"])

    def release_memory(self):
        LOG.append(["release_memory"])
        self.released = True

    def resume_memory(self):
        LOG.append(["resume_memory"])
        self.released = False

    def healthy(self):
        return True

    def close(self):
        LOG.append(["close"])
        super().close()


def main(argv: list[str]) -> int:
    calls_file, stale_at = argv[0], int(argv[1])
    overrides = argv[argv.index("--") + 1:]
    import megatron_hpt.trainer.world as world
    from megatron_hpt.trainer.config import load_run_config
    from megatron_hpt.trainer.launch import _run_here

    def create(cfg, model_path):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        return StandInEngine(tok.eos_token_id, stale_at)

    world.create_rollout_engine = create
    try:
        return _run_here(load_run_config("demo-cpu", overrides), resume=False)
    finally:
        with open(calls_file, "w") as f:
            json.dump(LOG, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

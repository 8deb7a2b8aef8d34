"""The main job on the embedded default, end to end on a CPU:

1. build the tiny HF model (random-init Qwen2, tokenizer built locally);
2. convert it to a Megatron checkpoint (verified against HF logits);
3. train it with HPT on the shipped arithmetic data, with rollouts from the
   project's SGLang-protocol server and math-verify rewards;
4. evaluate on the held-out split along the way, export the final policy to HF,
   and write the report with plots.
"""

from __future__ import annotations

import time
from pathlib import Path


def run_demo(overrides: list[str] | None = None, output_dir: str = "runs/demo", recipe: str = "demo-cpu") -> Path:
    from megatron_hpt.models.conversion import convert_hf_to_megatron
    from megatron_hpt.models.tiny import create_tiny_model
    from megatron_hpt.trainer.launch import launch_training

    start = time.perf_counter()
    out = Path(output_dir)
    model_dir = out / "tiny_model"
    megatron_dir = out / "tiny_model_megatron"
    if not (model_dir / "config.json").is_file():
        print(f"[1/3] building the embedded tiny model in {model_dir}", flush=True)
        create_tiny_model(model_dir)
    if not (megatron_dir / "megatron_hpt_checkpoint.json").is_file():
        print(f"[2/3] converting it to a Megatron checkpoint in {megatron_dir}", flush=True)
        convert_hf_to_megatron(model_dir, megatron_dir, overwrite=True)
    print("[3/3] training with HPT (rollouts, rewards, switch, Megatron step, weight sync, eval)", flush=True)
    run_dir = out / "run"
    launch_training(
        recipe,
        [
            f"output_dir={run_dir}",
            f"model.hf_path={model_dir}",
            f"checkpoint.init_megatron={megatron_dir}",
            *(overrides or []),
        ],
        resume=True,
    )
    minutes = (time.perf_counter() - start) / 60
    print(f"demo finished in {minutes:.1f} min: report {run_dir / 'report.md'}, "
          f"plots {run_dir / 'curves.png'}, final HF model {run_dir / 'final_hf'}", flush=True)
    return run_dir

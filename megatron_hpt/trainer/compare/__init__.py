"""Algorithm comparison (``megatron-hpt compare``): every algorithm x seed trained on one
recipe's budget through the trainer, evaluated on the held-out sets, summarized in the
paper's table layout with learning and pass@k curves.

    plan.py      what runs: algorithms (presets, A_then_B two-stage runs) x seeds -> stages
    execute.py   running the jobs: resumable subprocesses, K at a time, dependencies
    results.py   reading the runs back: table (mean ± std over seeds), curves, pass@k
    plots.py     the PNGs
    command.py   the command line
"""

from megatron_hpt.trainer.compare.command import main

__all__ = ["main"]

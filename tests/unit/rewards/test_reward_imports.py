"""rewards and data stay free of torch: reward workers start fast and small."""

import subprocess
import sys


def test_rewards_and_data_do_not_import_torch():
    code = (
        "import sys, megatron_hpt.rewards, megatron_hpt.data, megatron_hpt.data.benchmarks; "
        "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

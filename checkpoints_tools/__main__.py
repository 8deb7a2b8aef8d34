"""`python -m checkpoints_tools <tool> ...`: the same as `megatron-hpt convert <tool> ...`."""

import sys

from megatron_hpt.models.conversion_cli import main

if __name__ == "__main__":
    sys.exit(main())

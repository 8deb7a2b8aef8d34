from megatron_hpt.rollout.server.cli import main

main()

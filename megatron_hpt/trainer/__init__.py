"""The trainer: wires the stages into the HPT loop (DESIGN.md §1), with its config,
command-line launch, metrics, checkpoints/resume, evaluation, the demo and the
algorithm comparison."""

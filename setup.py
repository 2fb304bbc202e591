import os
import shutil
import subprocess

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# -ffp-contract=off: the NF4 decode must round exactly like bitsandbytes (a multiply, then an add), so the
# compiler may not fuse them into FMAs (csrc/nf4.h).
CPU_FLAGS = ["-O3", "-ffp-contract=off", "-pthread"]
CSRC_HEADERS = ["csrc/nf4.h", "csrc/nf4_problem.h", "csrc/nf4_cpu_tiles.inc", "csrc/nf4_cpu_ops_avx512.inc"]
# Ampere through Hopper, plus PTX for what comes after; PYPREFOPT_CUDA_ARCHS="80;90" overrides.
DEFAULT_CUDA_ARCHS = "80;86;89;90"


def cuda_build_wanted():
    """The CUDA kernel is built when nvcc and a CUDA torch are present (PYPREFOPT_BUILD_CUDA=1/0 forces it on
    or off). Torch is only looked at, never needed: an isolated build environment has none and builds CPU only."""
    forced = os.environ.get("PYPREFOPT_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    if shutil.which("nvcc") is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


class BuildExtWithCuda(build_ext):
    """Compiles the .cu sources of an extension with nvcc into objects the normal link step picks up."""

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if cu_sources:
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = list(ext.extra_objects) + [self._nvcc(s, ext) for s in cu_sources]
        super().build_extension(ext)

    def _nvcc(self, source, ext):
        obj = os.path.join(self.build_temp, os.path.splitext(source)[0] + ".o")
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        archs = os.environ.get("PYPREFOPT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        includes = [f"-I{d}" for d in ext.include_dirs + self.include_dirs]
        cmd = ["nvcc", "-c", source, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", *gencode, *includes]
        subprocess.run(cmd, check=True)
        return obj


ext_modules = [
    Pybind11Extension("pyprefopt._C", ["csrc/dequant_merge_nf4.cpp"], depends=CSRC_HEADERS, cxx_std=17,
                      extra_compile_args=CPU_FLAGS, extra_link_args=["-pthread"]),
]
if cuda_build_wanted():
    cuda_home = os.path.dirname(os.path.dirname(shutil.which("nvcc")))
    ext_modules.append(
        Pybind11Extension("pyprefopt._C_cuda", ["csrc/dequant_merge_nf4.cu"],
                          depends=["csrc/nf4.h", "csrc/nf4_problem.h"], cxx_std=17,
                          library_dirs=[os.path.join(cuda_home, "lib64")], libraries=["cudart"]))

setup(
    name="pyprefopt",
    version="0.1.0",
    description="Fused kernels for preference fine-tuning (SFT, DPO, IPO, CPO, KTO) of language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` holds the Triton kernels and is installed as `pyprefopt.kernels` (through the symlink
    # pyprefopt/kernels -> ../kernels). It has no __init__.py on purpose: Python run from the repository root
    # puts the root first on sys.path, and a regular `kernels` package there would shadow Hugging Face's
    # `kernels`, which transformers imports; a directory without __init__.py is only a namespace portion, which
    # any installed package of that name takes precedence over. (A package_dir mapping instead of the symlink
    # would need that __init__.py: setuptools' editable finder requires one for a remapped subpackage.)
    packages=["pyprefopt", "pyprefopt.kernels"],
    # The embedded default data `python -m pyprefopt.train` trains on.
    package_data={"pyprefopt": ["data/*/*.jsonl", "data/README.md"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtWithCuda},
    # Ranges, not pins (constraints.txt holds the exact versions CI passed with). Upper bounds where our code
    # reaches past a project's stable API: Triton's language (the kernels), transformers' attention and mask
    # interfaces (the packed CPU forward), a private bitsandbytes helper (its CPU weight repacking), PEFT's
    # adapter format (what we write), and TRL's trainer internals (pyprefopt.drop_in replaces functions inside
    # them: exactly the releases tested; drop_in reads this range from the installed metadata).
    install_requires=[
        "torch>=2.4",
        "triton>=3.1,<4; platform_system == 'Linux'",
        "transformers>=5.0,<6",
        "peft>=0.13,<1",
        "bitsandbytes>=0.45,<0.51",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "datasets>=2.19",
        "matplotlib>=3.7",
    ],
    extras_require={
        # pybind11: tests/test_dequant_merge_nf4.py builds a C++ harness against it. kernels: Hugging Face's
        # package, which transformers imports and tests/test_readme.py runs the main command beside. ruff: the
        # linter .ci/run runs before the tests, with pyproject.toml's settings.
        "test": ["pytest>=8", "pytest-benchmark>=4", "pybind11>=2.12", "kernels>=0.10", "ruff>=0.17,<0.18"],
        # Peers our tests use as oracles and our benches measure against, and DeepSpeed, whose ZeRO-3 the drop-in
        # head is tested under (pyprefopt.drop_in runs the head through the hooks ZeRO-3 puts on each module, which
        # are DeepSpeed's internals: the releases tested), and accelerate, which the two-process TRL tests drive
        # directly (TRL brings it too). On CPU DeepSpeed compiles its shared-memory communication
        # op on first use, with ninja (a dependency of it) and the C++ compiler pyprefopt's own extension needs.
        "peers": ["trl>=1.16,<1.17", "liger-kernel>=0.8,<0.9", "deepspeed>=0.19,<0.20", "accelerate>=1.16,<1.17"],
    },
)

"""Builds fusedloss._C: a CUDAExtension wherever nvcc is found, else a CppExtension.

Build knobs (environment variables):
  FUSEDLOSS_CUDA=0|1        force the CPU-only build (0) or require CUDA (1); default: CUDA if nvcc is found.
  CUDA_HOME                 the CUDA toolkit; default: /usr/local/cuda when it holds nvcc.
  TORCH_CUDA_ARCH_LIST      CUDA architectures; default "8.0;9.0" (A100, H100).
  FUSEDLOSS_CPU_ARCH        "avx2" (default where the build machine has AVX2 and FMA) or "generic".
  NVCC_THREADS              nvcc --threads (default 2); MAX_JOBS bounds ninja's parallel jobs.
  FUSEDLOSS_NO_EXT=1        install the Python package only; the Makefile uses it for the editable
                            install and then builds the extension in place, incrementally with ninja
                            (`python setup.py build_ext --inplace`), which pip's editable builds are not.
The decision never depends on torch.cuda.is_available(): a build machine without a GPU still
builds the CUDA kernels.
"""
import glob
import os

from setuptools import find_packages, setup

# torch's builder looks for nvcc on PATH and otherwise guesses a CUDA_HOME that may lack libcudart;
# pin the toolkit before it is imported.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("FUSEDLOSS_CUDA", "").strip()
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if flag == "0":
        return False
    if flag == "1":
        if not has_nvcc:
            raise RuntimeError(f"FUSEDLOSS_CUDA=1 but nvcc was not found (CUDA_HOME={CUDA_HOME!r})")
        return True
    if flag:
        raise ValueError(f"FUSEDLOSS_CUDA must be 0 or 1, got {flag!r}")
    return has_nvcc


def cpu_arch_flags() -> list[str]:
    arch = os.environ.get("FUSEDLOSS_CPU_ARCH", "").strip()
    if not arch:
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
            arch = "avx2" if all(f" {x}" in flags for x in ("avx2", "fma", "f16c")) else "generic"
        except OSError:
            arch = "generic"
    if arch == "avx2":
        # Without the CPU_CAPABILITY defines at::vec::Vectorized silently compiles to scalar loops.
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    if arch == "generic":
        return []
    raise ValueError(f"FUSEDLOSS_CPU_ARCH must be avx2 or generic, got {arch!r}")


def extension():
    cuda = want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++20 from 2.10 on).
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"] + cpu_arch_flags()
    kwargs = dict(
        name="fusedloss._C",
        include_dirs=[os.path.join(HERE, "csrc", "include")],
        extra_link_args=["-fopenmp"],
    )
    if cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                f"--threads={os.environ.get('NVCC_THREADS', '2')}"]
        return CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                             define_macros=[("FUSEDLOSS_WITH_CUDA", "1")], **kwargs)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=find_packages(include=["fusedloss", "fusedloss.*"]),
    ext_modules=[] if os.environ.get("FUSEDLOSS_NO_EXT") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

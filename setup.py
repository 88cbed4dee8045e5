"""HAT: pip install --no-build-isolation -e '.[dev]' (the Makefile's `make setup` does it).

Builds the custom-op library hat._C from hat/csrc: the C++ CPU kernels always, the CUDA kernels too when torch
is a CUDA build and nvcc is found (CUDA_HOME, or /usr/local/cuda). HAT_BUILD_CUDA=0 skips them; set
TORCH_CUDA_ARCH_LIST (default here "9.0") for the GPUs you deploy to. --no-build-isolation: the extension
must compile against the torch already installed, not a fresh copy pip would fetch into a build environment.
"""
import glob
import os
import platform

from setuptools import find_packages, setup

CSRC = os.path.join("hat", "csrc")


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return None
    os.environ.setdefault("CUDA_HOME", home)
    return home


def _extension():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = [os.path.join(CSRC, "ops.cpp"), os.path.join(CSRC, "autograd.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    home = _cuda_home()
    with_cuda = os.environ.get("HAT_BUILD_CUDA", "1") != "0" and torch.version.cuda is not None and home is not None
    # no fused multiply-add: the kernels round exactly like the reference; no errno or traps: floor() vectorizes
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    if platform.machine() in ("x86_64", "AMD64"):
        cxx.append("-msse4.1")  # vectorized floor / nearbyint
    macros = [("HAT_TORCH_VERSION", f'"{torch.__version__}"'),
              ("HAT_CUDA_VERSION", f'"{torch.version.cuda}"' if with_cuda else '""')]
    if not with_cuda:
        return CppExtension("hat._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # no GPU to detect at build time; one arch keeps CI fast
    return CUDAExtension("hat._C", sources + sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))),
                         define_macros=macros,
                         library_dirs=[d for d in (f"{home}/lib64", f"{home}/lib") if os.path.isdir(d)],
                         extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]})


def _build_config() -> dict:
    from torch.utils.cpp_extension import BuildExtension

    return {"ext_modules": [_extension()], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="hat",
    version="0.1.0",
    description="Config-driven training of models that run as integer programs on J5-class accelerators",
    python_requires=">=3.10",
    packages=find_packages(include=["hat", "hat.*"]),
    package_data={"hat": ["csrc/*.h", "csrc/*.cpp", "csrc/cpu/*.h", "csrc/cpu/*.cpp", "csrc/cuda/*.cu"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "tensorboard>=2.10",
        "scikit-learn>=1.0",
        "tqdm>=4.60",
        "numpy>=1.23",
        "pycocotools>=2.0",
        "matplotlib>=3.5",
    ],
    extras_require={"dev": ["pytest>=7", "ninja", "onnx", "onnxscript", "onnxruntime"]},
    **_build_config(),
)

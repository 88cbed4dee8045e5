"""FAQ 2.2 Q1/Q2 ("the container can't use the GPU", "can't import hat", segfaults): is this environment able to
train? torch/torchvision versions and builds, the GPU, a matmul timed on CPU and GPU, HAT's compiled ops."""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import torch

from hat.ops import extension_status
from hat.ops.loader import REBUILD, expected_file


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what to do when not ok

    def __str__(self) -> str:
        line = f"{'ok  ' if self.ok else 'FAIL'}  {self.name:12s} {self.detail}"
        return line + (f"\n      {'':12s} fix: {self.fix}" if self.fix and not self.ok else "")


def check_torch() -> Check:
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    return Check("torch", True, f"{torch.__version__} ({build}), Python {sys.version.split()[0]}")


def check_torchvision() -> Check:
    fix = f"install the torchvision built for torch {torch.__version__} (see pytorch.org's version table)"
    try:
        import torchvision
        from torchvision.ops import nms

        nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # fails when torchvision's C++ ops do not match torch
    except Exception as exc:  # ImportError, or "operator torchvision::nms does not exist"
        return Check("torchvision", False, f"unusable: {' '.join(str(exc).split())[:200]}", fix)
    cuda = _cuda_version(torchvision.version.cuda)
    if cuda and torch.version.cuda and cuda != torch.version.cuda:
        return Check("torchvision", False, f"{torchvision.__version__} built for CUDA {cuda}, torch for CUDA "
                                           f"{torch.version.cuda}", fix)
    return Check("torchvision", True, torchvision.__version__)


def _cuda_version(version) -> str:
    """torchvision reports CUDA 13.0 as "13000" (major * 1000 + minor * 10); torch as "13.0"."""
    text = str(version or "")
    return f"{int(text) // 1000}.{int(text) % 1000 // 10}" if text.isdigit() else text


def check_gpu(require: bool) -> Check:
    if torch.cuda.is_available():
        names = ", ".join(f"{torch.cuda.get_device_name(i)} (compute capability "
                          f"{'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
                          for i in range(torch.cuda.device_count()))
        return Check("gpu", True, f"{torch.cuda.device_count()} visible: {names}")
    if not torch.version.cuda:
        why, fix = "none: this torch is a CPU-only build", "install a CUDA build of torch to train on GPUs"
    else:
        why, fix = ("none visible to this CUDA build of torch",
                    "check `nvidia-smi` (driver installed, recent enough for CUDA " f"{torch.version.cuda}); in "
                    "Docker start the container with GPUs (`docker run --gpus all ...` or nvidia-docker); check "
                    "CUDA_VISIBLE_DEVICES")
    detail = why + ("" if require else "; training runs on the CPU (pass --require-gpu to make this a failure)")
    return Check("gpu", not require, detail, fix)


def check_matmul(device: str) -> Check:
    """The FAQ's own test: (10000 x 1000) @ (1000 x 2000), timed after a warm-up, checked against float64."""
    a, b = torch.randn(10000, 1000), torch.randn(1000, 2000)
    reference = (a[:64].double() @ b.double()).float()
    try:
        x, y = a.to(device), b.to(device)
        _timed(lambda: x @ y, device)  # warm-up: CUDA context, cuBLAS handles
        seconds, c = _timed(lambda: x @ y, device)
    except RuntimeError as exc:
        return Check(f"matmul {device}", False, f"failed: {' '.join(str(exc).split())[:200]}",
                     "the GPU is visible but unusable: check the driver against the CUDA version (`nvidia-smi`)")
    close = torch.allclose(c[:64].cpu(), reference, rtol=1e-2, atol=1e-2)  # TF32 on GPUs is ~1e-3 relative
    detail = f"{seconds * 1e3:.1f} ms, {2 * 10000 * 1000 * 2000 / seconds / 1e9:.0f} GFLOP/s"
    if not close:
        return Check(f"matmul {device}", False, detail + ", WRONG result",
                     "the device computes wrong numbers: check the driver and the hardware")
    return Check(f"matmul {device}", True, detail)


def _timed(fn: Callable[[], torch.Tensor], device: str) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def check_extension() -> Check:
    status = extension_status()
    if not status.loaded:
        detail = status.reason or "switched off (HAT_USE_EXT=0)"
        return Check("hat._C", False, f"not loaded: {detail}; the reference ops run instead (slower)",
                     f"rebuild: {REBUILD}")
    if torch.cuda.is_available() and not status.cuda:
        return Check("hat._C", False, f"loaded from {expected_file()}, but without CUDA kernels",
                     f"set CUDA_HOME (and TORCH_CUDA_ARCH_LIST) and rebuild: {REBUILD}")
    kernels = "CPU and CUDA kernels" if status.cuda else "CPU kernels"
    return Check("hat._C", True, f"{kernels}, built for torch {torch.__version__}: {expected_file()}")


def run_checks(require_gpu: bool = False) -> list[Check]:
    checks = [check_torch(), check_torchvision(), check_gpu(require_gpu), check_matmul("cpu")]
    if torch.cuda.is_available():
        checks.append(check_matmul("cuda"))
    return checks + [check_extension()]

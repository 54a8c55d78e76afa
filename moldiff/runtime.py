"""Process-level settings and per-machine choices: the allocator, the device, the arithmetic.

Importing this module does not import torch (the CLI imports it at start-up); the functions that
need torch import it when called.

The arithmetic choice lives in one function, :func:`choose_arithmetic`, used by training
(``train.precision`` / ``train.compile``) and by sampling (:func:`auto_precision`, which
``MolDiffPipeline.configure_inference(precision="auto")`` calls):

* bf16 autocast on CPUs with AMX or AVX512-BF16; fp32 everywhere else. On a CPU without native bf16
  (e.g. AVX2 only) PyTorch emulates bf16 and it is several times slower than fp32 (docs/benchmarks.md,
  "Other CPUs"). GPUs of compute capability 8.0 and up have bf16, but on an H200 bf16 autocast made a
  128 x 6 training step 1.2-1.5x slower than fp32 (docs/benchmarks.md, "GPUs"), so they get fp32 too.
* ``torch.compile`` for training only where it measured clearly faster: on CPUs with native bf16,
  in bf16. Not on AVX2-only CPUs (in bf16 it is 3.4x slower than bf16 eager there; in fp32 it was
  6-32% faster per step, after 1-6 minutes of compilation at every start, on a machine whose speed
  moved 2.5x between runs: docs/benchmarks.md, "Other CPUs"; ``train.compile=true`` asks for it)
  and not on GPUs (not measured yet: ``scripts/gpu_session.sh`` runs the benchmark on a lent GPU).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

__all__ = ["tune_allocator", "resolve_device", "cpu_has_native_bf16", "cuda_has_bf16", "choose_arithmetic",
           "auto_precision", "Arithmetic", "allow_tf32", "slow_bf16_warning"]

#: what a device option may say: ``auto`` (a CUDA GPU if there is one, else the CPU), ``cpu``,
#: ``cuda`` or ``cuda:N``
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
PRECISIONS = ("auto", "fp32", "bf16")


def tune_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the OS after every tensor.

    glibc serves allocations above a (dynamic, at most 32 MB) threshold with fresh mmap pages and
    trims the heap top eagerly; the edge tensors of a batch (E x H floats, tens of MB) then cost a
    page fault per 4 kB on every layer of every step. Raising both thresholds to 1 GB keeps those
    pages mapped (the process may then hold up to 1 GB it no longer uses). The ``moldiff`` command
    calls this at start-up; call it once from Python before sampling or training for the same speed.
    Measured by ``scripts/bench_engine.py`` (``--malloc-default`` for the comparison). Returns
    whether the allocator was tuned: False off Linux/glibc or when ``MOLDIFF_DEFAULT_MALLOC`` is set.
    """
    if sys.platform != "linux" or os.environ.get("MOLDIFF_DEFAULT_MALLOC"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False


# ---------------------------------------------------------------------------- device
def resolve_device(device: str | None = "auto") -> str:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` for a device option; ``"auto"`` (or ``None``) is ``"cuda"``
    when ``torch.cuda.is_available()``, else ``"cpu"``.

    Raises:
        ValueError: an unknown device name, CUDA without a GPU, or ``cuda:N`` past the visible GPUs.
    """
    name = "auto" if device is None else str(device).strip()
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if name == "cpu":
        return name
    import torch

    available = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available (torch.cuda.is_available() is False)")
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return name


def allow_tf32() -> None:
    """Let CUDA run fp32 matrix products and convolutions in TF32 (10-bit mantissa, fp32 range):
    several times faster on Ampere and later GPUs, and what ``torch.autocast`` leaves in fp32 gets it
    too. Global torch state: the ``moldiff`` command calls this for CUDA runs; library users call it
    themselves. No effect on CPU arithmetic."""
    import torch

    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------------------- arithmetic
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AMX tiles or AVX512-BF16), as PyTorch detects it.

    False on CPUs with AVX2 only (where bf16 autocast is emulated and slow) and on torch builds
    without the probes."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:  # a build that declares the probe but cannot run it
            continue
    return False


def cuda_has_bf16(device=None) -> bool:
    """Whether CUDA ``device`` (default: the current one) has native bf16 arithmetic: compute
    capability 8.0 or later. Older GPUs only emulate it (``torch.cuda.is_bf16_supported`` may still
    say yes), which is slower than fp32. False without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.get_device_capability(device) >= (8, 0)
    except (RuntimeError, AssertionError, ValueError):
        return False


@dataclass(frozen=True)
class Arithmetic:
    """How the network runs: ``precision`` ``"fp32"`` or ``"bf16"`` (autocast), ``compile`` (training's
    ``torch.compile``), and ``reason``, one phrase on why (for the log)."""

    precision: str
    compile: bool
    reason: str


def _device_type(device) -> tuple[str, object]:
    """``(type, device)`` of a device given as a string or ``torch.device`` (``"auto"`` resolved)."""
    if isinstance(device, str) or device is None:
        device = resolve_device(device) if (device is None or device == "auto") else device
        kind = device.partition(":")[0]
        return kind, device
    return device.type, device


def choose_arithmetic(device="cpu", precision: str = "auto", compile="auto") -> Arithmetic:
    """The one place where moldiff decides its arithmetic for ``device``.

    ``precision``: ``"auto"``, ``"fp32"`` or ``"bf16"``; ``"auto"`` is bf16 on a CPU with native bf16
    (:func:`cpu_has_native_bf16`), else fp32, on GPUs too: on an H200, bf16 autocast made a 128 x 6
    training step 1.2-1.5x slower than fp32 (batch 64 and 256; molecules of QM9's size leave a GPU
    bound by kernel launches, and autocast adds casts: docs/benchmarks.md). ``compile``: ``"auto"``
    (or ``None``), ``True`` or ``False``; ``"auto"`` compiles only on a CPU with native bf16 running
    bf16, where it measured faster for training; not on AVX2-only CPUs (slower than eager there) nor on
    GPUs (not measured). Explicit values are kept.

    Raises:
        ValueError: an unknown precision or compile value.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if compile is None:
        compile = "auto"
    if not (isinstance(compile, bool) or compile == "auto"):
        raise ValueError(f"compile must be true, false or auto, got {compile!r}")
    kind, dev = _device_type(device)
    if kind == "cpu":
        native = cpu_has_native_bf16()
        where = "CPU with native bf16 (AMX/AVX512-BF16)" if native else "CPU without native bf16"
    elif kind == "cuda":
        native = False  # bf16 exists there (compute capability >= 8.0) but measured slower: see above
        where = ("CUDA GPU: bf16 measured slower than fp32 for these networks" if cuda_has_bf16(dev)
                 else "CUDA device without native bf16")
    else:
        native, where = False, f"{kind} device"
    reasons = []
    if precision == "auto":
        precision = "bf16" if native else "fp32"
        reasons.append(f"precision auto -> {precision}")
    if compile == "auto":
        compile = kind == "cpu" and native and precision == "bf16"
        reasons.append(f"compile auto -> {'on' if compile else 'off'}")
    reason = f"{', '.join(reasons)} ({where})" if reasons else f"as configured ({where})"
    return Arithmetic(precision, bool(compile), reason)


def auto_precision(device="cpu") -> str:
    """``"bf16"`` on a CPU with native bf16 arithmetic, else ``"fp32"`` (see :func:`choose_arithmetic`)."""
    return choose_arithmetic(device, "auto", False).precision


def slow_bf16_warning(device, precision: str, compile=False) -> str | None:
    """A one-line warning when an explicit ``precision="bf16"`` is slow on this machine (a CPU without
    native bf16, where bf16 is emulated: 7.7x slower than fp32 per training step on an AVX2-only EPYC,
    26x with ``torch.compile``; a GPU that emulates it), else ``None``."""
    kind, dev = _device_type(device)
    if precision != "bf16":
        return None
    if kind == "cpu" and not cpu_has_native_bf16():
        what = "train.precision=bf16" + (" with train.compile=true" if compile is True else "")
        fix = "--set train.precision=auto" + (" --set train.compile=auto" if compile is True else "")
        return (f"warning: {what} on a CPU without native bf16 (no AMX/AVX512-BF16) is emulated and several times "
                f"slower than fp32 here (docs/benchmarks.md); {fix} (or =fp32) chooses for this machine")
    if kind == "cuda" and precision == "bf16" and not cuda_has_bf16(dev):
        return ("warning: train.precision=bf16 on a GPU without native bf16 (compute capability < 8.0) is emulated "
                "and slow; --set train.precision=auto chooses for this machine")
    return None

"""Which device a model runs on and in which dtype, decided in one place, with the reason.

:func:`choose_precision` turns the ``--device`` / ``--dtype`` a user gave (``auto`` by default) into a
:class:`Precision`: a concrete torch device (``cpu``, ``cuda:0``, ``mps``), a concrete dtype
(``float32``, ``bfloat16``, ``float16``) and a one-line reason a person can read ("bfloat16: CPU has
avx512_bf16"). The rule for ``auto``:

* device: ``cuda`` if torch sees a CUDA GPU, else ``mps`` if available, else ``cpu``;
* dtype: ``bfloat16`` on a CUDA GPU that does bf16 natively (compute capability 8.0 and up), and on a
  CPU with native bf16 instructions (AVX512-BF16 or AMX-BF16); ``float32`` everywhere else (MPS
  included: its bf16 support depends on the OS version and has not been measured here).

The hardware is read once by :func:`detect_hardware` (torch's CUDA/MPS queries and the CPU's flags
from ``/proc/cpuinfo``, or torch's own CPU capability query where that file does not exist); tests
pass a fake :class:`Hardware` instead. Nothing here loads a model: :func:`streamvlm.models.load_model`
calls it, then loads the weights in the chosen dtype and moves them to the chosen device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["DEVICES", "DTYPES", "Hardware", "Precision", "choose_precision", "cpu_flags_from_cpuinfo", "detect_hardware",
           "check_device_syntax", "precision_of"]

#: What ``--device`` accepts (``cuda:N`` too).
DEVICES = ("auto", "cpu", "cuda", "mps")
#: What ``--dtype`` accepts.
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(?::(\d+))?)$")
#: CPU flags (as /proc/cpuinfo spells them) that mean bf16 matrix work runs natively.
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Hardware:
    """What this machine offers, as far as the choice of device and dtype goes.

    ``cuda_capabilities`` holds one ``(major, minor)`` compute capability per visible CUDA GPU (empty:
    no CUDA); ``cpu_flags`` the CPU's feature flags (lower case, /proc/cpuinfo spelling).
    """

    cuda_capabilities: tuple[tuple[int, int], ...] = ()
    mps: bool = False
    cpu_flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def cuda_count(self) -> int:
        return len(self.cuda_capabilities)


@dataclass(frozen=True)
class Precision:
    """The device and dtype a model runs in, and why they were chosen."""

    device: str  # a torch device string: "cpu", "cuda:0", "mps"
    dtype: str  # "float32", "bfloat16" or "float16"
    dtype_reason: str  # e.g. "bfloat16: CPU has avx512_bf16"
    device_reason: str  # e.g. "cpu: no CUDA or MPS device"

    def to_dict(self) -> dict[str, str]:
        """The fields every benchmark JSON carries: ``device``, ``dtype``, ``dtype_reason``, ``device_reason``."""
        return {"device": self.device, "dtype": self.dtype, "dtype_reason": self.dtype_reason, "device_reason": self.device_reason}

    def describe(self) -> str:
        """One line for the log: ``device cpu (no CUDA or MPS device), dtype bfloat16 (CPU has avx512_bf16)``."""
        return f"device {self.device_reason}, dtype {self.dtype_reason}"

    @property
    def torch_dtype(self) -> Any:
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]


def cpu_flags_from_cpuinfo(text: str) -> frozenset[str]:
    """The feature flags in ``/proc/cpuinfo`` text (the ``flags`` lines, x86; ``Features`` lines, Arm)."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.lower().split())
    return frozenset(flags)


def _torch_cpu_flags() -> frozenset[str]:
    """bf16 flags from torch's own CPU query, for systems without /proc/cpuinfo (private API: absent is fine)."""
    import torch

    found = set()
    for flag, query in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
        probe = getattr(torch.cpu, query, None)
        try:
            if probe is not None and probe():
                found.add(flag)
        except Exception:  # noqa: BLE001 - a capability query that fails means "not known to be there"
            continue
    return frozenset(found)


def detect_hardware(cpuinfo: Path = Path("/proc/cpuinfo")) -> Hardware:
    """Read this machine's CUDA GPUs (and their compute capability), MPS, and CPU flags. Takes milliseconds."""
    import torch

    caps: tuple[tuple[int, int], ...] = ()
    if torch.cuda.is_available():
        caps = tuple(tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count()))  # type: ignore[misc]
    mps_backend = getattr(torch.backends, "mps", None)
    mps = bool(mps_backend is not None and mps_backend.is_available())
    try:
        flags = cpu_flags_from_cpuinfo(cpuinfo.read_text(errors="replace"))
    except OSError:
        flags = frozenset()
    if not flags:
        flags = _torch_cpu_flags()
    return Hardware(cuda_capabilities=caps, mps=mps, cpu_flags=flags)


def check_device_syntax(device: str) -> None:
    """Raise :class:`ConfigError` unless ``device`` reads as auto, cpu, cuda, cuda:N or mps (availability is checked at load)."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ConfigError(f"device: must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


def _choose_device(requested: str, hw: Hardware) -> tuple[str, str]:
    check_device_syntax(requested)
    if requested == "auto":
        if hw.cuda_count:
            return "cuda:0", "cuda:0: a CUDA GPU is available"
        if hw.mps:
            return "mps", "mps: no CUDA GPU, Apple MPS is available"
        return "cpu", "cpu: no CUDA or MPS device"
    if requested == "cpu":
        return "cpu", "cpu: asked for"
    if requested == "mps":
        if not hw.mps:
            raise ConfigError("device mps: Apple MPS is not available on this machine (use --device cpu or auto)")
        return "mps", "mps: asked for"
    index = int(requested.partition(":")[2] or 0)
    if not hw.cuda_count:
        raise ConfigError(f"device {requested}: torch sees no CUDA GPU here (a CPU-only torch build, no driver, or "
                          "CUDA_VISIBLE_DEVICES empty); use --device cpu or auto")
    if index >= hw.cuda_count:
        raise ConfigError(f"device {requested}: only {hw.cuda_count} CUDA GPU(s) visible (cuda:0..cuda:{hw.cuda_count - 1})")
    return f"cuda:{index}", f"cuda:{index}: asked for"


def _native_bf16(device: str, hw: Hardware) -> str | None:
    """Why ``device`` does bf16 natively, or None when it does not (or it is not known)."""
    if device.startswith("cuda"):
        major, minor = hw.cuda_capabilities[int(device.partition(":")[2] or 0)]
        return f"GPU compute capability {major}.{minor} has bf16" if major >= 8 else None
    if device == "cpu":
        have = [flag for flag in _CPU_BF16_FLAGS if flag in hw.cpu_flags]
        return f"CPU has {' and '.join(have)}" if have else None
    return None


def _choose_dtype(requested: str, device: str, hw: Hardware) -> tuple[str, str]:
    if requested not in DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(DTYPES)}, got {requested!r}")
    native = _native_bf16(device, hw)
    if requested == "auto":
        if native:
            return "bfloat16", f"bfloat16: {native}"
        if device == "cpu":
            return "float32", "float32: CPU has no native bf16 (no avx512_bf16 or amx_bf16)"
        if device == "mps":
            return "float32", "float32: bf16 on MPS not measured here"
        return "float32", "float32: GPU has no native bf16 (compute capability below 8.0)"
    if requested == "bfloat16" and not native:
        return "bfloat16", "bfloat16: asked for (no native bf16 here: it may be slower than float32)"
    if requested == "float16" and device == "cpu":
        return "float16", "float16: asked for (CPUs rarely have fast float16: it may be slower than float32)"
    return requested, f"{requested}: asked for"


def choose_precision(device: str = "auto", dtype: str = "auto", hardware: Hardware | None = None) -> Precision:
    """Resolve ``device`` (auto, cpu, cuda, cuda:N, mps) and ``dtype`` (auto, float32, bfloat16, float16).

    ``hardware`` defaults to :func:`detect_hardware` of this machine. Raises :class:`ConfigError` for a
    value that does not parse, or a device this machine does not have (naming what it has). An
    explicit dtype is always honoured; its reason warns when it is likely slower than float32 here.
    Next: :func:`streamvlm.models.load_model` loads the weights as chosen and logs :meth:`Precision.describe`.
    """
    hw = hardware if hardware is not None else detect_hardware()
    chosen_device, device_reason = _choose_device(device, hw)
    chosen_dtype, dtype_reason = _choose_dtype(dtype, chosen_device, hw)
    return Precision(chosen_device, chosen_dtype, dtype_reason, device_reason)


def precision_of(adapter: Any) -> Precision:
    """The :class:`Precision` a loaded adapter runs in: what :func:`load_model` chose, or (for an adapter
    built another way) read off its weights with the reason "as loaded"."""
    chosen = getattr(adapter, "precision", None)
    if isinstance(chosen, Precision):
        return chosen
    param = next(adapter.model.parameters())
    dtype = str(param.dtype).removeprefix("torch.")
    return Precision(str(param.device), dtype, f"{dtype}: as loaded", f"{param.device}: as loaded")

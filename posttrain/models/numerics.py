"""Which numbers a run computes in, chosen from what the hardware can do, with the reason kept.

``model.dtype`` names a precision; ``auto`` picks one by this rule (DESIGN principle 7):

| device | condition | choice |
|---|---|---|
| CUDA | bf16 supported | ``bfloat16`` (weights and compute) |
| CUDA | otherwise | ``float32`` |
| CPU | ``avx512_bf16`` or ``amx_bf16`` in the CPU flags, *and* a 512^3 probe runs bf16 >= 1.5x fp32 | ``bf16_mixed`` |
| CPU | otherwise | ``float32`` |

``bf16_mixed`` keeps every weight, gradient, optimizer state and loss reduction in fp32 and runs the forward (and so
the backward) of matmuls under ``torch.autocast(bfloat16)``; norms, softmax and log-softmax stay fp32 by autocast's
own lists. On a CPU without native bf16 the same matmul is ~170x slower, which is why the flags alone are not
trusted: a short probe must also show the speed-up (a VM can hide or emulate a feature).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
FLAGS_ENV = "POSTTRAIN_CPU_FLAGS"
PROBE_MIN_SPEEDUP = 1.5  # below this the casts autocast adds eat the gain (measured: see benchmarks/RESULTS.md)
DTYPES = ("auto", "float32", "bfloat16", "float16", "bf16_mixed")


@dataclass(frozen=True)
class Numerics:
    """``weights``: the dtype parameters are stored in; ``autocast``: the dtype matmuls run in, or None."""
    name: str
    weights: torch.dtype
    autocast: torch.dtype | None
    reason: str

    def as_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "weights": _short(self.weights),
                "autocast": _short(self.autocast) if self.autocast else None, "reason": self.reason}

    def describe(self) -> str:
        compute = f", matmuls in {_short(self.autocast)}" if self.autocast else ""
        return f"{self.name} (weights in {_short(self.weights)}{compute}: {self.reason})"


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo cannot be read.

    ``POSTTRAIN_CPU_FLAGS`` (space-separated, may be empty) replaces them: the test suite sets it empty so that
    ``auto`` means fp32 on every machine CI lands on, and forces each branch of the rule where it tests it."""
    forced = os.environ.get(FLAGS_ENV)
    if forced is not None:
        return set(forced.split())
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def bf16_probe_speedup(n: int = 512, repeats: int = 5) -> float:
    """fp32 time / bf16 time of an n^3 matmul, best of ``repeats`` (~10 ms where bf16 is native)."""
    def best(a: torch.Tensor, b: torch.Tensor, tries: int) -> float:
        a @ b  # the first call pays for the kernel choice
        times = []
        for _ in range(tries):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    t32 = best(a32, b32, repeats)
    # Where bf16 is emulated a bf16 call takes ~1 s: one timed call is enough to see it lose.
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    t16 = best(a16, b16, 1)
    if t16 < 4 * t32:
        t16 = min(t16, best(a16, b16, repeats))
    return t32 / max(t16, 1e-9)


def _cpu_auto(flags: set[str], probe) -> Numerics:
    have = [f for f in BF16_CPU_FLAGS if f in flags]
    if not have:
        return Numerics("float32", torch.float32, None, "CPU without avx512_bf16/amx_bf16: bf16 matmuls are emulated")
    speedup = probe()
    if speedup < PROBE_MIN_SPEEDUP:
        return Numerics("float32", torch.float32, None,
                        f"CPU has {'+'.join(have)} but a bf16 matmul probe ran only {speedup:.2f}x fp32")
    return Numerics("bf16_mixed", torch.float32, torch.bfloat16,
                    f"CPU has {'+'.join(have)}; a bf16 matmul probe ran {speedup:.2f}x fp32")


def choose_numerics(dtype: str, device: torch.device, *, flags: set[str] | None = None, probe=None) -> Numerics:
    """The precision for ``model.dtype`` on ``device``; ``flags``/``probe`` replace the CPU's for tests."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "bf16_mixed":
        return Numerics("bf16_mixed", torch.float32, torch.bfloat16, "asked for")
    if dtype != "auto":
        return Numerics(dtype, getattr(torch, dtype), None, "asked for")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Numerics("bfloat16", torch.bfloat16, None, "GPU with bf16")
        return Numerics("float32", torch.float32, None, "GPU without bf16")
    if device.type != "cpu":
        return Numerics("float32", torch.float32, None, f"{device.type}: no rule, the safe default")
    return _cpu_auto(cpu_flags() if flags is None else flags, bf16_probe_speedup if probe is None else probe)


def autocast(numerics: Numerics | None, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast region a forward runs in (a no-op unless the numerics ask for one)."""
    if numerics is None or numerics.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=numerics.autocast)

"""Which arithmetic a model runs in: bf16 autocast where the hardware does it natively and
faster, float32 elsewhere (``train.autocast: auto``, and ``epiray impute``).

On CUDA, bf16 autocast is the default wherever the device supports it. On a CPU it pays only
with native bf16 matrix units — Intel AMX (``amx_bf16``) or AVX-512 BF16 (``avx512_bf16``) —
where oneDNN runs bf16 GEMMs 2–4x faster than float32; elsewhere bf16 is emulated and slower.
The CPU decision takes the capability from ``/proc/cpuinfo`` and PyTorch, then confirms it with
a short timed probe (a two-layer network step in float32 and under bf16 autocast, ~1 s),
cached per machine in ``~/.cache/epiray/autocast.json`` (``EPIRAY_CACHE_DIR`` overrides the
folder) keyed by the CPU model, its flags and the torch version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

__all__ = [
    "Precision",
    "autocast_context",
    "cpu_bf16_flags",
    "resolve_autocast",
    "step_probe",
]

#: CPU flags that mean native bf16 matrix arithmetic.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: bf16 must be at least this much faster in the probe to be chosen.
MIN_SPEEDUP = 1.15
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Precision:
    """The resolved arithmetic of a run.

    Attributes
    ----------
    bf16
        Whether bf16 autocast is on.
    device
        ``cuda`` or ``cpu``.
    reason
        One line for logs and the MLflow tag ``epiray.autocast``, e.g. ``bf16 (auto: CPU
        with amx_bf16, probe 2.4x faster)``.
    """

    bf16: bool
    device: str
    reason: str

    def context(self) -> contextlib.AbstractContextManager:
        """The autocast context to run a step or a prediction in."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=torch.bfloat16)


def yaml_off(v: Any) -> Any:
    """An ``autocast`` setting as YAML wrote it: ``autocast: off`` is the boolean False in
    YAML 1.1 (PyYAML), and means ``"off"``; True is refused like any other non-mode."""
    return "off" if v is False else v


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native bf16 flags of this CPU (:data:`NATIVE_BF16_FLAGS` found in the first
    ``flags`` line of ``/proc/cpuinfo``, or of ``cpuinfo`` when given); [] when unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in NATIVE_BF16_FLAGS if f in flags]
    return []


def _cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cache_path() -> Path:
    base = os.environ.get("EPIRAY_CACHE_DIR") or Path.home() / ".cache" / "epiray"
    return Path(base) / "autocast.json"


def probe_cpu_speedup(seconds: float = 0.4, width: int = 512, batch: int = 4096) -> float:
    """Speed of a training step under CPU bf16 autocast relative to float32 (> 1: faster).

    A two-layer ReLU network (``width`` units, a batch of ``batch``), forward and backward,
    timed for about ``seconds`` of process CPU time in each mode after a warm-up step.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 128, generator=gen)
    net = torch.nn.Sequential(
        torch.nn.Linear(128, width), torch.nn.ReLU(), torch.nn.Linear(width, width)
    )

    def rate(bf16: bool) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

        def step() -> None:
            with ctx:
                y = net(x)
            y.float().square().mean().backward()

        step()
        n, t0 = 0, time.process_time()
        while time.process_time() - t0 < seconds or n < 3:
            step()
            n += 1
        return n / (time.process_time() - t0)

    return rate(True) / rate(False)


def _cpu_decision(
    probe: Callable[[], float] | None = None, what: str = "generic"
) -> tuple[bool, str]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    flags = cpu_bf16_flags(cpuinfo)
    if not flags:
        return False, "float32 (auto: this CPU has no native bf16)"
    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        supported = False
    if not supported:
        return False, f"float32 (auto: CPU has {', '.join(flags)} but this torch cannot use it)"
    key = hashlib.sha256(
        json.dumps([CACHE_FORMAT, _cpu_model(cpuinfo), flags, torch.__version__, what]).encode()
    ).hexdigest()[:16]
    path = _cache_path()
    cache = {}
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    speedup = cache.get(key)
    source = "cached probe"
    if not isinstance(speedup, (int, float)):
        speedup = (probe or probe_cpu_speedup)()
        source = "probe"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps({**cache, key: speedup}))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home: probe again next time
    what = f"CPU with {', '.join(flags)}, {source} {speedup:.1f}x"
    if speedup >= MIN_SPEEDUP:
        return True, f"bf16 (auto: {what} faster)"
    return False, f"float32 (auto: {what}, not enough to use bf16)"


_DECIDED: dict[tuple[str, str], tuple[bool, str]] = {}


def resolve_autocast(
    mode: Literal["auto", "bf16", "off"],
    device: torch.device | str,
    *,
    probe: Callable[[], float] | None = None,
    what: str = "generic",
) -> Precision:
    """Resolve ``train.autocast`` for ``device``.

    ``bf16`` and ``off`` are taken as given. ``auto``: bf16 on a CUDA device that supports
    it; on a CPU, bf16 when it has native bf16 units and a probe finds it at least
    :data:`MIN_SPEEDUP` times faster; float32 otherwise.

    Parameters
    ----------
    mode, device
        The setting and the device it is for.
    probe
        Measures the speed-up of bf16 for the work at hand (a training step of the model
        being trained, :func:`step_probe`); default: :func:`probe_cpu_speedup`, a generic
        network. Called only on a CPU with native bf16 whose cache has no figure for
        ``what``.
    what
        What the probe measures (e.g. the model and its sizes): the key of its cached figure.
        Decided once per process for each device type and ``what``.
    """
    dev = torch.device(device).type
    if mode == "off":
        return Precision(False, dev, "float32 (autocast: off)")
    if mode == "bf16":
        return Precision(True, dev, "bf16 (autocast: bf16)")
    key = (dev, what)
    if key not in _DECIDED:
        if dev == "cuda":
            ok = torch.cuda.is_bf16_supported()
            _DECIDED[key] = (ok, "bf16 (auto: CUDA)" if ok else "float32 (auto: no CUDA bf16)")
        elif dev == "cpu":
            _DECIDED[key] = _cpu_decision(probe, what)
        else:
            _DECIDED[key] = (False, f"float32 (auto: {dev})")
    bf16, reason = _DECIDED[key]
    return Precision(bf16, dev, reason)


def step_probe(step: Callable[[], None], seconds: float = 0.5) -> Callable[[], float]:
    """A probe of ``step`` (a forward and backward pass, no optimiser step): its speed under
    bf16 autocast over float32, each timed for about ``seconds`` of process CPU time after a
    warm-up call (CPU time, not wall time, so other work on the machine moves it less). The
    global torch RNG (dropout) is restored afterwards, so probing changes no run."""

    def probe() -> float:
        state = torch.get_rng_state()
        try:

            def rate(bf16: bool) -> float:
                ctx = (
                    torch.autocast("cpu", dtype=torch.bfloat16)
                    if bf16
                    else contextlib.nullcontext()
                )
                with ctx:
                    step()
                n, t0 = 0, time.process_time()
                while time.process_time() - t0 < seconds or n < 2:
                    with ctx:
                        step()
                    n += 1
                return n / (time.process_time() - t0)

            return rate(True) / rate(False)
        finally:
            torch.set_rng_state(state)

    return probe


def autocast_context(
    mode: Literal["auto", "bf16", "off"], device: torch.device | str
) -> contextlib.AbstractContextManager:
    """The autocast context of :func:`resolve_autocast`."""
    return resolve_autocast(mode, device).context()

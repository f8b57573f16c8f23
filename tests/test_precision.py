"""bf16 autocast where the hardware does it natively and faster (``train.autocast: auto``)."""

from __future__ import annotations

import json

import pytest
import torch

from epiray import precision
from epiray.precision import cpu_bf16_flags, resolve_autocast, step_probe

AMX = "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse avx512f amx_bf16 avx512_bf16\n"
AVX2 = "processor\t: 0\nmodel name\t: Some EPYC\nflags\t\t: fpu sse avx2 fma\n"


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No decision made yet in this process, the machine cache in ``tmp_path``."""
    monkeypatch.setattr(precision, "_DECIDED", {})
    monkeypatch.setenv("EPIRAY_CACHE_DIR", str(tmp_path))
    return tmp_path


def _cpu(monkeypatch, cpuinfo: str, supported: bool = True) -> None:
    real = precision.Path

    class FakePath(type(real())):
        def read_text(self, *a, **k):
            if str(self) == "/proc/cpuinfo":
                return cpuinfo
            return super().read_text(*a, **k)

    monkeypatch.setattr(precision, "Path", FakePath)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: supported)


def test_native_bf16_flags():
    assert cpu_bf16_flags(AMX) == ["amx_bf16", "avx512_bf16"]
    assert cpu_bf16_flags(AVX2) == []
    assert cpu_bf16_flags("") == []


def test_explicit_modes_are_taken_as_given(fresh):
    assert resolve_autocast("off", "cpu").bf16 is False
    p = resolve_autocast("bf16", "cpu")
    assert p.bf16 and "autocast: bf16" in p.reason
    with p.context():
        assert torch.is_autocast_enabled("cpu")


def test_auto_is_float32_without_native_bf16(fresh, monkeypatch):
    _cpu(monkeypatch, AVX2)
    calls = []
    p = resolve_autocast("auto", "cpu", probe=lambda: calls.append(1) or 9.0, what="m")
    assert not p.bf16 and "no native bf16" in p.reason and not calls  # never probed


def test_auto_probes_once_per_machine_and_model(fresh, monkeypatch):
    _cpu(monkeypatch, AMX)
    calls = []

    def fast():
        calls.append(1)
        return 2.0

    p = resolve_autocast("auto", "cpu", probe=fast, what="avocado:big")
    assert p.bf16 and "amx_bf16" in p.reason and "probe 2.0x faster" in p.reason
    cache = json.loads((fresh / "autocast.json").read_text())
    assert list(cache.values()) == [2.0]
    # a new process on the same machine reads the cache instead of probing again
    monkeypatch.setattr(precision, "_DECIDED", {})
    p = resolve_autocast("auto", "cpu", probe=fast, what="avocado:big")
    assert p.bf16 and "cached probe" in p.reason and len(calls) == 1
    # another model is probed on its own, and a small gain keeps float32
    p = resolve_autocast("auto", "cpu", probe=lambda: 1.05, what="edice:small")
    assert not p.bf16 and "not enough" in p.reason


def test_auto_is_float32_when_torch_cannot_use_the_units(fresh, monkeypatch):
    _cpu(monkeypatch, AMX, supported=False)
    p = resolve_autocast("auto", "cpu", probe=lambda: 3.0, what="m")
    assert not p.bf16 and "this torch cannot use it" in p.reason


def test_step_probe_times_both_modes_and_restores_the_rng():
    net = torch.nn.Linear(64, 64)
    x = torch.randn(256, 64)
    modes = []

    def step():
        modes.append(torch.is_autocast_enabled("cpu"))
        torch.nn.functional.dropout(net(x), 0.5).float().sum().backward()

    torch.manual_seed(3)
    before = torch.get_rng_state()
    speedup = step_probe(step, seconds=0.01)()
    assert speedup > 0 and True in modes and False in modes
    assert torch.equal(torch.get_rng_state(), before)


def test_yaml_off_means_float32():
    """``autocast: off`` in a YAML file is the boolean False to PyYAML; it means "off"."""
    import yaml

    from epiray.loop import LoopParams

    raw = yaml.safe_load("autocast: off")
    assert raw == {"autocast": False}
    assert LoopParams.model_validate(raw).autocast == "off"
    with pytest.raises(ValueError):
        LoopParams.model_validate({"autocast": True})

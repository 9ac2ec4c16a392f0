"""probe works without a GPU, named hardware overrides it, measurements are cached."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from spillover.cli.plan import main
from spillover.hw.gpus import GPUS, UnknownGpuError, find_gpu, match_gpu_name, pcie_bandwidth
from spillover.hw.info import GiB, nominal_hardware, parse_bytes, parse_rate, with_overrides
from spillover.hw.probe import (
    apply_measurements,
    load_measurements,
    measure_links,
    probe,
    probe_gpus,
)


@pytest.fixture(autouse=True)
def _cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPILLOVER_CACHE", str(tmp_path / "cache"))


def test_units() -> None:
    assert parse_bytes("32GiB") == 32 * GiB
    assert parse_bytes("60GB") == 60_000_000_000
    assert parse_bytes("1.9TB") == 1_900_000_000_000
    assert parse_bytes("512 MiB") == 512 << 20
    assert parse_rate("80GB/s") == 80e9
    with pytest.raises(ValueError, match="cannot read a size"):
        parse_bytes("lots")


def test_gpu_table_lookup() -> None:
    assert find_gpu("rtx5090").vram_gb == 32
    assert find_gpu("4090").key == "rtx4090"
    assert find_gpu("RTX 4060 Ti").pcie_width == 8
    assert find_gpu("H100").key == "h100-sxm"
    assert find_gpu("rtx pro 6000").vram_gb == 96
    with pytest.raises(UnknownGpuError, match="ambiguous"):
        find_gpu("6000")
    with pytest.raises(UnknownGpuError, match="unknown GPU"):
        find_gpu("voodoo5")
    assert match_gpu_name("NVIDIA H100 PCIe").key == "h100-pcie"  # type: ignore[union-attr]
    assert match_gpu_name("NVIDIA H100 80GB HBM3").key == "h100-sxm"  # type: ignore[union-attr]
    assert match_gpu_name("NVIDIA GeForce RTX 5090").key == "rtx5090"  # type: ignore[union-attr]
    assert len({g.key for g in GPUS}) == len(GPUS)
    assert pcie_bandwidth(4, 8) == pcie_bandwidth(4, 16) / 2


def test_probe_without_gpu_degrades_gracefully(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if nvidia-ml-py were not installed
    gpus, reason = probe_gpus()
    assert gpus == [] and "nvidia-ml-py" in reason
    hw = probe()
    assert hw.gpu is None and hw.ram_total > 0 and hw.cpu.threads >= 1
    assert hw.disk_free is not None and hw.probed
    assert any("no GPU" in r for r in hw.reasons)


def test_named_hardware_overrides_the_probe() -> None:
    base = nominal_hardware(None, "16GB")
    hw = with_overrides(base, gpu="rtx5090", ram="60GB", pcie=4, ram_bw="80GB/s", disk="1.9TB")
    assert hw.gpu is not None and hw.gpu.sm == "sm_120"
    assert 31 * GiB < hw.gpu.vram_total <= 32 * GiB
    assert hw.ram_total == 60_000_000_000 and hw.ram_available is None
    assert hw.links.h2d == pcie_bandwidth(4, 16) and hw.links.host_mem == 80e9
    assert hw.disk_free == 1_900_000_000_000
    assert with_overrides(hw, vram="24GiB").gpu.vram_total == 24 * GiB  # type: ignore[union-attr]
    assert with_overrides(hw, no_gpu=True).gpu is None


def test_measure_is_cached_and_applied(tmp_path: Path) -> None:
    hw = probe(use_cache=False)
    m = measure_links(hw, tmp_path, size_mib=16)
    assert m["cpu_read"] > 1e8 and m["disk_read"] > 1e6
    assert "h2d_pinned" not in m  # no CUDA here
    applied = apply_measurements(hw, m)
    assert applied.links.host_mem == m["cpu_read"]
    assert "measured" in applied.links.sources["host_mem"]
    from spillover.hw.probe import save_measurements

    save_measurements(hw, m)
    assert load_measurements(hw) is not None
    assert probe().links.host_mem == pytest.approx(m["cpu_read"])


def test_probe_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"gpus", "cpu", "ram_total", "ram_available", "disk_free",
            "links_bytes_per_s"} <= set(out)
    assert {"avx2", "avx512", "amx", "cores"} <= set(out["cpu"])
    assert main(["probe", "--gpus", "--json"]) == 0
    assert any(r["key"] == "rtx5090" for r in json.loads(capsys.readouterr().out))

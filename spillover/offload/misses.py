"""Where a tiered layer's misses run: the router's modes and the speeds it has measured."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("auto", "copy", "cpu", "mapped")


@dataclass
class MissRouter:
    """Where a step's misses run.

    - "stream": more routed rows than `stream_rows` (prefill): every non-resident expert of the
      layer goes to the device in one staging copy and runs there (layerwise prefill).
    - "copy": a miss the policy admits is copied into a slot and runs with the hits.
    - "cpu": a miss in host RAM runs on the CPU beside the device's work on the hits.
    `mode` "auto" admits what the policy admits; the rest runs on the CPU, unless the speeds
    measured so far (seconds per byte of expert weights, CPU compute against copies into slots,
    averaged over steps) say copying is faster, and then it is admitted too. "copy" and "cpu"
    force one path (tests, A/B runs).
    - "mapped": a decode step's misses run on the device from RAM, read across the link by the
      same kernels as the hits (`spillover.offload.mapped`): no host decision, no copy.
    """

    mode: str = "auto"
    stream_rows: int = 4096
    cpu_s_per_byte: float | None = None
    copy_s_per_byte: float | None = None
    smoothing: float = 0.2  # weight of the newest observation in the running averages

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"miss mode {self.mode!r}: expected {', '.join(MODES)}")

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def observe_cpu(self, seconds: float, nbytes: int) -> None:
        if nbytes > 0 and seconds > 0:
            self.cpu_s_per_byte = self._mix(self.cpu_s_per_byte, seconds / nbytes)

    def observe_copy(self, seconds: float, nbytes: int) -> None:
        if nbytes > 0 and seconds > 0:
            self.copy_s_per_byte = self._mix(self.copy_s_per_byte, seconds / nbytes)

    def copy_is_faster(self) -> bool:
        """Both paths measured, and a byte copied into a slot costs less than a byte computed."""
        cpu, copy = self.cpu_s_per_byte, self.copy_s_per_byte
        return cpu is not None and copy is not None and copy < cpu

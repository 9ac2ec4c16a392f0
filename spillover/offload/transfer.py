"""Moving experts between tiers: the copy stream and its staging buffers, and the per-layer
statistics of what moved and what it cost (read by `spillover bench`'s report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TierStats:
    """Per-layer timings and bytes, read by the bench's report of where decode time goes."""

    steps: int = 0
    copied_experts: int = 0
    cpu_experts: int = 0
    streamed_experts: int = 0
    staged_experts: int = 0  # copied for one step without a slot (none free, copying faster)
    disk_experts: int = 0
    copy_bytes: int = 0
    copy_s: float = 0.0
    disk_copy_s: float = 0.0  # gathered (disk, evicted copies) then sent to the device, pageable
    cpu_s: float = 0.0
    disk_s: float = 0.0
    mapped_bytes: int = 0  # expert weights decode kernels read across the link (mapped misses)
    extra: dict[str, float] = field(default_factory=dict)


class Staging:
    """The copy stream of a device and the staging buffers still read by queued work.

    A buffer allocated on the copy stream returns to that stream's pool when dropped; the stream
    first waits for the events of the compute that read it, so no copy overwrites it early."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.retired: list[tuple[Any, torch.cuda.Event]] = []

    def retire(self, buffers: Any, device: torch.device) -> None:
        if self.stream is None:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self.retired.append((buffers, event))

    def reclaim(self) -> None:
        """Called on the copy stream before it allocates: wait for the readers, then drop."""
        assert self.stream is not None
        for _, event in self.retired:
            self.stream.wait_event(event)
        self.retired.clear()

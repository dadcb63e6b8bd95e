"""Clocks, peak memory and the CPU's quietness: how the benchmark times a run and knows whether
another process disturbed it."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch


class Device:
    """Timing and peak-memory helpers for cpu or cuda (cuda calls only when the device is cuda)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    @contextlib.contextmanager
    def peak_memory(self) -> Iterator[dict]:
        """Yields a dict filled on exit: `peak_bytes` (CPU: resident-set high-water mark of the
        process, VmHWM, reset before the block through /proc/self/clear_refs; CUDA:
        max_memory_allocated) and `peak_delta_bytes` (over what was held before the block)."""
        out: dict = {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        else:
            base = rss_bytes()
            out["hwm_reset"] = reset_rss_peak()
        yield out
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else rss_peak_bytes()
        out.update(peak_bytes=peak, peak_delta_bytes=peak - base, base_bytes=base)


def _status_bytes(field_name: str) -> int:
    """A memory field of /proc/self/status; elsewhere than Linux, the (unresettable) peak RSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def rss_peak_bytes() -> int:
    return _status_bytes("VmHWM")


def reset_rss_peak() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class CpuMonitor:
    """CPU time used by *other* processes while a block runs (from /proc/stat minus this process's
    own CPU time), in cores: with 2 cores and OpenMP, another busy process can slow a decode step
    tenfold (threads wait for a descheduled sibling), so such runs are detected and repeated."""

    def __init__(self) -> None:
        self.foreign_cores: float | None = None
        self.steal_cores: float | None = None

    @staticmethod
    def _stat() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]  # user nice system irq softirq
        steal = fields[7] if len(fields) > 7 else 0
        return busy / hz, steal / hz

    def __enter__(self) -> CpuMonitor:
        self._start = (self._stat(), sum(os.times()[:2]), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        stat0, own0, t0 = self._start
        stat1, own1, t1 = self._stat(), sum(os.times()[:2]), time.perf_counter()
        self._end = t1
        if stat0 is None or stat1 is None or t1 <= t0:
            return
        self.foreign_cores = max(0.0, (stat1[0] - stat0[0]) - (own1 - own0)) / (t1 - t0)
        self.steal_cores = (stat1[1] - stat0[1]) / (t1 - t0)

    def disturbed(self, limit: float = 0.3) -> bool:
        """More than `limit` cores taken by others (blocks under 0.5 s are too short to tell)."""
        stat0, _, t0 = self._start
        if self.foreign_cores is None or self._end - t0 < 0.5:
            return False
        return self.foreign_cores + (self.steal_cores or 0.0) > limit


def wait_for_quiet(limit: float = 0.2, window: float = 0.5, max_wait: float = 300.0) -> float:
    """Wait (at most `max_wait` s) until other processes use less than `limit` cores over a
    `window`; returns the seconds waited. Called before each group of runs and before a redo."""
    waited = 0.0
    while waited < max_wait:
        with CpuMonitor() as monitor:
            time.sleep(window)
        if monitor.foreign_cores is None or monitor.foreign_cores + (monitor.steal_cores or 0.0) < limit:
            break
        waited += window
    return waited


def best_seconds(dev: Device, fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls, after one untimed call (warm caches, allocations)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = dev.now()
        fn()
        times.append(dev.now() - t0)
    return min(times)


def summary(values: list[float]) -> dict:
    """Median and spread of repeated measurements."""
    values = [v for v in values if v is not None]
    if not values:
        return {}
    out = {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
    if len(values) >= 4:
        q = statistics.quantiles(values, n=4)
        out["iqr"] = q[2] - q[0]
    return out

"""Timing and device facts: CUDA events (or perf_counter on CPU), warmup, repeats, percentiles."""
from __future__ import annotations

import contextlib
import gc
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms,
                "repeats": self.repeats}


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's CPU thread count set to n (None: unchanged) for the duration, restored after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of an ascending list."""
    if not sorted_values:
        raise ValueError("no samples")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    """Free what the last case left (gc, CUDA cache) and restart the peak-memory statistics."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """torch.cuda.max_memory_allocated since the last peak_reset (None off CUDA)."""
    if device.type != "cuda":
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Timing:
    """Run fn warmup times, then time `repeats` calls one by one (CUDA events on GPU)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    samples: list[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return Timing(percentile(samples, 50), percentile(samples, 10), percentile(samples, 90), repeats)


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, repeats: int) -> dict:
    """Device-to-device copy of one nbytes tensor: GB/s counts read + write (2 * nbytes)."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, warmup, repeats)
    moved = 2 * n * 4
    del src, dst
    return {"bytes_per_copy": n * 4, "bytes_moved": moved, **timing.as_dict(),
            "gbps": moved / (timing.median_ms * 1e-3) / 1e9,
            "formula": "GB/s = 2 * nbytes / t (read src + write dst)"}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _nvidia_smi(field: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.stdout.strip().splitlines()
    return line[0].strip() if out.returncode == 0 and line else None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 — a missing or broken package is reported as absent
        return None
    return getattr(mod, "__version__", "unknown")


def device_info(device: torch.device) -> dict:
    """Name, driver, memory and software versions for the result header."""
    device = torch.device(device)
    info = {"device_type": device.type, "torch": torch.__version__, "triton": _version("triton"),
            "transformers": _version("transformers"), "python": platform.python_version(),
            "cuda_runtime": torch.version.cuda, "host": platform.node(), "cpu": platform.processor() or
            platform.machine(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 2),
                    sm_count=props.multi_processor_count, compute_capability=f"{props.major}.{props.minor}",
                    driver_version=_nvidia_smi("driver_version") or "unknown (nvidia-smi unavailable)")
        info["device_name"] = props.name
    else:
        info["device_name"] = f"cpu-{info['cpu']}"
        info["driver_version"] = "n/a (CPU)"
    return info


def time_adaptive(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
                  case_seconds: float, min_repeats: int = 3) -> Timing:
    """One cold call (JIT, allocation) and, when the repeat count is adaptive, one call timed as an
    estimate; the remaining warmup calls only while they fit in case_seconds; then time
    clamp(case_seconds / estimate, min_repeats, repeats) calls: slow cases get fewer repeats."""
    device = torch.device(device)
    fn()
    sync(device)
    min_repeats = min(min_repeats, repeats)
    if repeats == min_repeats:
        return time_fn(fn, device, max(0, warmup - 1), repeats)
    t0 = time.perf_counter()
    fn()
    sync(device)
    estimate = max(time.perf_counter() - t0, 1e-9)
    extra = min(max(0, warmup - 2), int(case_seconds / estimate))
    n = max(min_repeats, min(repeats, int(case_seconds / estimate)))
    return time_fn(fn, device, extra, n)

"""Helpers shared by the benchmarks: CUDA-graph replay timed with events (launch gaps out), event
timing of eager loops, host timing for CPU kernels, the two ceilings (copy bandwidth, bf16 matmul
rate), the decode-path switch, and the printed table."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Iterator, Sequence

import torch


@contextlib.contextmanager
def gemv(mode: str) -> Iterator[None]:
    """QLORA_EXT_GEMV=mode inside the block ("0": no decode path, "1": the CUDA-core kernel, "tc": CUDA's
    tensor-core decode kernel); the previous setting after it."""
    old = os.environ.get("QLORA_EXT_GEMV")
    os.environ["QLORA_EXT_GEMV"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("QLORA_EXT_GEMV")
        else:
            os.environ["QLORA_EXT_GEMV"] = old


def cpu_time(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, float]:
    """Best wall time of each of ``fns`` in seconds, over ``rounds`` rounds that call each once in turn
    (after one warm-up round): on a shared, noisy machine every variant sees the same disturbances, and
    the minimum is the least disturbed run."""
    best = {name: float("inf") for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def event_time(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` (eager, e.g. forward + backward) between CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def format_table(rows: list[dict], cols: list[str]) -> str:
    """The columns of ``cols`` that any row has, right-aligned, floats to 3 significant digits."""
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    fmt = lambda v: "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table)


def cuda_time(fns: Sequence[Callable[[], object]], inner: int = 10, reps: int = 20) -> tuple[float, str]:
    """Median seconds per call over ``fns`` (rotated, e.g. over inputs larger than L2 together):
    a CUDA graph of ``inner`` rounds, replayed ``reps`` times between events. Falls back to an
    event-timed eager loop when the callables cannot be captured; the method used is returned."""
    calls = inner * len(fns)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                for f in fns:
                    f()
        run, method = graph.replay, "cuda-graph"
    except Exception:  # not capturable: time the eager loop instead
        torch.cuda.synchronize()

        def run():
            for _ in range(inner):
                for f in fns:
                    f()

        method = "eager"
    return event_time(run, reps=reps, warmup=1) / calls, method


def copy_bandwidth(nbytes: int = 1 << 30) -> dict[str, float]:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written), three ways: the
    driver's memcpy eager and in a CUDA graph, and an elementwise copy kernel; "best" is the ceiling."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    out = {
        "memcpy_graph": 2 * nbytes / cuda_time([lambda: dst.copy_(src)], inner=5, reps=10)[0],
        "kernel_graph": 2 * nbytes / cuda_time([lambda: torch.mul(src, 1.0, out=dst)], inner=5, reps=10)[0],
    }
    out["memcpy_eager"] = 2 * nbytes / event_time(lambda: dst.copy_(src), reps=10)
    out["best"] = max(out.values())
    return out


def bf16_matmul_rate(n: int = 8192) -> float:
    """bf16 matmul FLOP/s on random n x n x n operands."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t, _ = cuda_time([lambda: a @ b], inner=3, reps=5)
    return 2 * n**3 / t

"""Times benchmark variants: median after warm-up, in one process, fastmeta
and its baselines interleaved, and peak memory of one call."""

import ctypes
import json
import platform
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .. import ops
from . import cases

__all__ = ["time_callable", "time_callables", "run", "format_header", "format_row"]


# A call shorter than this is timed right after an untimed call of its own,
# so that what ran before it in the round (another function's data in the
# caches, a thread pool gone to sleep) does not count against it; longer calls
# are timed directly.
_REWARM_BELOW_S = 0.05


def time_callables(
    fns: Sequence[Callable[[], None]], device: str, min_time: float = 1.0, min_repeats: int = 5, max_repeats: int = 50
) -> List[float]:
    """Median seconds per call of each of ``fns`` after two warm-up calls,
    the calls interleaved (one timed call of each per round) so that a drift
    of the machine's speed during the measurement falls on all of them alike."""

    def timed(fn) -> float:
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return begin.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    rewarm = []
    for fn in fns:
        fn()
        rewarm.append(timed(fn) < _REWARM_BELOW_S)
    times: List[List[float]] = [[] for _ in fns]
    start = time.perf_counter()
    rounds = 0
    while rounds < min_repeats or (time.perf_counter() - start < min_time * len(fns) and rounds < max_repeats):
        for fn, fn_times, again in zip(fns, times, rewarm):
            if again:
                fn()
            fn_times.append(timed(fn))
        rounds += 1
    return [statistics.median(t) for t in times]


def time_callable(
    fn: Callable[[], None], device: str, min_time: float = 1.0, min_repeats: int = 5, max_repeats: int = 50
) -> float:
    """Median seconds per call after two warm-up calls."""
    return time_callables([fn], device, min_time, min_repeats, max_repeats)[0]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _release_free_heap():
    """Returns the C heap's free pages and fastmeta's recycled buffers to the
    system (glibc malloc_trim, ``ops.release_recycled_buffers``), so that
    buffers a call gets from memory earlier calls freed count in the resident
    set again."""
    ops.release_recycled_buffers()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mib(fn: Callable[[], None], device: str) -> Optional[float]:
    """Peak memory one call adds above what was in use when it started, in MiB:
    on CUDA from the caching allocator's statistics; on the CPU from the
    resident set's high-water mark, reset before the call (Linux only)."""
    fn()  # warm: one-time allocations are not the call's
    if device != "cuda":
        _release_free_heap()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set size
        base = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - base) / 1024
    except (OSError, StopIteration):
        return None


def compiled_baseline(variant: cases.Variant, device: str) -> Tuple[str, Optional[Callable[[], None]], Dict]:
    """``torch.compile`` of the variant's first baseline (the eager code a
    user would compile), called once: its name, the compiled callable (None
    if compiling failed), and the seconds that first call took (compile
    time, reported apart from the timings) or the error."""
    name, eager = next(iter(variant.baselines.items()))
    torch._dynamo.reset()  # each variant compiles afresh, within dynamo's recompilation limit
    compiled = torch.compile(eager)
    start = time.perf_counter()
    try:
        compiled()
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001: what fails to compile is reported, not fatal
        return f"torch.compile ({name})", None, {"compile_error": f"{type(error).__name__}: {_first_line(error)}"}
    return f"torch.compile ({name})", compiled, {"compile_s": time.perf_counter() - start}


def _first_line(error: Exception) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), "")


def run(
    names: List[str], device: str, memory: bool = True, progress: bool = False, compile: bool = True
) -> Iterator[Dict]:
    """Measures the cases ``names`` and yields each row as soon as it is
    measured; with ``compile``, each variant's first baseline under
    ``torch.compile`` too."""
    from tqdm import tqdm

    for name in tqdm(names, desc="bench", unit="case", disable=not progress, leave=False):
        for variant in cases.build([name], device):
            baselines = {label: (fn, {}) for label, fn in variant.baselines.items()}
            failed = []
            if compile:
                compiled_name, compiled, compile_info = compiled_baseline(variant, device)
                if compiled is None:
                    failed.append((compiled_name, compile_info))
                else:
                    baselines[compiled_name] = (compiled, compile_info)
            fast_s, *base_times = time_callables([variant.fastmeta, *(fn for fn, _ in baselines.values())], device)
            fast_mib = peak_memory_mib(variant.fastmeta, device) if memory else None
            row = {"case": variant.case, "shape": variant.label, "device": device, "fastmeta_ms": fast_s * 1e3}
            for (baseline_name, (baseline, info)), base_s in zip(baselines.items(), base_times):
                yield {
                    **row,
                    "baseline": baseline_name,
                    "baseline_ms": base_s * 1e3,
                    "speedup": base_s / fast_s,
                    "fastmeta_peak_mib": fast_mib,
                    "baseline_peak_mib": peak_memory_mib(baseline, device) if memory else None,
                    **info,
                }
            for baseline_name, info in failed:
                yield {**row, "baseline": baseline_name, "baseline_ms": None, "speedup": None, **info}


# The CPU kernel families, and whether their loops are compiled for AVX-512,
# AVX2 and baseline x86-64 with the widest the CPU has chosen at run time
# (FASTMETA_CPU_ISA caps the choice), or compiled for baseline x86-64 only:
# similarity (similarity_log_softmax, similarity_cross_entropy,
# attention_readout, pairwise_distance, relation_pair_pool); lstm
# (l2o_lstm_step, meta_lstm_step, matching_attention_lstm); mlp
# (mlp_task_derivatives); model-based (mann_memory, gnn_adjacency);
# prototypes (class_prototypes, contrastive_loss).
CPU_KERNEL_FAMILIES = {"similarity": True, "lstm": True, "mlp": True, "model-based": True, "prototypes": False}


def cpu_kernel_isas() -> Dict[str, str]:
    """The vector instructions each CPU kernel family runs with, and (``blas``)
    what PyTorch's own kernels use; every family's matrix products go through
    PyTorch's BLAS."""
    import fastmeta

    isa = fastmeta._C.cpu_isa()
    isas = {family: isa if dispatched else "baseline" for family, dispatched in CPU_KERNEL_FAMILIES.items()}
    isas["blas"] = f"PyTorch's ({torch.backends.cpu.get_cpu_capability().lower()})"
    return isas


def format_cpu_kernel_isas(isas: Dict[str, str]) -> str:
    return ", ".join(f"{family} {isa}" for family, isa in isas.items())


def machine() -> Dict:
    import fastmeta

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_isa": fastmeta._C.cpu_isa(),
        "cpu_kernels": cpu_kernel_isas(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


HEADER = ["case", "shape", "fastmeta ms", "baseline", "baseline ms", "speedup", "fastmeta MiB", "baseline MiB"]
WIDTHS = [18, 30, 11, 40, 11, 8, 12, 12]  # fixed, so rows print as they are measured


def format_header() -> str:
    return "\n".join([_line(HEADER), "-+-".join("-" * w for w in WIDTHS)])


def format_row(r: Dict) -> str:
    def mib(v):
        return "-" if v is None else f"{v:.0f}"

    if r["baseline_ms"] is None:
        return _line([r["case"], r["shape"], f"{r['fastmeta_ms']:.2f}", r["baseline"], "failed"]) + (
            f": {r['compile_error']}"
        )
    line = _line(
        [
            r["case"],
            r["shape"],
            f"{r['fastmeta_ms']:.2f}",
            r["baseline"],
            f"{r['baseline_ms']:.2f}",
            f"{r['speedup']:.2f}x",
            mib(r["fastmeta_peak_mib"]),
            mib(r["baseline_peak_mib"]),
        ]
    )
    return line + (f" (compiled in {r['compile_s']:.1f} s)" if "compile_s" in r else "")


def _line(cells) -> str:
    return " | ".join(str(c).ljust(w) for c, w in zip(cells, WIDTHS)).rstrip()


def write_json(path: str, rows: List[Dict]):
    with open(path, "w") as f:
        json.dump({"machine": machine(), "results": rows}, f, indent=2)

"""What the benchmark scripts share: where their virtualenvs and caches live, memory and
CPU-load measurements, and the machine description every result carries.

Standard library and torch only, so the scripts that run in other tools' virtualenvs
(sparsify, circuit-tracer) can import it too.

Paths. Everything a benchmark installs or caches lives under one ignored folder of the
checkout, `.bench/` (or `$TL_TRANSCODERS_BENCH`), made by `bash benchmarks/setup.sh`:
`.bench/venvs/<tool>` (the peers' virtualenvs; `$SPARSIFY_PYTHON` / `$CT_PYTHON`
override their interpreters), `.bench/smollm2-fp32` (the converted model;
`$SMOLLM2_DIR` overrides it) and `.bench/cache/<benchmark>`.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MAX_OTHER_LOAD = 0.05
"""Timings taken while other processes used more of the CPU than this are not clean."""


def bench_dir() -> Path:
    """The folder holding the benchmarks' virtualenvs and caches."""
    return Path(os.environ.get("TL_TRANSCODERS_BENCH", REPO / ".bench"))


def cache_dir(name: str) -> Path:
    """The cache folder of one benchmark (`.bench/cache/<name>`)."""
    return bench_dir() / "cache" / name


def venv_python(tool: str, variable: str) -> str:
    """The interpreter of a peer tool's virtualenv: `$variable`, else
    `.bench/venvs/<tool>/bin/python` (made by benchmarks/setup.sh)."""
    return os.environ.get(variable) or str(bench_dir() / "venvs" / tool / "bin" / "python")


def require_python(python: str, tool: str) -> None:
    """Stop with a message saying how to make `python` if it does not exist."""
    if not Path(python).is_file():
        raise SystemExit(
            f"{python} does not exist: run `bash benchmarks/setup.sh` first (it makes the {tool} virtualenv)"
        )


def result_path(path: Path | str) -> str:
    """`path` as a result file records it: relative to the checkout when inside it (e.g.
    `.bench/cache/attribution/runs/...`), `$TL_TRANSCODERS_BENCH/...` when inside a
    benchmark folder set there, else as given; so that results name no machine's folders."""
    path = Path(os.path.abspath(path))  # not resolved: a virtualenv's python is a link
    if path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    bench = Path(os.path.abspath(bench_dir()))
    if path.is_relative_to(bench):
        return f"$TL_TRANSCODERS_BENCH/{path.relative_to(bench)}"
    return str(path)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Current resident memory of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process, so that `vm_hwm_mib`
    reports the peak of what follows."""
    Path("/proc/self/clear_refs").write_text("5")


def vm_hwm_mib() -> float:
    """Peak resident memory of this process since the last `reset_peak_rss`, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained of `y_hat` against `y` ([tokens, d])."""
    y, y_hat = y.double(), y_hat.double()
    return ((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine (all cores) from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def other_load(seconds: float = 5.0) -> float:
    """Share of the CPU (0..1 of all cores) used by other processes over `seconds` while
    this one's main thread sleeps: the machine's busy time minus this process's own (its
    other threads, e.g. a library's background thread, may still be running)."""
    busy, mine = cpu_busy_s(), sum(os.times()[:2])
    time.sleep(seconds)
    own = sum(os.times()[:2]) - mine
    return max(0.0, cpu_busy_s() - busy - own) / (seconds * len(os.sched_getaffinity(0)))


def wait_idle(max_wait: float) -> float:
    """Wait (up to `max_wait` s) until other processes use < `MAX_OTHER_LOAD` of the CPU;
    the load last seen."""
    start = time.perf_counter()
    load = other_load()
    while load > MAX_OTHER_LOAD and time.perf_counter() - start < max_wait:
        print(f"    machine busy ({load:.0%} of the CPU used by other processes); waiting", flush=True)
        load = other_load(30.0)
    return load


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info() -> dict:
    """The machine and software a result was measured on."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = "unknown"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "transformer_lens": _package_version("transformer-lens"),
        "tl_transcoders": _package_version("tl-transcoders"),
    }


def git_state() -> dict:
    """The checkout's commit and its uncommitted files."""

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {"commit": run("git", "rev-parse", "HEAD"), "dirty_files": run("git", "status", "--porcelain").splitlines()}

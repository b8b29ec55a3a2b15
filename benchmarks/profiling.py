"""py-spy profiles for the benchmark suite: sample a process, summarise where its time went.

A profile is py-spy's ``raw`` output (one ``frame;frame;...;frame count`` line per distinct
stack, thread name first with ``--threads``), sampled at ``RATE`` Hz with ``--nonblocking``
(the target is not paused, so the measured rate is barely disturbed) and ``--idle`` (waiting
threads are counted, so "waits for the next batch" shows up). :func:`summarise` reduces it to

- ``phases``: share of the busiest thread's samples per phase (first matching rule of
  :data:`PHASES` on the stack, else ``other``): the named bottleneck;
- ``top_own``: the frames the samples sat in (self time), as shares of that thread.

Usage::

    spy = start_pyspy(pid, 10, Path("w1.raw")); ...; spy.wait(); summarise(Path("w1.raw"))
    with profile_self(Path("reader.raw")) as prof: work()   # prof["summary"] afterwards
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

RATE = 50
PHASES = [
    ("waiting for the next batch", ("Queue.get",)),
    ("Ray report / checkpoint", ("report (infra", "get_all_reported")),
    ("dense optimiser", ("Adam.step", "optimizer.py", "adam.py")),
    ("backward (incl. fused sparse update, DDP all-reduce)", ("backward (torch/autograd",)),
    (
        "forward (lookup, all-to-all, tower)",
        (
            "CTRTask.forward",
            "TorchRecModel.forward",
            "PlainModel.forward",
            "DistributedModelParallel.forward",
        ),
    ),
    ("shuffle (Arrow take)", ("take (",)),
    ("Parquet read + decode (Arrow)", ("read_piece", "to_batches", "ParquetFile")),
    ("Arrow -> KJT conversion", ("BatchConverter.convert", "_convert")),
    ("LoRA routing", ("routing", "Router", "RoutedLoRA", "_AdaptedLinear")),
    ("tower forward", ("Backbone.forward", "head (")),
    ("S3 HTTP (s3fs/aiohttp)", ("s3fs", "aiohttp", "fsspec/asyn")),
    ("moto S3 server", ("moto", "werkzeug")),
]
"""(phase, substrings of a frame): the first rule any frame of a stack matches names its phase."""
IDLE = (
    "wait (",
    "select",
    "sleep",
    "acquire",
    "poll (",
    "main_loop",
    "_monitor_target",
    "_worker (",
)
"""A stack ending in a frame with one of these substrings is waiting, not working."""
OURS = ("(infra/", "(trainer/", "(embeddings/", "(adapters/", "(benchmarks/")


def pyspy() -> str | None:
    """Path of the py-spy binary (the venv's, else PATH), or None."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def _record(exe: str, pid: int, out: Path, seconds: float | None = None) -> subprocess.Popen:
    """``py-spy record`` of ``pid`` into ``out`` (raw, all threads, idle frames too); without
    ``seconds`` it samples until SIGINT."""
    duration = [] if seconds is None else ["--duration", str(max(1, int(seconds)))]
    cmd = [exe, "record", "--pid", str(pid), *duration, "--rate", str(RATE), "--format", "raw",
           "--threads", "--idle", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_pyspy(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """Start sampling ``pid`` for ``seconds`` into ``out`` (raw); ``.wait()`` on the result."""
    exe = pyspy()
    if exe is None:
        return subprocess.Popen(["true"])
    return _record(exe, pid, out, seconds)


@contextlib.contextmanager
def profile_self(out: Path) -> Iterator[dict]:
    """Sample this process with py-spy while the block runs; ``summary`` is filled after."""
    result: dict = {}
    exe = pyspy()
    spy = None if exe is None else _record(exe, os.getpid(), out)
    try:
        yield result
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
        result["summary"] = summarise(out)


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py:12)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def _phase(frames: list[str]) -> str:
    joined = ";".join(frames)
    return next((p for p, keys in PHASES if any(k in joined for k in keys)), "other")


def summarise(raw: Path, top: int = 6) -> dict | None:
    """Phases and top self-time frames of the working thread of a raw py-spy profile, and the
    phases of every thread's busy samples.

    The working thread is the one with the most busy samples in mdlora's own code (a frame of
    ``infra/``, ``trainer/``, ``embeddings/``, ``adapters/`` or ``benchmarks/``); busy means
    the stack does not end in an idle wait (``wait``, ``select``, ``sleep``, ``acquire``, ...).

    Returns:
        ``{"samples", "thread", "phases": {phase: share}, "top_own": [[frame, share]],
        "process_phases": {phase: share of all threads' busy samples}}`` or None when there is
        no profile.
    """
    if not raw.exists() or raw.stat().st_size == 0:
        return None
    stacks: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            frames = stack.split(";")
            stacks[frames[0]].append((frames[1:], int(n)))
    if not stacks:
        return None

    def busy(frames: list[str]) -> bool:
        return bool(frames) and not any(k in frames[-1] for k in IDLE)

    def ours(thread: str) -> int:
        return sum(n for f, n in stacks[thread] if busy(f) and any(p in ";".join(f) for p in OURS))

    thread = max(stacks, key=ours)
    total = sum(n for _, n in stacks[thread])
    phases: Counter = Counter()
    own: Counter = Counter()
    for frames, n in stacks[thread]:
        phases[_phase(frames)] += n
        own[_short(frames[-1]) if frames else "?"] += n
    process: Counter = Counter()
    for frames, n in (x for v in stacks.values() for x in v if busy(x[0])):
        process[_phase(frames)] += n
    busy_total = sum(process.values()) or 1
    return {
        "samples": total,
        "thread": thread,
        "phases": {p: round(n / total, 3) for p, n in phases.most_common()},
        "top_own": [[f, round(n / total, 3)] for f, n in own.most_common(top)],
        "process_phases": {p: round(n / busy_total, 3) for p, n in process.most_common()},
    }


def bottleneck(summary: dict | None) -> str:
    """One line naming where the profiled thread's time went (phases, then top self frames)."""
    if not summary:
        return "no profile (py-spy unavailable)"
    phases = ", ".join(f"{p} {s:.0%}" for p, s in list(summary["phases"].items())[:4])
    frames = ", ".join(f"{f} {s:.0%}" for f, s in summary["top_own"][:3])
    process = ", ".join(f"{p} {s:.0%}" for p, s in list(summary["process_phases"].items())[:3])
    return (
        f"py-spy ({summary['samples']} samples): {phases}; top self time: {frames}; "
        f"all threads' busy time: {process}"
    )

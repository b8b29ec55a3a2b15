"""Shared benchmark helpers: the reference workload, its data, peak RSS, GEMM FLOP/s, output.

The reference workload (the pretrain issue's): F = 10 sparse features, each looked up in its own
table of 100k rows x D = 16 (sum-pooled, one id per row), MLP 256-128-1 over the concatenated
pooled embeddings (E = F * D = 160 inputs), global batch B = 2048, BCE loss, dense Adam, rowwise
Adagrad on the tables. Ids are Zipf(a)-distributed (hot rows exist, as in real logs) and scattered
over the table by a fixed permutation so hot rows are not all adjacent.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import re
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass(kw_only=True)
class Reference:
    """Shape of the reference workload."""

    features: int = 10
    """Sparse features F (one table each)."""
    rows: int = 100_000
    """Rows per table."""
    dim: int = 16
    """Embedding dim D."""
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    """MLP hidden widths (a final Linear(H, 1) gives the logit)."""
    batch: int = 2048
    """Global batch size B."""
    zipf: float = 1.1
    """Zipf exponent of the ids."""
    domains: int = 4
    """Natural domains in the Parquet data."""
    dense_lr: float = 1e-3
    """Adam learning rate."""
    sparse_lr: float = 0.05
    """Rowwise Adagrad learning rate."""

    @property
    def names(self) -> list[str]:
        """Feature names ``f0..f{F-1}``; table ``t{i}`` belongs to feature ``f{i}``."""
        return [f"f{i}" for i in range(self.features)]

    def to_dict(self) -> dict:
        """JSON-able copy."""
        return asdict(self)


def reference_ids(ref: Reference, n: int, seed: int) -> np.ndarray:
    """Zipf ids of ``n`` rows for every feature: int64 [F, n] in [0, rows)."""
    rng = np.random.default_rng(seed)
    perm = np.random.default_rng(12345).permutation(ref.rows)  # same hot rows in every run
    raw = (rng.zipf(ref.zipf, size=(ref.features, n)) - 1) % ref.rows
    return perm[raw].astype(np.int64)


def reference_labels(n: int, seed: int) -> np.ndarray:
    """float32 [n] click labels with a ~25 % click rate."""
    return (np.random.default_rng(seed + 1).random(n) < 0.25).astype(np.float32)


def write_reference_parquet(
    out: Path, ref: Reference, n: int, seed: int = 0, rows_per_file: int = 262_144
) -> tuple[Path, Path]:
    """Write the reference workload as Parquet logs plus a matching mdlora schema YAML.

    Columns: ``f0..f{F-1}`` int64 ids, ``domain`` string (``d0..d{K-1}``), ``click`` int8.

    Args:
        out: directory to create (its ``train/`` and ``schema.yaml`` are written).
        ref: workload shape.
        n: rows.
        seed: data seed.
        rows_per_file: rows per Parquet file (row groups of 64k rows).

    Returns:
        ``(train_dir, schema_path)``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    train = out / "train"
    train.mkdir(parents=True, exist_ok=True)
    ids = reference_ids(ref, n, seed)
    labels = reference_labels(n, seed)
    doms = np.random.default_rng(seed + 2).integers(0, ref.domains, n)
    names = np.array([f"d{k}" for k in range(ref.domains)])
    for i, lo in enumerate(range(0, n, rows_per_file)):
        hi = min(n, lo + rows_per_file)
        cols = {f: pa.array(ids[j, lo:hi]) for j, f in enumerate(ref.names)}
        cols["domain"] = pa.array(names[doms[lo:hi]])
        cols["click"] = pa.array(labels[lo:hi].astype(np.int8))
        pq.write_table(pa.table(cols), train / f"part-{i:04d}.parquet", row_group_size=65_536)
    schema = {
        "name": "reference",
        "label": "click",
        "domain": {"column": "domain", "values": [str(v) for v in names]},
        "tables": [
            {"name": f"t{i}", "num_embeddings": ref.rows, "dim": ref.dim}
            for i in range(ref.features)
        ],
        "sparse": [
            {"name": f, "table": f"t{i}", "policy": "index"} for i, f in enumerate(ref.names)
        ],
    }
    schema_path = out / "schema.yaml"
    schema_path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return train, schema_path


# ---- process memory -------------------------------------------------------------------------


def _status_mb(pid: int | str, field: str) -> float:
    """A memory field of /proc/<pid>/status (``VmHWM``, ``VmRSS``) in MiB; 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size (``VmHWM``) in MiB; 0 if unreadable."""
    return _status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float:
    """Current resident set size (``VmRSS``) in MiB; 0 if gone."""
    return _status_mb(pid, "VmRSS")


def descendants(root: int) -> list[int]:
    """Pids of every live descendant of ``root`` (from /proc/*/stat parent links)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        out += sorted(frontier)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def niceness(pid: int) -> int | None:
    """Nice value of ``pid`` (None if gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    except OSError:
        return None


def cmdline(pid: int) -> str:
    """Command line of ``pid`` (Ray workers show their actor name here), '' if gone."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


# ---- dense compute bound --------------------------------------------------------------------


def mlp_shapes(in_features: int, hidden: list[int]) -> list[tuple[int, int]]:
    """(in, out) of every Linear of an MLP ``in_features -> hidden... -> 1``."""
    return list(itertools.pairwise([in_features, *hidden, 1]))


def flops_per_sample(in_features: int, hidden: list[int]) -> float:
    """Dense training FLOPs per sample: 3 x forward MACs x 2 (forward + two backward GEMMs)."""
    return 3 * 2 * sum(i * o for i, o in mlp_shapes(in_features, hidden))


def gemm_flops(
    in_features: int, hidden: list[int], batch: int, threads: int, seconds: float = 1.0
) -> float:
    """Measured FLOP/s of one training step's GEMMs at batch B on ``threads`` threads.

    Per Linear (in -> out): forward ``x[B,in] @ W^T``, input grad ``g[B,out] @ W``, weight
    grad ``g^T @ x``; each costs 2 B in out FLOPs.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        ops, shapes = [], mlp_shapes(in_features, hidden)
        for i, o in shapes:
            x, w, gy = (torch.randn(*s, generator=g) for s in ((batch, i), (o, i), (batch, o)))
            ops += [(x, w.t()), (gy, w), (gy.t(), x)]
        flops = 3 * 2 * batch * sum(i * o for i, o in shapes)

        def step() -> None:
            for a, b in ops:
                torch.matmul(a, b)

        for _ in range(5):
            step()
        n, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < seconds:
            step()
            n += 1
        return flops * n / dt
    finally:
        torch.set_num_threads(old)


def compute_bound(in_features: int, hidden: list[int], batch: int, seconds: float = 1.0) -> dict:
    """GEMM FLOP/s (1 thread, all threads) and the samples/s ceiling they give.

    The ceiling (``samples_per_s``) is ``cores x`` the 1-thread rate: linear scaling, the most
    any split of the cores into processes x threads can reach. The measured all-thread rate is
    recorded beside it (on a loaded machine OpenMP threads contend and it can fall far below).
    """
    cores = os.cpu_count() or 1
    fps = flops_per_sample(in_features, hidden)
    f1 = gemm_flops(in_features, hidden, batch, 1, seconds)
    fall = gemm_flops(in_features, hidden, batch, cores, seconds)
    return {
        "in_features": in_features,
        "flops_per_sample": fps,
        "gemm_flops_1_thread": f1,
        "gemm_flops_all_threads": fall,
        "samples_per_s_1_thread": f1 / fps,
        "samples_per_s_all_threads": fall / fps,
        "samples_per_s": cores * f1 / fps,
    }


# ---- processes ----


def launch(
    cmd: list[str],
    cwd: Path,
    timeout: float,
    watch: str = "",
    nice: int = 0,
    profiles: list[tuple[str, float, Path]] = (),
) -> dict:
    """Run ``cmd`` in ``cwd``; timestamp every output line; poll descendants' resources.

    Args:
        cmd: the command.
        cwd: working directory (also put on PYTHONPATH).
        timeout: seconds before it is killed.
        watch: substring of the command lines of the trainer processes among the descendants
            (Ray Train workers); their peak RSS (VmHWM), niceness and lifetime are tracked.
        nice: niceness increment of the launched process (inherited by its children).
        profiles: ``(regex, seconds, out)``: when an output line first matches ``regex``, py-spy
            samples the process named by its ``pid=N`` (Ray's log prefix; else the newest
            watched process) for ``seconds`` into ``out`` (raw format, see
            :mod:`benchmarks.profiling`).

    Returns:
        ``{"rc", "t_launch", "wall", "lines": [(unix time, text)], "rss": {pid: MiB},
        "nice": {pid: nice}, "seen": {pid: [first, last] unix time}, "titles": {pid: the first
        words of its command lines seen (a Ray worker's title names its task)}, "rss_root": the launched
        process's own peak MiB, "rss_tree_peak": the largest sum of VmRSS over it and all its
        descendants at one poll, "cpu": [(unix time,
        watched CPU-s, other CPU-s)], "cpu_s": {"watched": s, "other": s}, "load": [1-min load
        at start, at end]}`` (CPU of the descendants seen by the poller).
    """
    from benchmarks.profiling import start_pyspy

    env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1", PYTHONPATH=str(cwd))
    env.pop("RAY_ADDRESS", None)
    load0, t0 = os.getloadavg()[0], time.time()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    )
    lines: list[tuple[float, str]] = []
    rss: dict[int, float] = {}
    nices: dict[int, int | None] = {}
    seen: dict[int, list[float]] = {}
    titles: dict[int, set[str]] = {}
    cpu: dict[int, tuple[bool, float]] = {}
    timeline: list[tuple[float, float, float]] = []
    pending, spies = list(profiles), []
    rss_root, rss_tree = 0.0, 0.0
    reader = threading.Thread(
        target=lambda: lines.extend((time.time(), ln) for ln in proc.stdout), daemon=True
    )
    reader.start()
    while proc.poll() is None and time.time() - t0 < timeout:
        now = time.time()
        tree = [proc.pid, *descendants(proc.pid)] if watch else []
        rss_root = max(rss_root, peak_rss_mb(proc.pid))
        rss_tree = max(rss_tree, sum(rss_mb(p) for p in tree))
        for pid in tree:
            line = cmdline(pid)
            hit = watch in line
            was = cpu.get(pid, (False, 0.0))
            cpu[pid] = (hit or was[0], max(was[1], cpu_seconds(pid)))
            if hit:
                rss[pid] = max(rss.get(pid, 0.0), peak_rss_mb(pid))
                nices[pid] = niceness(pid)
                seen.setdefault(pid, [now, now])[1] = now
                titles.setdefault(pid, set()).add(line.split(" ", 1)[0])
        if watch:
            timeline.append(
                (
                    now,
                    sum(c for h, c in cpu.values() if h),
                    sum(c for h, c in cpu.values() if not h),
                )
            )
        for prof in list(pending):
            hit = next((t for _, t in list(lines) if re.search(prof[0], t)), None)
            if hit is not None:
                m = re.search(r"pid=(\d+)", hit)
                pid = int(m[1]) if m else max(seen, key=lambda p: seen[p][0], default=proc.pid)
                spies.append(start_pyspy(pid, prof[1], prof[2]))
                pending.remove(prof)
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    reader.join(5)
    for spy in spies:
        spy.wait()
    return {
        "rc": proc.returncode,
        "t_launch": t0,
        "wall": time.time() - t0,
        "lines": lines,
        "rss": rss,
        "rss_root": rss_root,
        "rss_tree_peak": rss_tree,
        "nice": nices,
        "seen": seen,
        "titles": {pid: sorted(t) for pid, t in titles.items()},
        "cpu": timeline,
        "cpu_s": {
            "watched": timeline[-1][1] if timeline else 0.0,
            "other": timeline[-1][2] if timeline else 0.0,
        },
        "load": [load0, os.getloadavg()[0]],
    }


def failure(run: dict, what: str) -> dict:
    """``{"error", "output_tail"}`` for a :func:`launch` result that failed."""
    tail = "".join(t for _, t in run["lines"][-60:])
    return {"error": f"{what} exited with {run['rc']}", "output_tail": tail}


# ---- output ---------------------------------------------------------------------------------


def machine() -> dict:
    """Where the numbers were taken: cores, load average, CPU model, versions."""
    import torch

    cpu = ""
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(out: Path, results: dict, markdown: str) -> None:
    """Write ``out`` (JSON) and ``out`` with suffix ``.md`` atomically."""
    from mdlora.atomic import write_bytes, write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    write_bytes(out.with_suffix(".md"), markdown.encode())


def read_json(path: Path) -> dict:
    """Load a JSON file."""
    return json.loads(Path(path).read_text())

"""Fault injection for the reliability tests and benchmark: the one seam product code calls.

Product code calls :func:`before_write` just before an atomic commit (:mod:`mdlora.atomic`) and
:func:`before_step` just before a training step (:func:`mdlora.trainer.loop.train`). Both do
nothing unless armed by an environment variable (then a kill is SIGKILL: no clean-up at all, as
a power cut or an OOM kill):

* ``MDLORA_FAULT_WRITE="SUBSTRING[:NTH[:MARKER]]"``: the NTH commit (counted in this process)
  whose destination contains SUBSTRING kills the process before the rename that publishes it.
* ``MDLORA_FAULT_KILL="RANK:STEP[:MARKER]"``: rank RANK dies just before it trains global step
  STEP.

With MARKER, the file is created first and the fault stays quiet while it exists, so a restarted
process (a Ray Train worker) does not die again. The Ray backend carries the armed variables
from the driver to its workers (:func:`armed` / :func:`arm`), so tests set them on the driver.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = ("MDLORA_FAULT_WRITE", "MDLORA_FAULT_KILL")
_hits = [0]


def armed() -> dict[str, str]:
    """The fault variables set in this process (to carry to worker processes)."""
    return {k: os.environ[k] for k in ENV if os.environ.get(k)}


def arm(spec: dict[str, str]) -> None:
    """Arm the faults ``spec`` (from :func:`armed` of the driver) in this process."""
    os.environ.update({k: v for k, v in spec.items() if k in ENV})


def _die(marker: str, note: str) -> None:
    if marker:
        Path(marker).write_text(note)
    os.kill(os.getpid(), signal.SIGKILL)


def before_write(dest: Path | str) -> None:
    """Kill this process before committing ``dest`` when ``MDLORA_FAULT_WRITE`` says so."""
    spec = os.environ.get("MDLORA_FAULT_WRITE")
    if not spec:
        return
    parts = spec.split(":", 2)
    marker = parts[2] if len(parts) > 2 else ""
    if parts[0] not in str(dest) or (marker and os.path.exists(marker)):
        return
    _hits[0] += 1
    if _hits[0] == int(parts[1] if len(parts) > 1 and parts[1] else 1):
        _die(marker, str(dest))


def before_step(rank: int, step: int) -> None:
    """Kill this process before rank ``rank`` trains global step ``step`` when
    ``MDLORA_FAULT_KILL`` says so."""
    spec = os.environ.get("MDLORA_FAULT_KILL")
    if not spec:
        return
    kill_rank, kill_step, marker = (spec.split(":", 2) + [""])[:3]
    if rank == int(kill_rank) and step == int(kill_step) and not (marker and os.path.exists(marker)):
        _die(marker, str(step))

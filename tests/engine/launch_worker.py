"""torchrun entry point of the launch tests: ``gppf`` with a one-time fault on the job's first attempt.

``GPPF_TEST_FAULT`` (test-only; nothing in gppf reads it) lists one fault per attempt, comma-separated:
the ``i``-th applies when ``TORCHELASTIC_RESTART_COUNT`` is ``i``, and ``-`` is none. A fault is

- ``rank1_step:S``: rank 1 dies (``os._exit``) as it starts SIMT step index ``S``;
- ``rank0_checkpoint:S``: rank 0 dies while writing the checkpoint of step ``S``, after its first file
  landed in the ``step_<S>.tmp`` folder (a half-written checkpoint is left behind).
"""
from __future__ import annotations

import os
import sys

from gppf import cli
from gppf.engine import checkpoint, simt


def install(faults: str) -> None:
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    planned = faults.split(",") if faults else []
    fault = planned[attempt] if attempt < len(planned) else "-"
    if fault == "-":
        return
    kind, _, at_text = fault.partition(":")
    at, rank = int(at_text), int(os.environ.get("RANK", "0"))
    if kind == "rank1_step" and rank == 1:
        step = simt.SIMTStep.__call__

        def dies_at_step(self: simt.SIMTStep, index: int) -> simt.StepResult:
            if index == at:
                os._exit(17)
            return step(self, index)

        simt.SIMTStep.__call__ = dies_at_step  # type: ignore[method-assign]
    elif kind == "rank0_checkpoint" and rank == 0:
        write = checkpoint._write_tensors

        def dies_mid_write(path, tensors) -> None:  # noqa: ANN001
            write(path, tensors)
            if path.parent.name == f"step_{at:06d}.tmp":
                os._exit(17)

        checkpoint._write_tensors = dies_mid_write
    elif kind not in ("rank1_step", "rank0_checkpoint"):
        raise SystemExit(f"unknown GPPF_TEST_FAULT {fault!r}")


if __name__ == "__main__":
    install(os.environ.get("GPPF_TEST_FAULT", ""))
    sys.exit(cli.main(sys.argv[1:]))

"""torchrun launches of ``gppf pretrain`` on CPU/gloo: two nodes equal one node, elastic restart resumes.

Every run is the same tiny two-task config (6 steps, a checkpoint every 2) trained by 2 ranks; the
reference is one torchrun agent with ``--nproc_per_node 2``. Each launch has a timeout and its whole
process group is killed when the test ends, so nothing hangs or outlives the test.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gppf.config import load_config, save_config

WORKER = Path(__file__).with_name("launch_worker.py")
TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo (torchrun) is unavailable",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(fault: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")}
    # a fresh rendezvous store per attempt: the shared one keeps the dead attempt's keys (pytorch#135712)
    return env | {"OMP_NUM_THREADS": "1", "GPPF_TEST_FAULT": fault, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _launch(commands: list[list[str]], *, env: dict[str, str], logs: Path) -> list[int]:
    """Start every command at once (own process group each), wait for all; kill all on timeout/exit."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for i, cmd in enumerate(commands):
            out = open(logs / f"agent{i}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True), out))
        return [p.wait(timeout=TIMEOUT_S) for p, _ in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s: " + _tails(logs))
    finally:
        for p, out in procs:
            for pid in [p.pid, *_descendants(p.pid)] if p.poll() is None else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # torchrun starts its workers in sessions of their own
            p.wait()
            out.close()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(logs.glob("*.log")))


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _pretrain(config: Path, out: Path) -> list[str]:
    return [str(WORKER), "pretrain", "--config", str(config), "--out", str(out)]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("launch") / "tiny.yaml"

    def synth(domain: str) -> dict:
        return {"format": "synthetic", "options": {"domain": domain, "size": 32, "num_train": 48, "num_val": 16}}

    base = {
        "model": {"backbone": "gppf_r18", "legos": 4, "active": 2, "width_mult": 0.125},
        "tasks": [
            {"name": "cls", "type": "classification", "batch_size": 8, "image_size": 32, "data": synth("flat")},
            {"name": "seg", "type": "segmentation", "batch_size": 4, "image_size": 32, "data": synth("noisy")},
        ],
        "train": {"steps": 6, "lr": 0.05, "warmup_steps": 2, "checkpoint_every": 2, "eval_every": 0,
                  "progress": False, "amp": "none", "channels_last": False, "deterministic": True,
                  "num_workers": 0, "threads": 1},
        "dist": {"backend": "gloo", "planner": "all"},
    }
    save_config(load_config(base=base), path)
    return path


@pytest.fixture(scope="module")
def one_node(config, tmp_path_factory) -> Path:
    """The reference: one torchrun agent, two processes."""
    out = tmp_path_factory.mktemp("one_node") / "run"
    cmd = _torchrun("--standalone", "--nnodes", "1", "--nproc_per_node", "2", *_pretrain(config, out))
    assert _launch([cmd], env=_env(), logs=out.parent / "logs") == [0], _tails(out.parent / "logs")
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict]) -> dict[int, dict[str, float]]:
    """Per step, the losses of its last train record (a resumed run logs again from its checkpoint)."""
    return {r["step"]: {k: v for k, v in r.items() if k == "loss" or k.startswith("loss/")}
            for r in records if r["kind"] == "train"}


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    folders = sorted((run / "checkpoints").iterdir())
    assert [f.name for f in folders if f.is_dir()][-1] == "step_000006", folders
    return load_file(str(run / "checkpoints" / "step_000006" / "model.safetensors"))


def _assert_same_run(got: Path, ref: Path, *, steps: range) -> None:
    want, have = _losses(_records(ref)), _losses(_records(got))
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    assert len(want[1]) >= 3  # total plus both tasks' losses
    for step in steps:
        assert have[step].keys() == want[step].keys()
        for key, value in want[step].items():
            assert have[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"step {step} {key}"
    a, b = _final_weights(got), _final_weights(ref)
    assert a.keys() == b.keys() and len(a) > 50
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_two_nodes_equal_one_node(config, one_node, tmp_path):
    """Two torchrun agents (--nnodes 2, one process each, c10d rendezvous on 127.0.0.1) train exactly
    what one agent with two processes trains: same per-step losses, same final weights."""
    out, port, job = tmp_path / "run", _free_port(), f"gppf-test-{uuid.uuid4().hex[:8]}"
    agents = [_torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                        "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", job,
                        "--rdzv_conf", f"is_host={int(i == 0)}", *_pretrain(config, out)) for i in range(2)]
    assert _launch(agents, env=_env(), logs=tmp_path / "logs") == [0, 0], _tails(tmp_path / "logs")
    _assert_same_run(out, one_node, steps=range(1, 7))
    assert all(r["kind"] != "warning" for r in _records(out))


def test_elastic_restarts_resume_from_last_complete_checkpoint(config, one_node, tmp_path):
    """``torchrun --max-restarts 2``: rank 0 dies while writing the step-4 checkpoint, then (relaunched)
    rank 1 dies mid-run at step 6. Each relaunch resumes by itself from the last *complete* checkpoint
    (step 2: the half-written step 4 is never read; then step 4), and the finished run has the
    uninterrupted run's losses and final weights."""
    out = tmp_path / "run"
    cmd = _torchrun("--standalone", "--nnodes", "1", "--nproc_per_node", "2", "--max-restarts", "2",
                    "--monitor-interval", "0.2", *_pretrain(config, out))
    faults = "rank0_checkpoint:4,rank1_step:5"
    assert _launch([cmd], env=_env(faults), logs=tmp_path / "logs") == [0], _tails(tmp_path / "logs")
    records = _records(out)
    notes = [i for i, r in enumerate(records) if r["kind"] == "warning" and "elastic job" in r["message"]]
    assert [records[i]["message"] for i in notes] == [
        f"elastic job (torchrun restart {n} on this node): resumed from step {s}" for n, s in ((1, 2), (2, 4))]
    attempts = [[r["step"] for r in records[a:b] if r["kind"] == "train"]
                for a, b in zip([0, *notes], [*notes, len(records)])]
    assert attempts[0][0] == 1 and attempts[0][-1] >= 4  # died writing checkpoint 4 (after step 4)
    assert attempts[1] == [3, 4, 5]  # resumed from 2, not the half-written 4; rank 1 died in step 6
    assert attempts[2] == [5, 6]  # resumed from the complete step 4 written by the second attempt
    _assert_same_run(out, one_node, steps=range(1, 7))
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.suffix in (".tmp", ".old")]
    assert leftovers == []

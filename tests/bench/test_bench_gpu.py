"""``gppf bench gpu`` and scripts/gpu_check.sh: one JSON object; without CUDA every check is skipped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gppf.bench.gpu import CHECKS, main_gpu

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_every_check_is_skipped_and_exit_is_clean(capsys):
    assert main_gpu(["--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["cuda"] is False and result["ok"] is True and "no CUDA" in result["reason"]
    assert list(result["checks"]) == list(CHECKS)
    assert all(c == {"status": "skipped", "reason": "no CUDA"} for c in result["checks"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpu_check_script_prints_one_json_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert result["bench"] == "gpu" and result["cuda"] is False


@pytest.mark.cuda
def test_gpu_check_quick_on_cuda(capsys):
    assert main_gpu(["--json", "--quick", "--steps", "4", "--skip", "cuda_tests"]) == 0
    result = json.loads(capsys.readouterr().out)
    step = result["checks"]["bf16_simt_step"]
    assert step["status"] == "ok" and step["peak_memory_bytes"] > 0 and step["images_per_s"] > 0

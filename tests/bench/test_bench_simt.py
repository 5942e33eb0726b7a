"""Smoke test of ``gppf bench simt``: quick sizes, one JSON object, finite positive values; helpers."""
from __future__ import annotations

import json
import math

import pytest
import torch

from gppf.bench.simt import GOALS, NoneGrads, Repeat, TimedStream, load_bench_config, main_simt


def test_repeat_and_timed_stream():
    batch = object()
    stream = TimedStream(Repeat(batch))
    assert next(stream) is batch and next(stream) is batch
    assert stream.waited >= 0.0


def test_none_grads_steps_the_optimizer_and_drops_gradients():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5)
    w.grad = torch.ones(3)
    proxy = NoneGrads(opt)
    proxy.step()
    proxy.zero_grad(set_to_none=False)  # the SIMT step asks to keep them; the baseline drops them
    assert torch.equal(w.detach(), torch.full((3,), 0.5)) and w.grad is None


def test_quick_config_shrinks_every_task_and_user_overrides_win():
    cfg = load_bench_config(config=None, overrides=["tasks.0.batch_size=2"], quick=True)
    assert cfg.train.progress is False and cfg.model.width_mult == 0.25
    assert [t.batch_size for t in cfg.tasks] == [2, 8, 8, 8, 8, 8]
    assert {t.image_size for t in cfg.tasks} == {32}


def test_bench_simt_quick_json(capsys):
    assert main_simt(["--quick", "--json", "--repeats", "1", "--warmup", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1, "exactly one JSON object on stdout"
    result = json.loads(out)
    run_cfg = load_bench_config(config=None, overrides=[], quick=True)
    tasks = {t.name for t in run_cfg.tasks}
    for key in GOALS:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0
    assert set(result["goals"]) == set(result["meets_goals"]) == set(GOALS)
    assert all(isinstance(v, bool) for v in result["meets_goals"].values())
    assert result["T"] == len(tasks) == 6
    singles = {f"single/{t}" for t in tasks}
    nones = {f"single_none/{t}" for t in tasks}
    med = result["median_step_s"]
    assert set(med) == singles | nones | {"simt", "alternating_kept_grads", "alternating_none_grads"}
    samples = result["step_samples_s"]
    assert samples["alternating_kept_grads"][0] == pytest.approx(sum(samples[k][0] for k in singles))
    assert samples["alternating_none_grads"][0] == pytest.approx(sum(samples[k][0] for k in nones))
    assert result["simt_vs_alternating_kept_grads"] == pytest.approx(med["simt"] / med["alternating_kept_grads"])
    assert result["simt_vs_alternating_none_grads"] == pytest.approx(med["simt"] / med["alternating_none_grads"])
    assert set(result["step_peak_bytes"]) == singles | {"simt"}
    assert all(v > 0 for v in result["median_step_s"].values())
    assert all(v > 0 for v in result["step_peak_bytes"].values())
    assert result["largest_task"] in tasks and result["skipped_steps"] == 0
    assert result["data_wait"]["wall_s"] > 0 and 0 <= result["data_wait_fraction"] < 1
    assert result["loader"]["train.num_workers"] == run_cfg.train.num_workers
    cfg = result["config"]
    assert set(cfg["tasks"]) == tasks and cfg["threads"] == cfg["train.threads"] == 1 and cfg["quick"] is True
    assert cfg["torch"] == torch.__version__ and cfg["backbone"] == "gppf_r18"

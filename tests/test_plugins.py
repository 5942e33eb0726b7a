"""A package outside gppf adds a task type, a reader and a backbone through entry points, no edit in gppf.

The plugin distribution is built by hand (a package plus a ``*.dist-info`` with ``METADATA`` and
``entry_points.txt``) in a temporary folder put on ``PYTHONPATH`` of a ``gppf pretrain`` subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN = '''
"""gppf_toyplugin: task type ``brightness``, reader ``toy_values``, backbone ``toy_net``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import tv_tensors

from gppf.backbones.lego_resnet import LegoBasicBlock, LegoResNet
from gppf.data.base import BadSamples, SampleDataset
from gppf.tasks import TaskType, iter_targets


class BrightnessHead(nn.Module):
    def __init__(self, *, pooled_dim: int, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta
        self.fc = nn.Linear(pooled_dim, 1)

    def forward(self, feats):
        return self.fc(feats.pooled).squeeze(1)

    def loss(self, outputs: Tensor, batch) -> Tensor:
        return F.smooth_l1_loss(outputs.float(), batch.stacked["value"].to(outputs.device), beta=self.beta)

    def predict(self, outputs: Tensor, batch) -> Tensor:
        return outputs.detach().float()


class MeanError:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.errors = []

    def update(self, preds, batch) -> None:
        self.errors.append((preds.cpu() - batch.stacked["value"].cpu()).abs())

    def compute(self) -> dict:
        return {"within_tol": float((torch.cat(self.errors) <= 0.1).float().mean())}


class BrightnessType(TaskType):
    name = "brightness"
    head = BrightnessHead
    primary_metric = "within_tol"

    def head_inputs(self, cfg, *, feature_channels, pooled_dim, num_classes, dataset):
        return {"pooled_dim": pooled_dim}

    def count_classes(self, dataset) -> int:
        return 1

    def new_metric(self, cfg, *, dataset, num_classes):
        return MeanError()

    def chance(self, *, num_classes, dataset):
        values = torch.tensor([t["value"] for t in iter_targets(dataset)])
        return {"within_tol": float(((values - values.median()).abs() <= 0.1).float().mean())}


class ToyValues(SampleDataset):
    """Grey images whose target ``value`` is the grey level in [0, 1]."""

    def __init__(self, *, n: int, size: int, seed: int) -> None:
        self.classes, self.bad, self.n, self.size, self.seed = [], BadSamples(), n, size, seed

    def __len__(self) -> int:
        return self.n

    def target(self, i: int) -> dict:
        grey = (37 * i + self.seed) % 181 + 40
        return {"value": grey / 255, "image_id": i}

    def __getitem__(self, i: int):
        target = self.target(i)
        image = torch.full((3, self.size, self.size), int(target["value"] * 255), dtype=torch.uint8)
        return tv_tensors.Image(image), target


def read_toy_values(cfg, *, split, task_type, on_bad_sample):
    return ToyValues(n=int(cfg.options.get("n", 32)), size=int(cfg.options.get("size", 32)),
                     seed=0 if split == "train" else 7)


def toy_net(*, tasks, legos=4, active=2, router=None, width_mult=0.25):
    """One basic block per stage: a different depth than the built-in backbones."""
    return LegoResNet(block=LegoBasicBlock, layers=[1, 1, 1, 1], tasks=tasks, legos=legos, active=active,
                      width_mult=width_mult, router_kwargs=router)
'''

ENTRY_POINTS = """
[gppf.task_types]
brightness = gppf_toyplugin:BrightnessType

[gppf.readers]
toy_values = gppf_toyplugin:read_toy_values

[gppf.backbones]
toy_net = gppf_toyplugin:toy_net
"""

CONFIG = """
model: {backbone: toy_net, legos: 4, active: 2}
tasks:
  - name: bright
    type: brightness
    data: {format: toy_values, options: {n: 24, size: 32}}
    batch_size: 8
    image_size: 32
    head: {beta: 0.05}
  - name: shapes
    type: classification
    data: {format: synthetic, options: {domain: flat, size: 32, num_train: 24, num_val: 8, num_classes: 3}}
    batch_size: 8
    image_size: 32
    augment: false
train: {steps: 3, lr: 0.01, warmup_steps: 0, log_every: 1, eval_every: 0, checkpoint_every: 100,
        num_workers: 0, threads: 1, progress: false, amp: none, channels_last: false, device: cpu}
"""


def make_plugin(root: Path) -> Path:
    """A hand-built installed distribution ``gppf-toyplugin`` under ``root/site``."""
    site = root / "site"
    (site / "gppf_toyplugin").mkdir(parents=True)
    (site / "gppf_toyplugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "gppf_toyplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gppf-toyplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return site


def run_gppf(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    src = Path(__file__).resolve().parents[1] / "src"
    path = os.pathsep.join([str(site), str(src), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gppf.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.mark.timeout(300)
def test_plugin_task_reader_backbone_train_with_gppf_pretrain(tmp_path):
    site = make_plugin(tmp_path)
    listed = run_gppf(site, "inspect", "tasks", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == {
        "brightness", "classification", "multilabel", "detection", "segmentation", "keypoints", "reid"}
    assert "toy_values" in run_gppf(site, "inspect", "readers", cwd=tmp_path).stdout.split()
    assert "toy_net" in run_gppf(site, "inspect", "backbones", cwd=tmp_path).stdout.split()

    (tmp_path / "plugin.yaml").write_text(CONFIG)
    run_dir = tmp_path / "run"
    proc = run_gppf(site, "pretrain", "--config", "plugin.yaml", "--out", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    losses = [r["loss/bright"] for r in train]
    assert all(0.0 < v < 1.0 for v in losses)  # smooth-L1 of values in [0, 1] with beta 0.05
    assert all(r["loss/shapes"] > 0.0 for r in train)
    val = [r for r in records if r["kind"] == "val"][-1]
    assert 0.0 <= val["bright/within_tol"] <= 1.0 and "bright/chance/within_tol" in val
    assert json.loads((run_dir / "router.json").read_text())["num_layers"] == 4  # toy_net: 4 basic blocks


def test_unknown_plugin_name_is_a_clear_error(tmp_path):
    site = make_plugin(tmp_path)
    (tmp_path / "bad.yaml").write_text(CONFIG.replace("type: brightness", "type: brightnes"))
    proc = run_gppf(site, "pretrain", "--config", "bad.yaml", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 1
    assert "tasks.0.type: unknown task type 'brightnes'; did you mean 'brightness'?" in proc.stderr
    assert "Traceback" not in proc.stderr

"""``gppf extract`` + ``gppf.load_task_model``: a plain dense model equal to the routed task model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

import gppf
from gppf.cli import main
from gppf.engine.model import MultiTaskModel
from gppf.heads.classification import ClassificationHead
from gppf.transfer.extract_task import task_model_spec, task_model_tensors
from gppf.transfer.pretrained import TaskSpec, load_pretrained
from gppf.transfer.task_model import TaskModelError, load_task_model
from tests.transfer.conftest import TASK_TYPES, all_types_config


def flat(out) -> list[torch.Tensor]:
    """Every tensor of a head's raw outputs, in a fixed order (dict keys sorted)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flat(out[k])]
    return [t for v in out for t in flat(v)]


def _point_data_away(run_dir: Path) -> None:
    """Every task's data now names a folder that does not exist: extraction must not open it."""
    text = (run_dir / "config.yaml").read_text()
    text = text.replace("format: synthetic", "format: imagefolder").replace("root: ''", "root: /nonexistent/gppf")
    (run_dir / "config.yaml").write_text(text)


def _assert_same_outputs(run_dir: Path, files: dict[str, Path]) -> float:
    """Loaded task model == routed MultiTaskModel for every task (atol 1e-4); returns the max abs diff."""
    routed = load_pretrained(run_dir).model
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for task, path in files.items():
        model = gppf.load_task_model(path)
        assert not any(type(m).__module__.startswith(("gppf.lego", "gppf.backbones")) for m in model.modules())
        with torch.no_grad():
            ref, got = flat(routed(x, task)), flat(model(x))
            other = next(t for t in files if t != task)  # another task's route gives other features
            assert (routed.backbone(x, other).pooled - model.features(x).pooled).abs().max() > 1e-3
        assert len(ref) == len(got) > 0
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=task)
            worst = max(worst, float((a - b).abs().max()))
    return worst


def test_every_task_type_extracts_from_the_run_dir_alone(pretrained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    _point_data_away(run)
    files = {task: tmp_path / f"{task}.safetensors" for task in TASK_TYPES}
    for task, out in files.items():
        assert main(["extract", str(run), "--task", task, "--out", str(out)]) == 0
    assert "width_mult 0.125: widths differ from resnet18" in capsys.readouterr().out
    side = json.loads(files["detection"].with_suffix(".json").read_text())
    assert side["type"] == "detection" and side["image_size"] == 32 and len(side["mean"]) == 3
    assert side["backbone"]["kind"] == "resnet" and side["backbone"]["stage_widths"] == [8, 16, 32, 64]
    assert side["backbone"]["inner_widths"] == [[[8], [8]], [[16], [16]], [[32], [32]], [[64], [64]]]
    assert side["source"]["step"] == 4 and side["torchvision"]["model"] is None
    assert side["head_args"] == load_pretrained(pretrained_run).specs["detection"].head_args
    _assert_same_outputs(pretrained_run, files)


def test_vit_task_model_equals_the_routed_model(tmp_path):
    from gppf.engine.trainer import train

    cfg = all_types_config(steps=1, extra=["model.backbone=gppf_vit_tiny", "model.width_mult=0.25",
                                           "model.legos=6", "model.active=3"])
    train(cfg, run_dir=tmp_path / "vit")
    files = {task: tmp_path / f"{task}.safetensors" for task in ("classification", "segmentation", "detection")}
    for task, out in files.items():
        assert main(["extract", str(tmp_path / "vit"), "--task", task, "--out", str(out)]) == 0
    side = json.loads(files["segmentation"].with_suffix(".json").read_text())
    assert side["backbone"]["kind"] == "vit" and side["backbone"]["dim"] == 48
    assert side["torchvision"]["model"] is None and "no torchvision ViT" in side["torchvision"]["reason"]
    model = load_task_model(files["segmentation"])
    assert isinstance(model.backbone, torchvision.models.VisionTransformer)
    _assert_same_outputs(tmp_path / "vit", files)


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial weights, BN statistics and routes (zero-init residuals would hide mistakes)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "var" in name else torch.randn(t.shape, generator=g) * 0.1)
        model.backbone.router.logits_TLN.normal_(generator=g)


@pytest.mark.parametrize(("name", "legos", "active", "tv_name"),
                         [("gppf_r18", 4, 2, "resnet18"), ("gppf_r50", 8, 4, "resnet50")])
def test_standard_widths_load_strictly_into_torchvision(name, legos, active, tv_name, tmp_path):
    from safetensors.torch import load_file, save_file

    backbone = gppf.create_backbone(name, tasks=["a", "b"], legos=legos, active=active)
    head = ClassificationHead(pooled_dim=backbone.pooled_dim, num_classes=3)
    model = MultiTaskModel(backbone=backbone, heads={"a": head, "b": ClassificationHead(pooled_dim=backbone.pooled_dim,
                                                                                     num_classes=3)})
    _randomize(model)
    model.eval()
    assert backbone.router.routes()["a"] != backbone.router.routes()["b"]
    spec = TaskSpec(name="a", type="classification", head_args={"pooled_dim": backbone.pooled_dim, "num_classes": 3},
                    classes=["x", "y", "z"], num_classes=3, image_size=64, mean=[0.5] * 3, std=[0.25] * 3,
                    primary_metric="top1")
    tensors, arch = task_model_tensors(model, "a")
    arch["name"] = name
    side = task_model_spec(spec, arch, source={"run_dir": "", "step": 0, "task": "a"})
    assert side.torchvision == {"model": tv_name, "reason": None, "set_aside": ["fc"]}
    path = tmp_path / "a.safetensors"
    save_file(tensors, str(path))
    path.with_suffix(".json").write_text(side.to_json())

    tv = getattr(torchvision.models, tv_name)()
    tv.fc = torch.nn.Identity()  # the one key set aside: the ImageNet classifier
    state = {k[len("backbone."):]: v for k, v in load_file(str(path)).items() if k.startswith("backbone.")}
    tv.load_state_dict(state, strict=True)
    loaded = load_task_model(path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        routed = backbone.forward_pooled(x, "a")
        torch.testing.assert_close(tv.eval()(x), routed, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loaded(x), model(x, "a"), atol=1e-4, rtol=1e-4)
        assert (backbone.forward_pooled(x, "b") - routed).abs().max() > 1e-2


def test_broken_sidecar_and_weights_are_named(pretrained_run, tmp_path):
    out = tmp_path / "m.safetensors"
    assert main(["extract", str(pretrained_run), "--task", "classification", "--out", str(out)]) == 0
    side = out.with_suffix(".json")
    doc = json.loads(side.read_text())
    cases = [
        ({k: v for k, v in doc.items() if k != "mean"}, "missing key 'mean'"),
        ({**doc, "backbone": {**doc["backbone"], "layers": [2, 2, 2]}}, "backbone.inner_widths"),
        ({**doc, "backbone": {**doc["backbone"], "stem_width": 16}}, "'backbone' weights do not match"),
        ({**doc, "num_classes": "10"}, "key 'num_classes' must be int"),
        ({**doc, "extra": 1}, r"unknown key\(s\) \['extra'\]"),
        ({**doc, "format": "other"}, "format"),
    ]
    for broken, message in cases:
        side.write_text(json.dumps(broken))
        with pytest.raises(TaskModelError, match=message) as info:
            load_task_model(out)
        assert str(side) in str(info.value) or str(out) in str(info.value)
    other = tmp_path / "other.safetensors"  # same shapes, another task: the weights say which task they hold
    assert main(["extract", str(pretrained_run), "--task", "multilabel", "--out", str(other)]) == 0
    side.write_text(json.dumps(doc))
    shutil.copy(other, out)
    with pytest.raises(TaskModelError, match="task 'multilabel' but .*m.json describes task 'classification'"):
        load_task_model(out)
    side.unlink()
    with pytest.raises(TaskModelError, match="m.json: missing"):
        load_task_model(out)
    assert main(["extract", str(pretrained_run), "--task", "nope", "--out", str(out)]) == 1

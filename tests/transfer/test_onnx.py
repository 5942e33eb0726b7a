"""``gppf export --onnx``: onnxruntime gives the routed PyTorch model's raw outputs for every task type."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from gppf.cli import main  # noqa: E402
from gppf.data.collate import Batch  # noqa: E402
from gppf.transfer.extract_task import extract_task_model  # noqa: E402
from gppf.transfer.onnx import METADATA_KEY, postprocess_detection  # noqa: E402
from gppf.transfer.pretrained import load_pretrained  # noqa: E402
from tests.transfer.conftest import TASK_TYPES  # noqa: E402

OUTPUTS = {"classification": ["logits"], "multilabel": ["logits"], "segmentation": ["logits"],
           "keypoints": ["heatmaps"], "reid": ["feat", "emb", "logits"],
           "detection": ["cls_logits", "box_ltrb", "centerness", "points", "point_strides"]}


def _run(path, x: torch.Tensor) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": x.numpy()})))


def _reference(run_dir, task: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    routed = load_pretrained(run_dir).model
    with torch.no_grad():
        out = routed(x, task)
    return {OUTPUTS[task][0]: out} if isinstance(out, torch.Tensor) else out


@pytest.mark.parametrize("task", TASK_TYPES)
def test_onnxruntime_matches_pytorch(task, pretrained_run, tmp_path):
    if task == "classification":  # straight from the run directory
        source = pretrained_run
    else:  # from the extracted file
        source = tmp_path / f"{task}.safetensors"
        extract_task_model(pretrained_run, task=task, out=source)
    onnx_file = tmp_path / f"{task}.onnx"
    assert main(["export", str(source), "--task", task, "--onnx", str(onnx_file), "--dynamic-batch"]) == 0
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # batch 3: not the traced 2
    got, ref = _run(onnx_file, x), _reference(pretrained_run, task, x)
    assert list(got) == OUTPUTS[task]
    for name in OUTPUTS[task]:
        np.testing.assert_allclose(got[name], ref[name].numpy(), atol=1e-3, rtol=1e-3, err_msg=f"{task}/{name}")
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    side = json.loads(props[METADATA_KEY])
    assert side["name"] == task and side["type"] == task and side["image_size"] == 32


def test_detection_postprocessing_of_onnx_outputs_equals_head_predict(pretrained_run, tmp_path):
    onnx_file = tmp_path / "det.onnx"
    assert main(["export", str(pretrained_run), "--task", "detection", "--onnx", str(onnx_file),
                 "--exporter", "torchscript", "--dynamic-batch"]) == 0
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    got = _run(onnx_file, x)
    head = load_pretrained(pretrained_run).model.heads["detection"]
    ref = _reference(pretrained_run, "detection", x)
    for name in OUTPUTS["detection"]:  # the legacy TorchScript exporter gives the same graph outputs
        np.testing.assert_allclose(got[name], ref[name].numpy(), atol=1e-3, rtol=1e-3)
    head.score_thresh = 0.0  # the 4-step model scores below the default 0.05: keep every candidate
    targets = [{"orig_size": (48, 64), "image_id": i} for i in range(2)]
    preds = head.predict(ref, Batch(images=x, targets=targets))
    mine = postprocess_detection(got, input_size=(32, 32), orig_sizes=[(48, 64)] * 2, score_thresh=0.0,
                                 nms_thresh=head.nms_thresh, topk_per_level=head.topk_per_level,
                                 max_detections=head.max_detections)
    for p, m in zip(preds, mine):
        assert len(p["boxes"]) == len(m["boxes"]) > 0
        np.testing.assert_array_equal(m["labels"], p["labels"].numpy())
        np.testing.assert_allclose(m["boxes"], p["boxes"].numpy(), atol=1e-3)
        np.testing.assert_allclose(m["scores"], p["scores"].numpy(), atol=1e-5)


def test_export_errors_are_one_line(pretrained_run, tmp_path, capsys):
    out = tmp_path / "seg.safetensors"
    extract_task_model(pretrained_run, task="segmentation", out=out)
    assert main(["export", str(out), "--task", "reid", "--onnx", str(tmp_path / "x.onnx")]) == 1
    assert "holds task 'segmentation', not 'reid'" in capsys.readouterr().err
    assert main(["export", str(pretrained_run), "--onnx", str(tmp_path / "x.onnx")]) == 1
    assert "needs --task" in capsys.readouterr().err


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_vit_onnx_matches_pytorch(exporter, tmp_path):
    """The ViT trunk (attention, bicubic position resize, simple pyramid) exports too (dynamo: ~1 min)."""
    from gppf.engine.trainer import train
    from tests.transfer.conftest import all_types_config

    cfg = all_types_config(steps=1, extra=["model.backbone=gppf_vit_tiny", "model.width_mult=0.25",
                                           "model.legos=6", "model.active=3"])
    train(cfg, run_dir=tmp_path / "vit")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for task in ("segmentation", "reid"):
        onnx_file = tmp_path / f"{task}.onnx"
        assert main(["export", str(tmp_path / "vit"), "--task", task, "--onnx", str(onnx_file),
                     "--exporter", exporter]) == 0
        x1 = x[:1]  # a fixed batch of 1 (no --dynamic-batch)
        got, ref = _run(onnx_file, x1), _reference(tmp_path / "vit", task, x1)
        for name in OUTPUTS[task]:
            np.testing.assert_allclose(got[name], ref[name].numpy(), atol=1e-3, rtol=1e-3, err_msg=f"{task}/{name}")

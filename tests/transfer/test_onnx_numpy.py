"""ONNX helpers that need no onnx package: detection post-processing (== ``FCOSHead.predict``) and the
clear error when the ``export`` extra is missing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gppf.data.collate import Batch
from gppf.heads.detection import FCOSHead
from gppf.interfaces import Features
from gppf.transfer.onnx import postprocess_detection


@pytest.mark.parametrize(("score_thresh", "nms_thresh", "topk", "max_det"),
                         [(0.05, 0.6, 1000, 100), (0.3, 0.3, 20, 7), (0.0, 0.5, 1000, 1000)])
def test_postprocessing_equals_head_predict(score_thresh, nms_thresh, topk, max_det):
    g = torch.Generator().manual_seed(0)
    head = FCOSHead(in_channels=[4, 8, 16, 32], num_classes=5, width=16, score_thresh=score_thresh,
                    nms_thresh=nms_thresh, topk_per_level=topk, max_detections=max_det).eval()
    with torch.no_grad():  # spread-out scores and boxes: many candidates, many overlaps
        head.cls_logits.bias.normal_(0.0, 1.5, generator=g)
        head.bbox_pred.bias.uniform_(0.0, 1.5, generator=g)
        feats = Features(pyramid=[torch.randn(3, c, 64 // s, 64 // s, generator=g) * 3
                                  for c, s in zip([4, 8, 16, 32], [4, 8, 16, 32])], pooled=torch.zeros(3, 32))
        outputs = head(feats)
    orig = [(64, 64), (100, 80), (30, 120)]
    preds = head.predict(outputs, Batch(images=torch.zeros(3, 3, 64, 64),
                                        targets=[{"orig_size": o, "image_id": i} for i, o in enumerate(orig)]))
    mine = postprocess_detection({k: v.numpy() for k, v in outputs.items()}, input_size=(64, 64), orig_sizes=orig,
                                 score_thresh=score_thresh, nms_thresh=nms_thresh, topk_per_level=topk,
                                 max_detections=max_det)
    total = 0
    for p, m in zip(preds, mine):
        assert len(m["boxes"]) == len(p["boxes"])
        np.testing.assert_array_equal(m["labels"], p["labels"].numpy())
        np.testing.assert_allclose(m["boxes"], p["boxes"].numpy(), atol=1e-3)
        np.testing.assert_allclose(m["scores"], p["scores"].numpy(), atol=1e-5)
        total += len(m["boxes"])
    assert total > 3  # not a comparison of empty lists


def test_missing_export_extra_is_a_one_line_error(pretrained_run, tmp_path, monkeypatch, capsys):
    import importlib.util

    from gppf.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert main(["export", str(pretrained_run), "--task", "reid", "--onnx", str(tmp_path / "r.onnx")]) == 1
    assert "needs onnxscript: pip install 'gppf[export]'" in capsys.readouterr().err
    assert not (tmp_path / "r.onnx").exists()

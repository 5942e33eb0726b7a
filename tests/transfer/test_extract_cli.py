"""`gppf extract` writes a task route's backbone as torchvision weights (``backbone.*``) with identical outputs."""
import torch
import torchvision
from safetensors.torch import load_file

from gppf.cli import main
from gppf.engine.trainer import build_run, train


def test_extract_cli_after_pretrain(tmp_path, tiny_cfg):
    cfg = tiny_cfg(steps=2)
    train(cfg, run_dir=tmp_path / "run")
    out = tmp_path / "cls.safetensors"
    assert main(["extract", str(tmp_path / "run"), "--task", "cls", "--out", str(out)]) == 0
    state = {k[len("backbone."):]: v for k, v in load_file(str(out)).items() if k.startswith("backbone.")}
    run = build_run(cfg, run_dir=tmp_path / "run", resume=True)
    backbone = run.model.backbone.eval()
    dense = torchvision.models.resnet18()
    dense.fc = torch.nn.Identity()
    from gppf.transfer.extract import _reshape_to  # width_mult 0.125: resize the torchvision skeleton

    _reshape_to(dense, state)
    dense.load_state_dict(state, strict=True)
    dense.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), backbone.forward_pooled(x, "cls"), atol=1e-4, rtol=1e-4)

"""Must show (issue 10): fine-tuning from a gppf pre-trained run beats ``--from none`` at the same budget on a
downstream task that was not in pre-training."""
from __future__ import annotations

from pathlib import Path

from gppf.config import load_config
from gppf.engine.trainer import train
from gppf.transfer.finetune import finetune

MARGIN = 0.10
TRAIN = {"lr": 0.1, "warmup_steps": 10, "checkpoint_every": 0, "eval_every": 0, "log_every": 50, "progress": False,
         "amp": "none", "channels_last": False, "deterministic": True, "num_workers": 0, "seed": 0}
MODEL = {"backbone": "gppf_r18", "legos": 4, "active": 2, "width_mult": 0.25}


def _synth(domain: str, *, num_train: int, num_val: int) -> dict:
    return {"format": "synthetic", "options": {"domain": domain, "size": 32, "num_train": num_train,
                                               "num_val": num_val, "num_classes": 3}}


def test_finetune_from_pretrained_beats_scratch_on_an_unseen_domain(tmp_path: Path):
    """Pre-training: 3-shape classification on the ``flat`` domain, 250 steps. Downstream: the same three
    shapes on the ``textured`` domain (striped / checkered / dotted objects on textured backgrounds; no
    pre-training task sees it), 1000 train / 300 val images, 60 steps of full fine-tuning (route
    ``copy:shapes_flat``) vs the identical config ``--from none``.

    Measured top-1 on the 300 val images (fine-tune / scratch; linear probe for reference), seeds 0, 1, 2
    of the calibration script (same configs, ``train.seed`` varied, run under load on 2 shared cores):
    0.547 / 0.337 (linear 0.480), 0.543 / 0.330 (0.530), 0.533 / 0.290 (0.497): gains +0.21, +0.21, +0.24.
    Chance is 0.333: at this budget the model trained from scratch has not yet learned the task, the
    pre-trained shape features carry over to the new domain. The test asserts fine-tune >= scratch + 0.10
    (seed 0; the test run reproduced 0.547 / 0.337, and gives 0.530 / 0.337 since the router's gradient is kept
    out of clipping). About 50 s CPU time on 1 thread (2 min wall under load).
    """
    pre = load_config(base={
        "model": {**MODEL, "router": {"mode": "topk_st"}},
        "tasks": [{"name": "shapes_flat", "type": "classification", "batch_size": 32, "image_size": 32,
                   "augment": False, "data": _synth("flat", num_train=2000, num_val=64)}],
        "train": {**TRAIN, "steps": 250}})
    train(pre, run_dir=tmp_path / "pre")

    def downstream():
        return load_config(base={
            "model": MODEL,  # used by --from none; --from RUN takes the run's own (the same here)
            "tasks": [{"name": "tex", "type": "classification", "batch_size": 32, "image_size": 32,
                       "augment": False, "data": _synth("textured", num_train=1000, num_val=300)}],
            "train": {**TRAIN, "steps": 60, "lr": 0.05},
            "finetune": {"mode": "full", "route": "copy:shapes_flat"}})

    tuned = finetune(downstream(), from_run=tmp_path / "pre", run_dir=tmp_path / "tuned")["tex/top1"]
    scratch = finetune(downstream(), from_run=None, run_dir=tmp_path / "scratch")["tex/top1"]
    assert tuned >= scratch + MARGIN, f"fine-tuned top-1 {tuned:.3f} vs from scratch {scratch:.3f}"

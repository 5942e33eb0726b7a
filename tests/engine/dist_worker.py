"""Worker for the distributed gradient-equality test (run under torchrun, or alone for the reference).

Builds a tiny two-task run whose tasks have disjoint fixed routes, takes three SIMT steps (clipped by
the norm of the summed gradient), and saves
every parameter's gradient of the first step as seen by the optimizer (after the cross-rank sync) from
rank 0 (with the number of gradient elements the last sync all-reduced), and every rank's parameters after the three steps (``LegoSGD`` updates only the legos used,
on each rank also those only the other rank's task used). Between steps the main rank alone reads
the model (an eval forward and a ``state_dict`` while lego updates are deferred: nothing may change),
then every rank checkpoints (settle) and the main rank alone evaluates, as the trainer does.

``dist_worker.py det OUT MODE[,MODE...]`` runs the detection case instead: a detection task (loss
normalised by its number of positives) beside a classification task, both split over every rank
(``all`` planner), BatchNorm in training mode. Per mode (``bn-sync``: ``dist.sync_bn`` on; ``bn-local``:
off; ``bn-frozen``: BN in eval mode, so only the count normalisation is in play; ``bn-sync-nan``: synced, and
rank 1's first detection loss is NaN: every rank must skip that step without a hang) it takes two steps and
saves the first step's synced gradients (rank 0), and every rank's parameters and per-task BN running
statistics after both steps, before any settle.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from gppf.config import load_config
from gppf.engine.trainer import Run, TrainError, build_run, evaluate, save


def tiny_config(planner: str, out: str, sync_bn: bool = False):
    task = lambda name, domain: {  # noqa: E731
        "name": name, "type": "classification", "batch_size": 8, "image_size": 32, "augment": False,
        "data": {"format": "synthetic", "options": {"domain": domain, "size": 32, "num_train": 64, "num_val": 16}},
    }
    base = {
        "model": {"backbone": "gppf_r18", "legos": 5, "active": 2, "width_mult": 0.125},  # lego 4: unused
        # a: 4x b's batch, so that any task-cost estimate (``dist.task_costs``) gives a two of three ranks
        "tasks": [task("a", "flat") | {"route": [[0, 1]] * 8, "batch_size": 32},
                  task("b", "textured") | {"route": [[2, 3]] * 8}],
        "train": {"steps": 3, "amp": "none", "channels_last": False, "progress": False, "warmup_steps": 0,
                  "checkpoint_every": 0, "grad_clip": 3.0},  # norms ~6: clipping by the synced norm is tested
        "dist": {"planner": planner, "backend": "gloo", "sync_bn": sync_bn,
                 "sync_sparse_below": 1.0},  # every bucket by its written regions
    }
    return load_config(base=base)


def freeze(run: Run, frozen: bool) -> None:
    """Batch statistics are per rank (as in DDP without SyncBN): freeze them if asked."""
    for m in run.model.modules():
        if frozen and isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


def read_alone(run: Run, frozen: bool) -> None:
    """This rank alone reads the model while lego updates are deferred: parameters must not change."""
    assert run.optimizer.pending, "lego 4 is never used: its updates must be deferred"
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.model.eval()
    with torch.no_grad():
        for name, task in run.tasks.items():
            run.model(task.collate([task.val_set[i] for i in range(4)]).images, name)
    run.model.train()
    freeze(run, frozen)
    run.model.state_dict()
    try:
        evaluate(run)
        raise AssertionError("evaluate() must refuse to read deferred lego rows")
    except TrainError:
        pass
    for n, p in run.model.named_parameters():
        assert torch.equal(p, before[n]), f"reading the model changed {n}"


def main(planner: str, out: str, freeze_bn: str, sync_bn: str = "0") -> None:
    torch.set_num_threads(1)
    cfg = tiny_config(planner, out, sync_bn == "1")
    run = build_run(cfg, run_dir=Path(out).parent / f"run_{planner}", resume=False)
    freeze(run, freeze_bn == "1")
    grads: dict[str, torch.Tensor] = {}
    original_step = run.optimizer.step

    def recording_step(*args, **kwargs):
        if not grads:
            for name, p in run.model.named_parameters():
                grads[name] = p.grad.detach().clone()
        return original_step(*args, **kwargs)

    recording_step._with_counter = True  # type: ignore[attr-defined]  (keeps the LR scheduler quiet)
    run.optimizer.step = recording_step  # type: ignore[method-assign]
    for step in range(3):
        run.step_fn(step)
        if step == 0 and run.info.is_main:
            read_alone(run, freeze_bn == "1")
        if step == 1:
            save(run, 2)  # every rank settles, the main rank writes
            if run.info.is_main:
                evaluate(run)
                freeze(run, freeze_bn == "1")
    run.optimizer.flush()
    params = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    save_file(params, f"{out}.params{run.info.rank}")
    if run.info.is_main:
        lazy = sum(p.numel() for p in run.optimizer.lazy_params)
        meta = {"trained_here": ",".join(run.streams), "world": str(run.info.world),
                "synced": str(run.step_fn.grad_sync.synced_elements), "lazy": str(lazy),
                "params": str(sum(p.numel() for p in run.step_fn.grad_sync.params))}
        save_file(grads, out, metadata=meta)


def detection_config(mode: str):
    def task(name: str, kind: str, domain: str, route: list[list[int]]) -> dict:
        head = {"width": 16} if kind == "detection" else {}
        return {"name": name, "type": kind, "batch_size": 8, "image_size": 32, "augment": False, "head": head,
                "route": route,
                "data": {"format": "synthetic", "options": {"domain": domain, "size": 32, "num_train": 32,
                                                            "num_val": 8}}}

    base = {
        "model": {"backbone": "gppf_r18", "legos": 4, "active": 2, "width_mult": 0.125},
        "tasks": [task("det", "detection", "pastel", [[0, 1]] * 8),
                  task("cls", "classification", "flat", [[1, 2]] * 8)],
        "train": {"steps": 2, "amp": "none", "channels_last": False, "progress": False, "warmup_steps": 0,
                  "checkpoint_every": 0, "grad_clip": 0.0, "lr": 0.05, "num_workers": 0},
        "dist": {"planner": "all", "backend": "gloo", "sync_bn": mode.startswith("bn-sync")},
    }
    return load_config(base=base)


def _nan_once(loss_parts: dict, task: str) -> None:
    """Make ``task``'s next loss NaN on this rank (its sums; the counts stay valid)."""
    original, calls = loss_parts[task], []

    def parts(outputs, batch):
        out = original(outputs, batch)
        calls.append(1)
        return {k: (s * float("nan"), c) for k, (s, c) in out.items()} if len(calls) == 1 else out

    loss_parts[task] = parts


def main_detection(out: str, modes: str) -> None:
    """Two steps per mode; writes ``OUT/<mode>.grads`` (rank 0) and ``OUT/<mode>.state<rank>``."""
    torch.set_num_threads(1)
    Path(out).mkdir(parents=True, exist_ok=True)
    for mode in modes.split(","):
        run = build_run(detection_config(mode), run_dir=Path(out) / f"run_{mode}", resume=False)
        freeze(run, mode == "bn-frozen")
        grads: dict[str, torch.Tensor] = {}
        original_step = run.optimizer.step

        def recording_step(*args, **kwargs):
            if not grads:
                grads.update({n: p.grad.detach().clone() for n, p in run.model.named_parameters()})
            return original_step(*args, **kwargs)

        recording_step._with_counter = True  # type: ignore[attr-defined]
        run.optimizer.step = recording_step  # type: ignore[method-assign]
        if mode == "bn-sync-nan" and run.info.rank == 1:  # rank 1's first detection loss is NaN
            _nan_once(run.step_fn.loss_parts, "det")
        results = [run.step_fn(step) for step in range(2)]
        losses = [r.task_losses.get("det", float("nan")) for r in results]
        run.optimizer.flush()
        state = {f"param.{n}": p.detach().clone() for n, p in run.model.named_parameters()}
        state |= {f"buffer.{n}": b.detach().clone() for n, b in run.model.named_buffers() if "task_running" in n}
        save_file(state, f"{out}/{mode}.state{run.info.rank}")
        if run.info.is_main:
            meta = {"world": str(run.info.world), "det_losses": ",".join(map(str, losses)),
                    "skipped": ",".join(str(r.skipped) for r in results),
                    "bad": ",".join("+".join(r.bad_tasks) for r in results)}
            save_file(grads, f"{out}/{mode}.grads", metadata=meta)


if __name__ == "__main__":
    if sys.argv[1] == "det":
        main_detection(*sys.argv[2:4])
    else:
        main(*sys.argv[1:5])

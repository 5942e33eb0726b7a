"""``gppf finetune``: what each mode trains and leaves alone, LLRD, route methods, --from none, eval/resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from gppf.config import ConfigError, RunConfig, load_config
from gppf.engine import checkpoint as ckpt
from gppf.engine import simt
from gppf.lego.layers import rows_used
from gppf.transfer.finetune import finetune, prepare_config, scratch_route
from gppf.transfer.pretrained import load_pretrained
from tests.conftest import train_losses

TRAIN = {"steps": 3, "lr": 0.05, "warmup_steps": 1, "checkpoint_every": 3, "eval_every": 0, "progress": False,
         "amp": "none", "channels_last": False, "deterministic": True, "num_workers": 0}


def downstream(*, finetune_: dict | None = None, train: dict | None = None, task: dict | None = None,
               model: dict | None = None) -> RunConfig:
    """One new task (classification on the ``textured`` domain, not in the pre-training run), 32 px."""
    tc = {"name": "tex", "type": "classification", "batch_size": 8, "image_size": 32, "augment": False,
          "data": {"format": "synthetic", "options": {"domain": "textured", "size": 32, "num_train": 32,
                                                       "num_val": 16, "num_classes": 4}}, **(task or {})}
    base = {"tasks": [tc], "train": {**TRAIN, **(train or {})}, "finetune": finetune_ or {}}
    if model is not None:
        base["model"] = model
    return load_config(base=base)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """``model.*`` tensors of the run's last checkpoint, without the prefix."""
    tensors = ckpt.load_weights(ckpt.find_latest(run_dir) / "model.safetensors")
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def saved_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def _source_row(src: dict[str, torch.Tensor], key: str, tasks: list[str], task: str) -> torch.Tensor:
    return src[key][tasks.index(task)]


def _tuned(source: Path, factory: pytest.TempPathFactory, *, mode: str, route: str) -> Path:
    run = factory.mktemp("ft") / mode
    finetune(downstream(finetune_={"mode": mode, "route": route}), from_run=source, run_dir=run)
    return run


@pytest.fixture(scope="module")
def linear_run(pretrained_run, tmp_path_factory) -> Path:
    return _tuned(pretrained_run, tmp_path_factory, mode="linear", route="copy:classification")


@pytest.fixture(scope="module")
def full_run(pretrained_run, tmp_path_factory) -> Path:
    return _tuned(pretrained_run, tmp_path_factory, mode="full", route="copy:segmentation")


def test_linear_mode_leaves_every_backbone_parameter_and_bn_buffer_bit_identical(pretrained_run, linear_run):
    src = {k: v for k, v in weights(pretrained_run).items() if k.startswith("backbone.")}
    got = weights(linear_run)
    source_tasks = load_pretrained(pretrained_run).model.backbone.tasks
    tasks = saved_config(linear_run)["finetune"]["source_tasks"] + ["tex"]
    assert tasks == source_tasks + ["tex"]
    compared = 0
    for key, value in src.items():
        if key.endswith((".running_mean", ".running_var")):  # scratch buffers: the task's row is copied in
            continue
        if key.endswith(("task_running_mean", "task_running_var")):
            assert torch.equal(got[key][: len(source_tasks)], value), key
            # the new task's statistics: those of the task whose route it copied, never updated (BN in eval)
            assert torch.equal(got[key][-1], _source_row(src, key, source_tasks, "classification")), key
        elif key.startswith("backbone.router."):
            assert torch.equal(got[key][: len(source_tasks)], value), key
        else:
            assert torch.equal(got[key], value), key
        compared += 1
    assert compared > 50
    head_keys = [k for k in got if k.startswith("heads.tex.")]
    assert head_keys and all(not k.startswith("heads.classification") for k in got)


def test_full_mode_trains_the_route_and_leaves_unselected_legos_bit_identical(pretrained_run, full_run):
    src_model = load_pretrained(pretrained_run).model
    route = src_model.backbone.router.routes()["segmentation"]
    assert saved_config(full_run)["tasks"][0]["route"] == route
    src, got = weights(pretrained_run), weights(full_run)
    names = {id(p): n for n, p in src_model.named_parameters()}
    used = rows_used(src_model.backbone.lego_rows(), [torch.tensor(route)])
    changed_used = 0
    for decl in src_model.backbone.lego_rows():
        key = names[id(decl.param)]
        mask = torch.from_numpy(used[decl.param])
        before, after = src[key].movedim(decl.dim, 0), got[key].movedim(decl.dim, 0)
        assert torch.equal(before[~mask], after[~mask]), f"{key}: an unselected lego changed"
        changed_used += int(not torch.equal(before[mask], after[mask]))
    assert changed_used > 10  # the route's legos trained
    assert not torch.equal(src["backbone.conv1.weight"], got["backbone.conv1.weight"])  # shared stem trained
    source_tasks = src_model.backbone.tasks
    bn_key = next(k for k in src if k.endswith("task_running_mean"))
    assert torch.equal(got[bn_key][: len(source_tasks)], src[bn_key])  # source tasks' statistics untouched
    assert not torch.equal(got[bn_key][-1], _source_row(src, bn_key, source_tasks, "segmentation"))  # BN in train


def test_layer_decay_and_head_lr_give_the_intended_group_lrs(pretrained_run, tmp_path):
    from gppf.engine.trainer import build_run

    source = load_pretrained(pretrained_run)
    cfg, _ = prepare_config(downstream(finetune_={"route": "copy:classification", "layer_decay": 0.5,
                                                  "head_lr_mult": 10.0}, train={"lr": 0.1}), source=source)
    run = build_run(cfg, run_dir=tmp_path, resume=False)
    lr_of = {}
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            lr_of[id(p)] = (group["initial_lr"], group["weight_decay"])
    named = dict(run.model.named_parameters())
    assert lr_of[id(named["backbone.conv1.weight"])] == (pytest.approx(0.1 * 0.5**5), 1e-4)  # stem: smallest
    assert lr_of[id(named["backbone.layer1.0.bn2.weight"])][0] == pytest.approx(0.1 * 0.5**4)
    assert lr_of[id(named["backbone.layer4.1.conv2.weight"])] == (pytest.approx(0.1 * 0.5), 0.0)  # lego: no decay
    assert lr_of[id(named["backbone.layer4.0.downsample.0.weight"])] == (pytest.approx(0.05), 1e-4)  # shared
    head = [p for n, p in named.items() if n.startswith("heads.tex.") and p.ndim > 1]
    assert head and all(lr_of[id(p)] == (pytest.approx(1.0), 1e-4) for p in head)
    assert not named["backbone.router.logits_TLN"].requires_grad  # a copied route is fixed
    assert set(lr_of) == {id(p) for p in named.values() if p.requires_grad}


def test_copy_route_and_statistics_come_from_the_named_task(pretrained_run):
    source = load_pretrained(pretrained_run)
    cfg, stats = prepare_config(downstream(finetune_={"route": "copy:keypoints"}), source=source)
    assert cfg.tasks[0].route == source.model.backbone.router.routes()["keypoints"]
    assert cfg.finetune.resolved == {"tex": "copy:keypoints"} and stats == {"tex": "keypoints"}
    assert cfg.model == source.cfg.model


def test_explicit_route_wins_and_is_used(pretrained_run, tmp_path):
    source = load_pretrained(pretrained_run)
    layers = source.model.backbone.router.num_layers
    route = [[1, 3]] * layers
    cfg = downstream(finetune_={"route": "copy:keypoints"}, task={"route": route}, train={"steps": 1})
    prepared, stats = prepare_config(cfg, source=source)
    assert prepared.tasks[0].route == route and prepared.finetune.resolved == {"tex": "explicit"}
    assert stats == {"tex": None}  # mixture of the source tasks' statistics
    finetune(cfg, from_run=pretrained_run, run_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "routes.json").read_text()) == {"tex": route}


def test_mapping_form_routes_each_task(pretrained_run):
    source = load_pretrained(pretrained_run)
    layers = source.model.backbone.router.num_layers
    cfg, _ = prepare_config(downstream(finetune_={"route": {"tex": [[0, 2]] * layers}}), source=source)
    assert cfg.tasks[0].route == [[0, 2]] * layers


def test_learn_route_is_learned_then_frozen_and_saved(pretrained_run, tmp_path):
    cfg = downstream(finetune_={"mode": "linear", "route": "learn", "learn_steps": 2}, train={"steps": 4,
                                                                                              "log_every": 1})
    finetune(cfg, from_run=pretrained_run, run_dir=tmp_path)
    saved = saved_config(tmp_path)
    assert saved["tasks"][0]["route"] is None and saved["finetune"]["resolved"] == {"tex": "learn"}
    assert saved["model"]["router"]["freeze_at"] == 2
    logits = weights(tmp_path)["backbone.router.logits_TLN"]
    src_logits = weights(pretrained_run)["backbone.router.logits_TLN"]
    assert torch.equal(logits[:-1], src_logits)  # only the new task's logits trained
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    router = [r for r in records if r["kind"] == "router"]
    frozen = [r["step"] for r in router if r.get("frozen")]
    assert frozen and min(frozen) == 2
    learned = json.loads((tmp_path / "routes.json").read_text())["tex"]
    frozen_LK = weights(tmp_path)["backbone.router.frozen_TLK"][-1].tolist()
    assert learned == frozen_LK and len(learned) == len(src_logits[0])
    assert learned == [r for r in router if r["step"] == 4][0]["routes"]["tex"]


def test_auto_takes_the_best_ranked_candidate(pretrained_run, monkeypatch, capsys):
    """Through a monkeypatched ranking (the choice rule), then the real ``rank_routes`` (it runs and is used)."""
    from gppf.transfer import select

    source = load_pretrained(pretrained_run)
    routes = source.model.backbone.router.routes()

    def ranking(**kwargs):
        assert kwargs["samples"] == 16 and set(kwargs["candidates"]) == {f"copy:{t}" for t in routes}
        return [select.RouteScore(candidate="copy:reid", route=routes["reid"], score=2.0, method="fake"),
                select.RouteScore(candidate="copy:detection", route=routes["detection"], score=1.0, method="fake")]

    with monkeypatch.context() as m:
        m.setattr(select, "rank_routes", ranking)
        cfg, stats = prepare_config(downstream(finetune_={"route": "auto", "auto_samples": 16}), source=source)
    assert cfg.tasks[0].route == routes["reid"] and stats == {"tex": "reid"}
    assert cfg.finetune.resolved == {"tex": "auto:copy:reid"}
    assert "copy:reid" in capsys.readouterr().out
    cfg, stats = prepare_config(downstream(finetune_={"auto_samples": 16}), source=source)  # auto is the default
    best = cfg.finetune.resolved["tex"].removeprefix("auto:copy:")
    assert best in routes and cfg.tasks[0].route == routes[best] and stats == {"tex": best}
    printed = capsys.readouterr().out
    assert all(f"copy:{t}" in printed for t in routes)


def test_from_none_builds_the_users_architecture_with_a_fixed_route(tmp_path):
    model = {"backbone": "gppf_r18", "legos": 4, "active": 2, "width_mult": 0.125}
    metrics = finetune(downstream(model=model, train={"steps": 2, "checkpoint_every": 2}), from_run=None,
                       run_dir=tmp_path)
    saved = saved_config(tmp_path)
    assert saved["finetune"]["source"] == "none" and saved["finetune"]["source_tasks"] == []
    assert saved["model"]["width_mult"] == 0.125 and saved["model"]["legos"] == 4
    layers = len(saved["tasks"][0]["route"])
    assert saved["tasks"][0]["route"] == scratch_route(layers, 2) == [[0, 1]] * layers
    assert saved["finetune"]["resolved"]["tex"].startswith("scratch")
    assert set(metrics) >= {"tex/top1", "tex/chance/top1"}


def test_resume_gives_the_identical_loss_sequence_and_eval_works(pretrained_run, tmp_path, monkeypatch, capsys):
    from gppf.cli import main

    cfg = downstream(finetune_={"mode": "full", "route": "learn", "learn_steps": 2, "layer_decay": 0.7},
                     train={"steps": 4, "checkpoint_every": 2, "log_every": 1})
    full = finetune(cfg, from_run=pretrained_run, run_dir=tmp_path / "full")
    ref = train_losses(tmp_path / "full")
    assert sorted(ref) == [1, 2, 3, 4]

    original = simt.SIMTStep.__call__

    def dies_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(simt.SIMTStep, "__call__", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, from_run=pretrained_run, run_dir=tmp_path / "killed")
    monkeypatch.setattr(simt.SIMTStep, "__call__", original)
    assert main(["finetune", "--resume", str(tmp_path / "killed")]) == 0
    got = train_losses(tmp_path / "killed")
    for step in (3, 4):
        assert got[step] == ref[step], f"step {step}: {got[step]} != {ref[step]}"
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "killed"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(full)


@pytest.mark.parametrize("finetune_, task, match", [
    ({"route": "copy:nope"}, {}, r"finetune\.route: copy:nope: unknown pre-training task 'nope'"),
    ({"route": "sideways"}, {}, r"finetune\.route: unknown route method 'sideways'"),
    ({"route": {"other": "learn"}}, {}, r"finetune\.route\.other: no downstream task named 'other'"),
    ({"route": {"tex": 3}}, {}, r"finetune\.route\.tex: expected auto, learn"),
    ({}, {"route": [[0, 1]]}, r"tasks\.tex\.route: an explicit route needs \d+ rows"),
    ({}, {"route": "ROUTE_K3"}, r"tasks\.tex\.route\.0: 3 legos, but model\.active is 2 \(k mismatch\)"),
    ({}, {"route": "ROUTE_OUT"}, r"tasks\.tex\.route\.1: lego id 4 out of range \[0, 4\)"),
    ({}, {"route": "ROUTE_REPEAT"}, r"tasks\.tex\.route\.0: repeats a lego"),
    ({}, {"name": "classification", "type": "segmentation"}, r"tasks\.classification\.type: .*rename the task"),
    ({"source": "x"}, {}, r"finetune\.source / source_tasks / resolved are written by"),
], ids=["copy-unknown", "method", "route-key", "route-type", "rows", "k", "range", "repeat", "head-type", "source"])
def test_bad_configs_name_the_key(pretrained_run, finetune_, task, match):
    source = load_pretrained(pretrained_run)
    layers = source.model.backbone.router.num_layers
    routes = {"ROUTE_K3": [[0, 1, 2]] * layers, "ROUTE_OUT": [[0, 1], [0, 4]] + [[0, 1]] * (layers - 2),
              "ROUTE_REPEAT": [[1, 1]] * layers}
    task = {k: routes.get(v, v) if isinstance(v, str) else v for k, v in task.items()}
    with pytest.raises(ConfigError, match=match):
        prepare_config(downstream(finetune_=finetune_, task=task), source=source)


def test_finetune_section_values_are_checked():
    with pytest.raises(ConfigError, match="finetune.layer_decay"):
        downstream(finetune_={"layer_decay": 0.0})
    with pytest.raises(ConfigError, match="finetune.mode"):
        downstream(finetune_={"mode": "partial"})
    with pytest.raises(ConfigError, match="unknown config key 'finetune.head_lr'"):
        downstream(finetune_={"head_lr": 0.1})


def test_cli_finetune_from_a_run(pretrained_run, tmp_path, capsys):
    from gppf.cli import main

    cfg_file = tmp_path / "down.yaml"
    tree = {"tasks": [{"name": "tex", "type": "classification", "batch_size": 8, "image_size": 32,
                       "augment": False, "data": {"format": "synthetic", "options": {
                           "domain": "textured", "size": 32, "num_train": 16, "num_val": 8, "num_classes": 3}}}],
            "train": {**TRAIN, "steps": 1, "checkpoint_every": 1}, "finetune": {"route": "copy:reid"}}
    cfg_file.write_text(yaml.safe_dump(tree))
    assert main(["finetune", "--from", str(pretrained_run), "--config", str(cfg_file), "--out",
                 str(tmp_path / "run"), "finetune.mode=linear"]) == 0
    saved = saved_config(tmp_path / "run")
    assert saved["finetune"]["mode"] == "linear" and saved["finetune"]["resolved"] == {"tex": "copy:reid"}
    assert (tmp_path / "run" / "report" / "index.html").is_file()
    assert json.loads((tmp_path / "run" / "tasks.json").read_text())["tex"]["num_classes"] == 3
    assert main(["finetune", "--config", str(cfg_file)]) == 1
    assert "--from" in capsys.readouterr().err
    assert main(["finetune", "--from", str(tmp_path / "missing"), "--config", str(cfg_file), "--out",
                 str(tmp_path / "run2")]) == 1
    assert "config.yaml" in capsys.readouterr().err


def test_auto_without_an_estimator_is_a_config_error(pretrained_run, monkeypatch):
    from gppf.transfer import select
    from gppf.transfer.transferability import TransferabilityError

    def no_estimator(**kwargs):
        raise TransferabilityError("no transferability estimator for task type 'plugin'")

    monkeypatch.setattr(select, "rank_routes", no_estimator)
    with pytest.raises(ConfigError, match=r"finetune\.route: auto cannot rank routes for task 'tex'.*copy:<task>"):
        prepare_config(downstream(), source=load_pretrained(pretrained_run))


def test_example_config_prepares_from_none():
    from gppf.registry import TASK_TYPES
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "finetune_textured.yaml", task_types=TASK_TYPES.names())
    prepared, _ = prepare_config(cfg, source=None)
    assert prepared.finetune.resolved == {"shapes_textured": "scratch (auto: --from none)"}
    assert prepared.tasks[0].route == [[0, 1]] * 8  # GPPF-R18: 8 routing points

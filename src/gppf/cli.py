"""The ``gppf`` command line: pretrain, finetune, eval, extract, export, bench, data, inspect."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gppf.config import RunConfig, default_config_path, load_config
from gppf.engine.heap import keep_freed_memory

__all__ = ["build_parser", "default_config_path", "main", "parse_args", "set_process_defaults"]


def set_process_defaults() -> None:
    """Process settings of the ``gppf`` command, applied before torch loads; explicit user settings win.

    OpenMP threads that spin while waiting make every op 10-100x slower as soon as another process
    (a DataLoader worker, a second job) shares the cores: measured here, a BatchNorm of 0.5M elements
    took 23-48 ms with spinning threads under contention vs 0.3-1 ms passive.
    Large freed blocks stay in the C allocator's heap for reuse instead of being unmapped and faulted in
    again every step (``gppf.engine.heap.keep_freed_memory``; ``GPPF_KEEP_FREED_MEMORY=0`` or any glibc
    ``MALLOC_*_`` setting leaves the allocator alone).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    keep_freed_memory()


def _load(config: str | None, overrides: list[str]) -> RunConfig:
    from gppf.registry import TASK_TYPES  # names only: no task module is imported

    return load_config(config or default_config_path(), overrides, task_types=TASK_TYPES.names())


def cmd_pretrain(args: argparse.Namespace) -> int:
    from gppf.engine.trainer import can_resume, train

    if args.resume and args.resume != "auto":
        run_dir = Path(args.resume)
        config = args.config or str(run_dir / "config.yaml")
        cfg = _load(config, args.overrides)
    else:
        cfg = _load(args.config, args.overrides)
        run_dir = Path(args.out)
    resume = can_resume(cfg, run_dir) if args.resume == "auto" else bool(args.resume)
    metrics = train(cfg, run_dir=run_dir, resume=resume)
    _print_summary(metrics, run_dir)
    return 0


def _print_summary(metrics: dict[str, float], run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"validation metrics ({run_dir})")
    for col in ("metric", "value", "chance", "margin"):
        table.add_column(col)
    for key, value in metrics.items():
        if "/chance/" in key:
            continue
        task, name = key.split("/", 1)
        chance = metrics.get(f"{task}/chance/{name}")
        margin = "" if chance is None else f"{value - chance:+.4f}"
        table.add_row(key, f"{value:.4f}", "" if chance is None else f"{chance:.4f}", margin)
    Console().print(table)
    print(f"report: {run_dir / 'report' / 'index.html'}")


def cmd_finetune(args: argparse.Namespace) -> int:
    from gppf.config import ConfigError
    from gppf.transfer.finetune import finetune
    from gppf.transfer.pretrained import PretrainedError

    if args.resume:
        run_dir = Path(args.resume)
        cfg = _load(args.config or str(run_dir / "config.yaml"), args.overrides)
        metrics = finetune(cfg, from_run=None, run_dir=run_dir, resume=True)
    else:
        if not args.from_run or not args.config:
            raise ConfigError("gppf finetune needs --from RUN_DIR|none and --config FILE (or --resume RUN_DIR)")
        run_dir = Path(args.out)
        cfg = _load(args.config, args.overrides)
        from_run = None if args.from_run == "none" else Path(args.from_run)
        try:
            metrics = finetune(cfg, from_run=from_run, run_dir=run_dir)
        except PretrainedError as exc:
            raise ConfigError(f"--from {args.from_run}: {exc}") from exc
    _print_summary(metrics, run_dir)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gppf.engine.trainer import build_run, evaluate

    run_dir = Path(args.run)
    cfg = _load(args.config or str(run_dir / "config.yaml"), args.overrides)
    run = build_run(cfg, run_dir=run_dir, resume=True)
    metrics = evaluate(run)
    print(json.dumps(metrics, indent=1) if args.json else "")
    if not args.json:
        _print_summary(metrics, run_dir)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from gppf.transfer.extract_task import extract_task_model
    from gppf.transfer.pretrained import PretrainedError

    try:
        spec = extract_task_model(args.run, task=args.task, out=args.out)
    except PretrainedError as exc:
        print(f"gppf extract: error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    tv = spec.torchvision
    loads = f"backbone loads strictly into torchvision.models.{tv['model']}()" if tv["model"] else tv["reason"]
    print(f"wrote task '{args.task}' ({spec.type}) to {out} + {out.with_suffix('.json')}; {loads}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gppf.transfer.extract_task import open_task_model
    from gppf.transfer.onnx import export_onnx
    from gppf.transfer.pretrained import PretrainedError
    from gppf.transfer.task_model import TaskModelError

    try:
        model = open_task_model(args.source, task=args.task)
        names = export_onnx(model, args.onnx, opset=args.opset, dynamic_batch=args.dynamic_batch,
                            exporter=args.exporter)
    except (PretrainedError, TaskModelError, ImportError) as exc:
        print(f"gppf export: error: {exc}", file=sys.stderr)
        return 1
    size = model.spec.image_size
    print(f"wrote {args.onnx}: images [B, 3, {size}, {size}] -> {', '.join(names)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from gppf.transfer.predict import main_predict

    return main_predict(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from gppf.registry import BACKBONES, READERS, TASK_TYPES

    what = args.what
    registries = {"backbones": BACKBONES, "tasks": TASK_TYPES, "readers": READERS}
    if what in registries:
        print("\n".join(registries[what].names()))
    elif what == "config":
        from gppf.config import to_dict

        print(json.dumps(to_dict(_load(args.config, args.overrides)), indent=1))
    else:
        routes = Path(what) / "routes.json"
        if not routes.is_file():
            print(f"gppf inspect: '{what}' is not backbones|tasks|readers|config or a run directory", file=sys.stderr)
            return 2
        print(routes.read_text())
    return 0


BENCHES = ("lego", "simt", "routing", "transfer", "data", "dist", "gpu")
"""``gppf bench <which>`` runs ``gppf.bench.<which>.main_<which>(argv)``."""


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"gppf.bench.{args.which}")
    return int(getattr(module, f"main_{args.which}")(args.rest))


def cmd_route(args: argparse.Namespace) -> int:
    from gppf.transfer.pretrained import PretrainedError
    from gppf.transfer.route import print_report, route_report
    from gppf.transfer.transferability import TransferabilityError

    cfg = _load(args.config, args.overrides)
    try:
        report = route_report(run_dir=args.source, cfg=cfg, samples=args.samples, seed=args.seed,
                              device=args.device, score=args.score)
    except (PretrainedError, TransferabilityError) as exc:
        print(f"gppf route: error: {exc}", file=sys.stderr)
        return 1
    print_report(report, as_json=args.json)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.action == "check":
        from gppf.data.check import main_check

        return main_check(args.config, args.overrides)
    from gppf.data.paste import main_paste

    return main_paste(args.rest)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (default: the built-in recipe)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")


def _add_transfer_parsers(sub: argparse._SubParsersAction) -> None:
    """extract, predict, export, finetune, route."""
    p = sub.add_parser("extract", help="extract one task (backbone route + head) as a plain dense model + JSON sidecar")
    p.add_argument("run", help="run directory")
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_extract)
    p = sub.add_parser("predict", help="run one task of a run directory or extracted model on image files")
    p.add_argument("source", metavar="RUN_DIR|FILE", help="run directory or .safetensors of `gppf extract`")
    p.add_argument("--task", required=True, help="task name (see the run's tasks.json)")
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_DIR", help="image files and/or directories (recursive)")
    p.add_argument("--out", default="predictions", help="output directory (default: predictions)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="keep detections / mark multilabel positives / draw keypoints with score >= T")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images (default 0)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("export", help="export a task model (run dir or extracted file) to ONNX")
    p.add_argument("source", help="run directory or extracted FILE.safetensors")
    p.add_argument("--task", help="task name (required for a run directory)")
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension (default: batch 1)")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="torch.export-based (default) or the legacy, faster TorchScript tracer")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("finetune", help="fine-tune downstream tasks from a pre-trained run (or --from none)")
    _add_config_args(p)
    p.add_argument("--from", dest="from_run", metavar="RUN_DIR|none", help="pre-trained run, or none (scratch)")
    p.add_argument("--out", default="runs/finetune", help="run directory")
    p.add_argument("--resume", metavar="DIR", help="continue the fine-tuning run in DIR from its last checkpoint")
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("route", help="rank candidate routes of a config's downstream tasks (no training)")
    p.add_argument("--from", dest="source", required=True, metavar="RUN_DIR", help="pre-trained run directory")
    p.add_argument("--config", required=True, help="config listing the downstream tasks")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    p.add_argument("--json", action="store_true")
    p.add_argument("--samples", type=int, default=256, help="train samples embedded per candidate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--score", choices=["logme", "gbc"], help="override the task type's estimator score")
    p.set_defaults(func=cmd_route)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gppf", description="General perception pre-training with lego backbones.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="SIMT multi-task pre-training (default: built-in recipe)")
    _add_config_args(p)
    p.add_argument("--out", default="runs/pretrain", help="run directory")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint; 'auto': "
                   "continue --out if it holds a checkpoint of this config, else start it (requeued jobs)")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("eval", help="evaluate a run's last checkpoint on every task's validation split")
    p.add_argument("run", help="run directory")
    _add_config_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
    _add_transfer_parsers(sub)
    p = sub.add_parser("bench", help="benchmarks printing JSON: lego | simt | routing | transfer | data | dist | gpu")
    p.add_argument("which", choices=BENCHES)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (--json, --quick, ...)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("data", help="data tools: check <config> | pack <config> --out DIR | paste ...")
    p.add_argument("action", choices=["check", "pack", "paste"])
    p.add_argument("config", nargs="?", help="config to check (check)")
    p.add_argument("overrides", nargs="*", default=[])
    p.set_defaults(func=cmd_data, rest=[])
    p = sub.add_parser("inspect", help="list backbones|tasks|readers, show config, or a run's routes")
    p.add_argument("what")
    _add_config_args(p)
    p.set_defaults(func=cmd_inspect)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides also follow options (``gppf eval RUN --json a.b=1``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["data", "pack"]:
        from gppf.data.pack import main_pack

        return main_pack(argv[2:])
    if argv[:2] == ["data", "paste"]:
        from gppf.data.paste import main_paste

        return main_paste(argv[2:])
    args = parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as exc:  # clear one-line errors for user mistakes
        from gppf.config import ConfigError
        from gppf.data.base import DataError
        from gppf.registry import RegistryError

        known: tuple[type[BaseException], ...] = (ConfigError, DataError, RegistryError, FileNotFoundError)
        try:
            from gppf.engine.checkpoint import CheckpointError
            from gppf.engine.trainer import TrainError

            known += (TrainError, CheckpointError)
        except ImportError:
            pass
        if isinstance(exc, known):
            print(f"gppf {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

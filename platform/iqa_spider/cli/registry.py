"""`iqa-spider promote | rollback | models`: the registry's command lines (docs/registry.md)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from iqa_spider.entrypoint import setup_logging
from iqa_spider.registry.config import PromoteConfig
from iqa_spider.registry.listing import format_versions, list_versions
from iqa_spider.registry.promotion import PromotionError, main, rollback


def _default_gate_file() -> str:
    here = os.path.join("configs", "gate.yaml")
    if os.path.isfile(here):
        return here
    return os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "gate.yaml")


def promote_main(argv: Sequence[str] | None = None) -> int:
    """`iqa-spider promote --candidate N --eval-data URI [--gate FILE] [key=value ...]`."""
    p = argparse.ArgumentParser(prog="iqa-spider promote", description="gated promotion to the champion alias")
    p.add_argument("--candidate", required=True, help="registered model version to promote")
    p.add_argument("--eval-data", required=True, help="evaluation dataset URI (the same data for both models)")
    p.add_argument("--gate", default=None, help="gate file (default configs/gate.yaml)")
    p.add_argument("--model", default=None, help="registered model name (default: the gate file's)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides of the gate file, e.g. infer.batch_size=4")
    args = p.parse_args(argv)
    overrides = [f"candidate={args.candidate}", f"data.uri={args.eval_data}", *args.overrides]
    if args.model:
        overrides.append(f"registered_model={args.model}")
    return main(["--config", args.gate or _default_gate_file(), *overrides])


def rollback_main(argv: Sequence[str] | None = None) -> int:
    """`iqa-spider rollback [--model NAME]`."""

    p = argparse.ArgumentParser(prog="iqa-spider rollback", description="champion <- previous-champion")
    p.add_argument("--model", default="iqa-spider", help="registered model name")
    p.add_argument("--experiment", default="iqa-spider-promotion", help="MLflow experiment of the record")
    args = p.parse_args(argv)
    setup_logging()
    cfg = PromoteConfig(registered_model=args.model)
    cfg.tracking.experiment = args.experiment
    try:
        d = rollback(args.model, gate=cfg)
    except PromotionError as exc:
        print(f"rollback: {exc}", file=sys.stderr)
        return 1
    print(f"{args.model}: champion {d['champion_before']} -> {d['champion_after']}; "
          f"previous-champion removed; mlflow run {d['run_id']}")
    return 0


def models_main(argv: Sequence[str] | None = None) -> int:
    """`iqa-spider models list [--model NAME] [--json]`."""
    p = argparse.ArgumentParser(prog="iqa-spider models", description="the model registry")
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="versions, aliases, key metrics and tags")
    ls.add_argument("--model", default="iqa-spider", help="registered model name")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        rows = list_versions(args.model)
    except MlflowException as exc:
        print(f"models list: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(rows, indent=2, default=str) if args.json else format_versions(rows, args.model))
    return 0


__all__ = ["promote_main", "rollback_main", "models_main"]

"""`iqa-spider`: one command line for every part of the platform.

Job subcommands take exactly what jobs/*.py take (`--config FILE [key=value ...]`) and run
the same code, so `iqa-spider X` and `ray job submit -- python jobs/X.py` never drift apart.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from iqa_spider.cli.data import add_data_commands
from iqa_spider.config import ConfigError, config_to_yaml
from iqa_spider.config.schemas import MODEL_FAMILIES, load_job_config
from iqa_spider.entrypoint import CONFIG_ERROR_EXIT
from iqa_spider.model.tiny import SIZES, family_for, init_tiny


def _config_show(args: argparse.Namespace) -> int:
    try:
        cfg = load_job_config(args.config, args.overrides)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return CONFIG_ERROR_EXIT
    print(config_to_yaml(cfg), end="")
    return 0


def _model_init_tiny(args: argparse.Namespace) -> int:
    family = family_for(args.size, args.family)
    out = init_tiny(family, args.out, seed=args.seed, size=args.size)
    print(f"{args.size} {family} model written to {out}")
    return 0


# Job subcommands: `iqa-spider NAME --config FILE [overrides]` runs the same main as jobs/NAME.py.
JOB_COMMANDS = {
    "demo": ("iqa_spider.demo:main", "the main job end to end on embedded defaults"),
    "annotate": ("iqa_spider.annotate.pipeline:main", "pristine images -> four-task dataset (Ray Data)"),
    "train": ("iqa_spider.train.job:main", "stage-1 LoRA fine-tuning, DeepSpeed ZeRO on Ray Train"),
    "evaluate": ("iqa_spider.evaluate.job:main", "model (+ segmenter) metrics on a test split: JSON, HTML, MLflow"),
    "score": ("iqa_spider.score.job:main", "image collection (local or S3) -> scores, points, masks as Parquet (Ray Data)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iqa-spider", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print the resolved config of any job file")
    show.add_argument("--config", required=True)
    show.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.lr=1e-4")
    show.set_defaults(func=_config_show)

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="action", required=True)
    tiny = model.add_parser("init-tiny", help="write the project's tiny random-initialised Qwen-VL")
    tiny.add_argument("--family", choices=MODEL_FAMILIES, default=None,
                      help="model class (default: the size's own, tiny qwen2_5_vl, small qwen3_vl)")
    tiny.add_argument("--out", required=True, help="output directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--size", choices=SIZES, default="tiny",
                      help="tiny: fast tests (~0.2 M parameters); small: learns on 2 cores (~7 M)")
    tiny.set_defaults(func=_model_init_tiny)

    add_data_commands(sub)

    for name, (target, help_text) in JOB_COMMANDS.items():
        job = sub.add_parser(name, help=f"{help_text} (--config FILE [key=value ...])", add_help=False)
        job.set_defaults(func=None, job_main=target)
    # Ray job submission (iqa_spider.cli.submit parses its own arguments, like the job commands).
    for name, help_text in (("submit", "submit jobs/NAME.py to a Ray cluster (see docs/jobs.md)"),
                            ("jobs", "status|logs|stop|list of submitted jobs")):
        sub.add_parser(name, help=help_text, add_help=False).set_defaults(
            func=None, job_main=f"iqa_spider.cli.submit:{name}_main")
    # Registry (iqa_spider.cli.registry parses its own arguments; see docs/registry.md).
    for name, help_text in (("models", "models list: registered versions, aliases, key metrics, tags"),
                            ("promote", "gated promotion: --candidate N --eval-data URI [--gate FILE]"),
                            ("rollback", "champion <- previous-champion [--model NAME]")):
        sub.add_parser(name, help=help_text, add_help=False).set_defaults(
            func=None, job_main=f"iqa_spider.cli.registry:{name}_main")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "job_main", None):
        module, func = args.job_main.split(":")
        import importlib

        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

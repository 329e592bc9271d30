"""The one way every job starts: `--config FILE [key=value ...]` -> typed config -> run.

jobs/*.py and the `iqa-spider <job>` subcommands both call `run_job`, so a bad config
fails identically everywhere: one line on stderr naming the key and the file, exit code 2,
before anything expensive starts.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from iqa_spider.config import ConfigError, load_config

T = TypeVar("T")
CONFIG_ERROR_EXIT = 2


def parse_config_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    """`--config FILE [key=value ...]`: the command line every job takes (jobs/*.py and the job
    subcommands of `iqa-spider`, which pass it their remaining arguments)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (defaults embedded if omitted)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.lr=1e-4")
    return parser.parse_args(argv)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def run_job(schema: type[T], runner: Callable[[T], object], argv: Sequence[str] | None = None,
            description: str = "") -> int:
    args = parse_config_args(argv, description)
    try:
        cfg = load_config(schema, args.config, args.overrides)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return CONFIG_ERROR_EXIT
    setup_logging()
    try:
        runner(cfg)
    except ConfigError as exc:  # found by a job's own pre-flight checks (data, paths)
        print(str(exc), file=sys.stderr)
        return CONFIG_ERROR_EXIT
    return 0

"""`make demo`: the main job end to end on embedded defaults.

For now it builds the tiny model and reports it; each capability extends this straight
path (annotate -> train -> evaluate -> promote -> score -> report) as it lands.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

from iqa_spider.config.schemas import DemoConfig
from iqa_spider.entrypoint import run_job

log = logging.getLogger(__name__)


def run_demo(cfg: DemoConfig) -> dict[str, str]:
    from iqa_spider.model.tiny import init_tiny

    workdir = os.path.abspath(cfg.workdir)
    os.makedirs(workdir, exist_ok=True)
    outputs: dict[str, str] = {}

    log.info("step 1/1: building the tiny %s model (seed %d)", cfg.tiny.family, cfg.tiny.seed)
    outputs["tiny model"] = str(init_tiny(cfg.tiny.family, os.path.join(workdir, "tiny_model"), seed=cfg.tiny.seed))

    print("\nIQA-Spider demo finished. Outputs:")
    for name, where in outputs.items():
        print(f"  {name:<12} {where}")
    return outputs


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(DemoConfig, run_demo, argv, description=__doc__.splitlines()[0])

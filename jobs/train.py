"""Entrypoint: stage-1 training (`python jobs/train.py --config configs/train/tiny_cpu.yaml data.uri=... output.uri=...`)."""
import sys

from iqa_spider.train.job import main

if __name__ == "__main__":
    sys.exit(main())

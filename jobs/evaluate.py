"""Entrypoint: the evaluation job (`python jobs/evaluate.py --config configs/evaluate.yaml model.path=... data.uri=...`)."""
import sys

from iqa_spider.evaluate.job import main

if __name__ == "__main__":
    sys.exit(main())

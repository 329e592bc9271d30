"""Entrypoint: the batch scoring job (`python jobs/score.py --config configs/score.yaml input.uri=... output.uri=...`)."""
import sys

from iqa_spider.score.job import main

if __name__ == "__main__":
    sys.exit(main())

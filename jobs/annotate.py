"""Entrypoint: the annotation job (`python jobs/annotate.py --config configs/annotate.yaml input.uri=... output.uri=...`)."""
import sys

from iqa_spider.annotate.pipeline import main

if __name__ == "__main__":
    sys.exit(main())

"""Entrypoint: gated promotion (`python jobs/promote.py --config configs/gate.yaml candidate=3 data.uri=...`).

Exit 0: promoted; 1: refused by the gate; 2: bad config."""
import sys

from iqa_spider.registry.promotion import main

if __name__ == "__main__":
    sys.exit(main())

"""Entrypoint: the main job end to end (`python jobs/demo.py --config configs/demo.yaml`)."""
import sys

from iqa_spider.demo import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m iqa_spider.cli` is `iqa-spider`."""
import sys

from iqa_spider.cli.main import main

sys.exit(main())

"""Every command line of the platform: `iqa-spider` and its subcommands (`main`), the registry's
(`registry`) and job submission's (`submit`). The jobs' own `--config FILE [key=value ...]`
parsing is `iqa_spider.entrypoint`'s, shared with jobs/*.py."""
from iqa_spider.cli.main import main

__all__ = ["main"]

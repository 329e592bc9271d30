"""Batch scoring: image collections (local or S3) -> result-contract Parquet, with Ray Data.

- :mod:`.config`: ``ScoreConfig`` (job kind ``score``);
- :mod:`.listing`: which keys are inputs, which are already scored, and the input blocks;
- :mod:`.stages`: the Ray Data stages (read + decode tasks, scoring actors, writers);
- :mod:`.report`: the run summary, histogram and per-image artifacts;
- :mod:`.job`: ``run_score`` (the straight path) and ``main``.

Importing this package or :mod:`.config` never imports Ray or torch.
"""

"""The Ray Serve application of IQA-Spider (thin: the logic is in iqa_spider.serve).

    serve run serving.app:build_app [key=value ...]
    serve run serving/config.yaml          # serve deploy serving/config.yaml; RayService serveConfigV2
"""
from iqa_spider.serve.app import build_app

__all__ = ["build_app"]

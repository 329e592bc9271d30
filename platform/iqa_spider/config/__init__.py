"""Typed configuration: OmegaConf YAML + dotlist overrides -> dataclasses (see loader.py)."""
from iqa_spider.config.loader import ConfigError, config_to_yaml, load_config

__all__ = ["ConfigError", "config_to_yaml", "load_config"]

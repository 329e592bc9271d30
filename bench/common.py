"""What every benchmark script shares: where the repo is, and how figures are recorded.

Each run appends a dated section to BENCHMARKS.md with the exact command, the machine and
the package versions, so a figure can always be traced back to what produced it.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import os
import platform as std_platform  # the standard library's, not the source root
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# No downloads, no telemetry, no tokenizer fork warnings. Set on import, before Ray or
# transformers are: every benchmark imports this module first.
RUN_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_USAGE_STATS_ENABLED": "0"}
for _name, _value in RUN_ENV.items():
    os.environ.setdefault(_name, _value)
BENCHMARKS = REPO / "BENCHMARKS.md"
PACKAGES = ("iqa-spider", "torch", "transformers", "peft", "deepspeed", "ray", "numpy", "pillow")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return std_platform.processor() or "unknown"


def machine() -> str:
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except ImportError:
        pass
    return f"{os.cpu_count()} cores ({cpu_model()}){gpu}"


def versions() -> str:
    out = [f"python {std_platform.python_version()}"]
    for pkg in PACKAGES:
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


def command() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def record(title: str, body: str, notes: str = "") -> None:
    """Append a dated section to BENCHMARKS.md."""
    section = (f"\n## {title} ({dt.date.today().isoformat()})\n\n"
               f"Command: `{command()}`  \nMachine: {machine()}  \nVersions: {versions()}\n\n{body}\n")
    if notes:
        section += f"\n{notes}\n"
    if not BENCHMARKS.exists():
        BENCHMARKS.write_text("# Benchmarks\n\nEvery figure below was made by the command printed with it; "
                              "ratios compare against a baseline run in the same script.\n")
    with BENCHMARKS.open("a") as f:
        f.write(section)
    print(f"recorded in {BENCHMARKS}")

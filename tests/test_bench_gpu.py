"""bench/gpu.py runs only where a GPU is lent, rarely and on a time budget: a break in it must
show here first. Its --toy mode runs the same code path (predictor vs naive loop, FLOP
ceiling, one optimizer step of the LoRA ZeRO-3 recipe) at tiny size on the CPU."""
import re
import subprocess
import sys

import pytest

from conftest import REPO


def test_gpu_benchmark_code_path_runs_end_to_end_on_cpu(tmp_path):
    md = tmp_path / "gpu.md"
    before = (REPO / "BENCHMARKS.md").read_text()
    out = subprocess.run([sys.executable, "bench/gpu.py", "--toy", "--md", str(md), "--record"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = md.read_text()
    assert "Not measured" not in text, text
    assert "### Inference" in text and "### Training" in text
    assert "fraction of FLOP ceiling" in text and "| MFU |" in text
    assert "DeepSpeed ZeRO-3" in text  # not the plain-torch fallback
    assert "Paths agree on the naive subset" in text
    # toy figures are never recorded: BENCHMARKS.md holds absolute figures from GPUs only
    assert (REPO / "BENCHMARKS.md").read_text() == before and "not recorded" in out.stderr


# What bench/gpu.py imports, and what the device's image lacks (bench/README.md: the wheels it
# carries are transformers, peft, omegaconf, deepspeed and a few more, nothing of these).
GPU_BENCH_MODULES = ["iqa_spider.model.tiny", "iqa_spider.model.tokenizer", "iqa_spider.infer.config",
                     "iqa_spider.infer.engine", "iqa_spider.infer.predictor", "iqa_spider.train.preprocess",
                     "iqa_spider.config.loader", "iqa_spider.config.schemas", "iqa_spider.train.loop",
                     "iqa_spider.train.recipe"]
NOT_ON_THE_DEVICE = ["pycocotools", "mlflow", "ray", "s3fs", "fastapi"]


def test_gpu_benchmark_modules_import_without_what_the_device_lacks():
    """The --toy run above has every package; the device has not. An import moved to a module's
    top must not make bench/gpu.py fail there before it measures anything."""
    code = f"""
import importlib, importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {NOT_ON_THE_DEVICE!r}:
            raise ImportError("not on the device: " + name)
sys.meta_path.insert(0, Absent())
for m in {GPU_BENCH_MODULES!r}:
    importlib.import_module(m)
print("imported")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-2000:]


def test_sizing_ceilings_come_from_the_7b_shapes(tmp_path):
    """bench/sizing.py turns the FLOP model into the ceilings docs/scoring.md quotes, from a 7B
    built on the meta device: its shapes are checked against the release, its table against
    the definitions."""
    md = tmp_path / "sizing.md"
    out = subprocess.run([sys.executable, "bench/sizing.py", "--md", str(md)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = md.read_text()
    assert "(8.29 B parameters" in text  # Qwen2.5-VL-7B-Instruct's count
    assert "161 M LoRA parameters" in text  # r 64 on the 7 linear layers of 28 blocks
    rows = [line.split("|")[1:-1] for line in text.splitlines() if re.match(r"\| \d+x\d+ \|", line)]
    table = {(r[0].strip(), r[2].strip()): [float(x) for x in (r[3], r[4], r[5], r[6])] for r in rows}
    assert len(table) == 6
    for side in ("448x448", "1024x1024"):
        score, ground, desc = (table[(side, m)] for m in ("score", "score + grounding",
                                                          "score + grounding + global description"))
        assert score[0] < ground[0] < desc[0]  # more work per image, more FLOPs
        for tflop, flop_ips, roof_ips, gpus in (score, ground, desc):
            assert flop_ips == pytest.approx(989 / tflop, abs=0.6)  # peak / FLOPs (printed rounded)
            assert roof_ips <= flop_ips + 1  # the roofline only adds bounds
            assert gpus == pytest.approx(1e6 / 3600 / roof_ips, rel=0.05)
    assert table[("1024x1024", "score")][0] > 4 * table[("448x448", "score")][0]  # ~5x the image tokens
    assert "decoding 8 answers together" in text  # configs/score.yaml's infer.batch_size

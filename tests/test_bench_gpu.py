"""bench/gpu.py runs only where a GPU is lent, rarely and on a time budget: a break in it must
show here first. Its --toy mode runs the same code path (predictor vs naive loop, FLOP
ceiling, one optimizer step of the LoRA ZeRO-3 recipe) at tiny size on the CPU."""
import subprocess
import sys

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

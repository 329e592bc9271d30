"""The project's tiny random SAM: real classes, an ordinary HF directory, a mask per prompt."""
import numpy as np
import torch
from skimage import data

from iqa_spider.model.tiny_sam import IMAGE_SIZE


def test_directory_loads_with_the_real_classes(tiny_sam_dir):
    from transformers import SamImageProcessor, SamModel, SamProcessor

    model = SamModel.from_pretrained(tiny_sam_dir)
    processor = SamProcessor.from_pretrained(tiny_sam_dir)
    assert isinstance(processor.image_processor, SamImageProcessor)
    assert processor.image_processor.size["longest_edge"] == IMAGE_SIZE
    assert model.config.vision_config.image_size == IMAGE_SIZE
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_point_prompt_gives_a_mask_of_the_image_size(tiny_sam_dir):
    from transformers import SamModel, SamProcessor

    model = SamModel.from_pretrained(tiny_sam_dir).eval()
    processor = SamProcessor.from_pretrained(tiny_sam_dir)
    image = data.astronaut()  # 512 x 512 RGB, bundled with scikit-image
    h, w = image.shape[:2]
    inputs = processor(images=image, input_points=[[[300, 200]]], return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
    with torch.inference_mode():
        out = model(**inputs)
    masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    assert masks[0].shape == (1, 3, h, w) and masks[0].dtype == torch.bool  # 3 multimask outputs
    assert out.iou_scores.shape == (1, 1, 3)


def test_mask_generation_pipeline_loads_it(tiny_sam_dir):
    from PIL import Image
    from transformers import pipeline

    generator = pipeline("mask-generation", model=str(tiny_sam_dir), device="cpu")
    image = Image.fromarray(data.astronaut()).resize((96, 64))
    result = generator(image, points_per_batch=16, points_per_crop=2, pred_iou_thresh=0.0,
                       stability_score_thresh=0.0, crops_nms_thresh=1.0)
    assert len(result["masks"]) == 2 * 2 * 3
    assert all(tuple(np.asarray(m).shape) == (64, 96) for m in result["masks"])


# SAM ties these two positional embeddings; which name of the pair save_pretrained writes can
# differ between processes, so files are compared with both names filled in.
TIED = ("prompt_encoder.shared_embedding.positional_embedding", "shared_image_embedding.positional_embedding")


def saved_weights(path) -> dict:
    from safetensors.numpy import load_file

    weights = load_file(str(path / "model.safetensors"))
    present = [k for k in TIED if k in weights]
    assert present, "neither tied embedding was saved"
    for k in TIED:
        weights.setdefault(k, weights[present[0]])
    return weights


def test_same_seed_same_weights(tmp_path):
    """Across processes, as the demo and the tests use it: each build runs in a fresh
    interpreter, so nothing a long test session did to global state can blur the answer."""
    import subprocess
    import sys

    def build(*jobs: tuple[str, int]) -> None:
        code = ("import sys; from iqa_spider.model.tiny_sam import init_tiny_sam\n"
                "for out, seed in zip(sys.argv[1::2], sys.argv[2::2]): init_tiny_sam(out, int(seed))")
        args = [str(x) for job in jobs for x in (tmp_path / job[0], job[1])]
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]

    build(("a", 0), ("other", 1))
    build(("again", 0))
    a, b, c = (saved_weights(tmp_path / name) for name in ("a", "again", "other"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, differ
    assert any(not np.array_equal(a[k], c[k]) for k in a)

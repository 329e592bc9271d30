"""The tiny-model factory: real Qwen-VL classes, loadable through the Auto classes, with a
locally trained tokenizer in which every IQA word is one token; deterministic for a seed."""
from __future__ import annotations

import json
import logging
import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from skimage import data as skdata  # noqa: E402

from iqa_spider import vocab as V  # noqa: E402
from iqa_spider.model.tiny import FAMILIES, MAX_PIXELS, MIN_PIXELS, count_parameters, init_tiny  # noqa: E402
from iqa_spider.model.tokenizer import template_corpus, word_token_id  # noqa: E402

MODEL_CLASSES = {
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}
TOKEN_ID_KEYS = (
    "bos_token_id", "eos_token_id", "pad_token_id", "image_token_id", "video_token_id",
    "vision_start_token_id", "vision_end_token_id",
)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """Each family built once and loaded through the Auto classes, recording warnings."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family = request.param
    path = init_tiny(family, tmp_path_factory.mktemp(family) / "model", seed=0)
    handler = _Records()
    tlog = logging.getLogger("transformers")  # transformers does not propagate to root
    tlog.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = AutoModelForImageTextToText.from_pretrained(path)
            processor = AutoProcessor.from_pretrained(path)
    finally:
        tlog.removeHandler(handler)
    model.eval()
    messages = handler.messages + [str(w.message) for w in caught]
    return {"family": family, "path": path, "model": model, "processor": processor, "load_messages": messages}


def _image(size=(200, 150)) -> Image.Image:
    return Image.fromarray(skdata.chelsea()).resize(size, Image.BICUBIC)


def _inputs(processor, image, question=V.SCORE_QUESTION):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return text, processor(text=[text], images=[image], return_tensors="pt")


def test_directory_is_an_ordinary_checkpoint(tiny):
    files = set(os.listdir(tiny["path"]))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "chat_template.jinja"):
        assert name in files
    assert {"processor_config.json", "preprocessor_config.json"} & files
    model_cls, proc_cls, video_cls = MODEL_CLASSES[tiny["family"]]
    assert type(tiny["model"]).__name__ == model_cls
    assert type(tiny["processor"]).__name__ == proc_cls
    assert type(tiny["processor"].image_processor).__name__ == "Qwen2VLImageProcessor"
    assert type(tiny["processor"].video_processor).__name__ == video_cls
    assert type(tiny["processor"].tokenizer).__name__ == "Qwen2Tokenizer"
    assert 100_000 <= count_parameters(tiny["model"]) <= 1_000_000


def test_loads_without_token_id_warnings(tiny):
    bad = [m for m in tiny["load_messages"] if "vocabulary" in m or "token_id" in m]
    assert not bad, bad


def test_token_ids_consistent(tiny):
    cfg = json.loads((tiny["path"] / "config.json").read_text())
    tok = tiny["processor"].tokenizer
    vocab_size = cfg["text_config"]["vocab_size"]
    assert vocab_size == len(tok)
    for key in TOKEN_ID_KEYS:
        assert cfg[key] == cfg["text_config"][key], key
        assert 0 <= cfg[key] < vocab_size
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["video_token_id"] == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg["vision_end_token_id"] == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert cfg["pad_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>") == tok.pad_token_id


def test_chat_template(tiny):
    text, _ = _inputs(tiny["processor"], _image())
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + V.SCORE_QUESTION + "<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_forward_and_generate_on_a_real_image(tiny):
    model, processor = tiny["model"], tiny["processor"]
    _, inputs = _inputs(processor, _image())
    image_token_id = model.config.image_token_id
    n_image_tokens = int((inputs["input_ids"] == image_token_id).sum())
    assert n_image_tokens == int(inputs["image_grid_thw"].prod()) // processor.image_processor.merge_size**2
    with torch.no_grad():
        out = model(**inputs)
    seq = inputs["input_ids"].shape[1]
    assert out.logits.shape == (1, seq, model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5)
    assert generated.shape[0] == 1 and generated.shape[1] > seq
    assert torch.equal(generated[:, :seq], inputs["input_ids"])


@pytest.mark.parametrize("size", [(512, 512), (451, 300), (64, 48), (120, 400)])
def test_images_are_kept_small(tiny, size):
    processor = tiny["processor"]
    _, inputs = _inputs(processor, _image(size))
    t, h, w = (int(x) for x in inputs["image_grid_thw"][0])
    patch = processor.image_processor.patch_size
    area = h * w * patch * patch
    factor2 = (patch * processor.image_processor.merge_size) ** 2
    assert t == 1
    assert MIN_PIXELS - factor2 < area <= MAX_PIXELS, (size, h * patch, w * patch)


def test_every_iqa_word_is_one_token(tiny):
    tok = tiny["processor"].tokenizer
    for word in V.single_token_words():
        for form in (word, " " + word):
            ids = tok.encode(form, add_special_tokens=False)
            assert len(ids) == 1, (form, tok.convert_ids_to_tokens(ids))
            assert tok.decode(ids) == form
            assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(ids[0])) == ids[0]
        # the token the model emits after "... is" is the one word_token_id names
        ids = tok.encode(f"{V.SCORE_ANSWER_PREFIX} {word}", add_special_tokens=False)
        assert word_token_id(tok, word) == ids[-1]
        assert tok.decode([ids[-1]]) == " " + word
    level_ids = [word_token_id(tok, w) for w in V.LEVEL_WORDS]
    assert len(set(level_ids)) == len(V.LEVEL_WORDS)


def test_word_token_id_warns_once_for_split_words(tiny):
    tok = tiny["processor"].tokenizer
    word = "zygomorphicity"  # not in the corpus: several tokens
    pieces = tok.encode(" " + word, add_special_tokens=False)
    assert len(pieces) > 1
    with pytest.warns(UserWarning, match="first sub-token"):
        assert word_token_id(tok, word) == pieces[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert word_token_id(tok, word) == pieces[0]


def test_deterministic_for_a_seed(tiny, tmp_path):
    family, first = tiny["family"], tiny["path"]
    again = init_tiny(family, tmp_path / "again", seed=0)
    other = init_tiny(family, tmp_path / "other", seed=1)
    weights = (first / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    assert (other / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()


def test_init_tiny_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    init_tiny("qwen2_5_vl", tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_family_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        init_tiny("llava", tmp_path / "m")


def test_template_corpus_covers_the_vocabulary():
    corpus = template_corpus()
    assert len(corpus) >= 2000
    assert corpus == template_corpus()
    text = "\n".join(corpus)
    assert V.SCORE_QUESTION in text
    assert V.SCORE_ANSWER_PREFIX in text
    words = set(text.replace(",", " ").replace(".", " ").replace("?", " ").lower().split())
    needed = set(V.single_token_words()) | set(V.SEVERITY_WORDS.values()) | set(V.POSITION_WORDS)
    assert needed <= words, needed - words
    for sentence in (
        "Assess the quality of the image with a detailed explanation.",
        "Which is the most degraded region in the image?",
    ):
        assert sentence in corpus
    assert any(s.startswith("Which region shows the most severe ") for s in corpus)
    assert any(s.startswith("What distortions affect the ") for s in corpus)
    assert any(s.startswith("The most degraded region is the ") for s in corpus)
    assert any("Overall, the quality of the image is " in s for s in corpus)


@pytest.mark.parametrize("family", FAMILIES)
def test_small_preset_loads_through_the_auto_classes_and_runs(family, tmp_path):
    """`--size small`: the same real classes at a size that learns on 2 cores (3..20 M params),
    with the model's own head initialiser (full fine-tuning trains the head)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from iqa_spider.model.tiny import PRESETS

    path = init_tiny(family, tmp_path / "small", seed=0, size="small")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == MODEL_CLASSES[family][0]
    assert 3_000_000 <= count_parameters(model) <= 20_000_000
    p = PRESETS["small"]
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers) == (p.text_hidden, p.text_layers)
    assert model.config.vision_config.hidden_size == p.vision_hidden
    head_std = float(model.get_output_embeddings().weight.std())
    assert head_std < 0.05, head_std  # not the tiny preset's 0.3
    _, inputs = _inputs(processor, _image())
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == text.vocab_size and torch.isfinite(logits).all()


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown size"):
        init_tiny("qwen2_5_vl", tmp_path / "m", size="huge")


def test_a_preset_of_another_patch_side_keeps_model_and_processor_consistent(tmp_path):
    """A Preset object (benchmarks compare shapes) is accepted; its patch side reaches both the
    vision config and the saved processor, so the image tokens match the model's grid."""
    import dataclasses

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from iqa_spider.model.tiny import PRESETS

    preset = dataclasses.replace(PRESETS["tiny"], vision_patch=7)
    path = init_tiny("qwen2_5_vl", tmp_path / "p7", seed=0, size=preset)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.vision_config.patch_size == 7 == processor.image_processor.patch_size
    _, inputs = _inputs(processor, _image((224, 224)))
    assert inputs["pixel_values"].shape[-1] == 3 * 2 * 7 * 7  # channels x temporal x patch x patch
    assert [int(v) for v in inputs["image_grid_thw"][0]] == [1, 32, 32]  # 224 px / 7 px
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("size, family", [("tiny", "qwen2_5_vl"), ("small", "qwen3_vl")])
def test_init_tiny_builds_each_size_of_its_own_class_unless_one_is_named(size, family, tmp_path, capsys):
    """`model init-tiny --size small` is a Qwen3-VL: the small Qwen2.5-VL cannot learn where the
    damage is (model/tiny.py, DEFAULT_FAMILY); --family still picks either class. The demo
    resolves its `tiny.family: null` with the same family_for."""
    from iqa_spider.cli import main
    from iqa_spider.model.tiny import family_for

    assert family_for(size) == family == family_for(size, None)

    assert main(["model", "init-tiny", "--size", size, "--out", str(tmp_path / "default")]) == 0
    assert json.loads((tmp_path / "default" / "config.json").read_text())["model_type"] == family
    assert f"{size} {family} model written" in capsys.readouterr().out
    other = next(f for f in FAMILIES if f != family)
    assert main(["model", "init-tiny", "--size", size, "--family", other, "--out", str(tmp_path / "named")]) == 0
    assert json.loads((tmp_path / "named" / "config.json").read_text())["model_type"] == other
    assert family_for(size, other) == other

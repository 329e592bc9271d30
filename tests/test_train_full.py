"""`method: full` (every parameter trained) under ZeRO-3 with 2 Ray Train CPU workers, its
export, the content/template split of the answer loss, and the fault drill: one run whose
worker is killed at step 5 resumes from its step-3 checkpoint. One 8-step run serves all
of them (Ray Train, DeepSpeed and export start-up cost minutes on 2 cores; the steps, seconds)."""
import json
from pathlib import Path

import pytest

from conftest import REPO, env_vars
from iqa_spider.config import load_config
from iqa_spider.config.schemas import TASK_NAMES, TrainConfig
from iqa_spider.train.export import ADAPTER_DIR, HF_DIR, REFERENCE_FILE, REPORT_FILE
from iqa_spider.train.loop import FAIL_AT_STEP_ENV, FAIL_MARKER_ENV

RECIPE = REPO / "configs/train/tiny_cpu.yaml"
FULL_7B = REPO / "configs/train/qwen2_5_vl_7b_full_zero3.yaml"
STEPS = 8
CONTENT_WEIGHT = 2.0


@pytest.fixture(scope="module")
def full_trained(tmp_path_factory, annotated_dataset, tiny_model_dir, mlflow_server):
    """The full fine-tuning run, killed once at step 5 (checkpoints every 3 steps)."""
    from mlflow.tracking import MlflowClient

    from iqa_spider.train.job import run_train

    out = tmp_path_factory.mktemp("train_full")
    marker = out / "killed-once"
    cfg = load_config(TrainConfig, RECIPE, [
        f"data.uri={annotated_dataset}", f"model.path={tiny_model_dir}", f"output.uri={out / 'runs'}",
        "method=full", f"optim.max_steps={STEPS}", "checkpoint.every_steps=3", "scaling.max_failures=1",
        f"optim.content_loss_weight={CONTENT_WEIGHT}", "tracking.experiment=iqa-spider-train-full",
        "tracking.registered_model=resume-drill", f"tracking.uri={mlflow_server.uri}"])
    with env_vars(**{FAIL_AT_STEP_ENV: "5", FAIL_MARKER_ENV: str(marker)}):
        summary = run_train(cfg)
    assert marker.exists(), "the fault was never injected"
    return cfg, summary, MlflowClient(mlflow_server.uri)


def test_killed_worker_resumes_from_last_checkpoint(full_trained):
    cfg, summary, _ = full_trained
    from iqa_spider.train.job import run_train

    assert summary["metrics"]["step"] == STEPS
    assert summary["metrics"]["resumed_from_step"] == 3  # from the step-3 checkpoint, not from scratch
    # Running the same config again finds the finished run in storage: no step is trained
    # again, the result is the same export, and no new checkpoint appears.
    runs = Path(cfg.output.uri)
    before = sorted(p.name for p in runs.rglob("checkpoint_*"))
    again = run_train(cfg)
    assert again["checkpoint"] == summary["checkpoint"]
    assert sorted(p.name for p in runs.rglob("checkpoint_*")) == before
    assert again["model_version"] == summary["model_version"] == "1"  # not registered twice


def test_full_export_matches_training_logits_and_loads_downstream(full_trained, tiny_model_dir):
    import torch
    from transformers import AutoModelForImageTextToText

    from iqa_spider.config.schemas import ModelConfig
    from iqa_spider.model.loading import load_model

    _, summary, _ = full_trained
    assert summary["metrics"]["step"] == STEPS
    ckpt = Path(summary["checkpoint"])
    report = json.loads((ckpt / REPORT_FILE).read_text())
    assert report["method"] == "full" and report["trained_tensors"] > 0
    assert report["max_abs_logit_diff"] <= report["tolerance"] == 1e-4
    assert not (ckpt / ADAPTER_DIR).exists()  # nothing to adapt: the HF directory is the model
    # The downstream loader (scoring, evaluation, serving) takes the export as it is.
    loaded = load_model(ModelConfig(path=str(ckpt / HF_DIR), device="cpu"))
    ref = torch.load(ckpt / REFERENCE_FILE, weights_only=False)
    with torch.no_grad():
        logits = loaded.model(**ref["inputs"]).logits.float()
    assert float((logits - ref["logits"]).abs().max()) <= 1e-4
    # Every parameter trained: each tensor differs from the base checkpoint's, the language
    # model's norms and embeddings and the vision tower included.
    base = dict(AutoModelForImageTextToText.from_pretrained(tiny_model_dir).named_parameters())
    trained = dict(loaded.model.named_parameters())
    assert trained.keys() == base.keys()
    unchanged = [n for n, p in trained.items() if torch.equal(p, base[n])]
    assert not unchanged, f"not trained: {unchanged[:5]}"
    for part in ("language_model.norm.weight", "embed_tokens.weight", "lm_head.weight", "visual.merger"):
        assert any(part in n for n in trained), part


def test_full_run_tracks_content_and_template_losses(full_trained):
    _, summary, client = full_trained
    run = client.get_run(summary["run_id"])
    assert run.data.params["method"] == "full"
    assert run.data.params["optim.content_loss_weight"] == str(CONTENT_WEIGHT)
    for key in ("loss", "loss_content", "loss_template", "loss_weighted"):
        history = client.get_metric_history(summary["run_id"], key)
        # Every step after the resume is there; steps of the killed attempt are there as far
        # as rank 0 had sent them (it streams every 2 s) before Ray stopped it.
        steps = {m.step for m in history}
        assert set(range(4, STEPS + 1)) <= steps <= set(range(1, STEPS + 1)), key
        assert all(m.value > 0 for m in history), key


def test_content_template_split_and_weighting():
    import torch
    import torch.nn.functional as F

    from iqa_spider.train.loop import LOSS_ROWS, content_lookup, loss_metrics, per_task_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.full((2, 7), -100)
    labels[0, 2:6] = torch.tensor([1, 2, 3, 5])   # 2 and 5 are content ids
    labels[1, 3:6] = torch.tensor([5, 4, 10])     # 10: an end-of-turn template token
    answer_pos = (labels[:, 1:] != -100).nonzero()
    task_ids = torch.tensor([TASK_NAMES.index("rating"), TASK_NAMES.index("grounding")])
    is_content = content_lookup([2, 5], 11, torch.device("cpu"))
    assert is_content.tolist() == [i in (2, 5) for i in range(11)]

    # Per-token cross-entropy by hand: position t predicts labels[t + 1].
    ce = {(r, c): float(F.cross_entropy(logits[r, c - 1:c], labels[r, c:c + 1])) for r, c in
          [(0, 2), (0, 3), (0, 4), (0, 5), (1, 3), (1, 4), (1, 5)]}
    content = [(0, 3), (0, 5), (1, 3)]
    sum_c = sum(ce[k] for k in content)
    sum_t = sum(v for k, v in ce.items() if k not in content)

    plain, plain_stats = per_task_loss(logits, labels, task_ids, answer_pos)  # no lookup: all template
    loss1, stats = per_task_loss(logits, labels, task_ids, answer_pos, is_content, 1.0)
    assert stats.shape == (len(LOSS_ROWS), 2)
    assert torch.equal(loss1, plain)  # weight 1 is exactly the plain token mean
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert float(loss1) == pytest.approx(float(expected), rel=1e-6)
    content_row, template_row = stats[LOSS_ROWS.index("content")], stats[LOSS_ROWS.index("template")]
    assert float(content_row[1]) == 3 and float(template_row[1]) == 4
    assert float(content_row[0]) == pytest.approx(sum_c, rel=1e-6)
    assert float(template_row[0]) == pytest.approx(sum_t, rel=1e-6)
    assert torch.equal(stats[:len(TASK_NAMES)], plain_stats[:len(TASK_NAMES)])  # per-task figures unchanged
    assert plain_stats[LOSS_ROWS.index("content")].tolist() == [0.0, 0.0]

    w = 3.0
    loss_w, stats_w = per_task_loss(logits, labels, task_ids, answer_pos, is_content, w)
    assert float(loss_w) == pytest.approx((w * sum_c + sum_t) / (w * 3 + 4), rel=1e-6)
    assert torch.equal(stats_w, stats)  # the figures are unweighted; only the trained loss is

    sums = {name: tuple(row) for name, row in zip(LOSS_ROWS, stats_w.tolist())}
    m = loss_metrics(sums, w)
    assert m["loss"] == pytest.approx(float(expected), rel=1e-6)
    assert m["loss_content"] == pytest.approx(sum_c / 3, rel=1e-6)
    assert m["loss_template"] == pytest.approx(sum_t / 4, rel=1e-6)
    assert m["loss_weighted"] == pytest.approx(float(loss_w), rel=1e-6)
    assert "loss_global_desc" not in m and "loss_weighted" not in loss_metrics(sums, 1.0)


def test_content_ids_are_the_vocabulary_words_of_the_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    from iqa_spider.model.tokenizer import word_token_id
    from iqa_spider.train.loop import content_token_ids
    from iqa_spider.vocab import SCORE_ANSWER_PREFIX, single_token_words

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = set(content_token_ids(tok))
    assert {word_token_id(tok, w) for w in single_token_words()} <= ids
    template = tok.encode(SCORE_ANSWER_PREFIX, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert not ids & set(template)


def test_full_recipe_trains_every_parameter_in_two_groups(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from iqa_spider.train.recipe import apply_recipe

    def recipe(method):
        cfg = load_config(TrainConfig, RECIPE, ["data.uri=x", f"model.path={tiny_model_dir}", "output.uri=y",
                                                f"method={method}", "optim.lr=0.01", "optim.vision_lr=0.001"])
        return apply_recipe(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), cfg)

    model, groups = recipe("full")
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())
    assert [(g["name"], g["lr"]) for g in groups] == [("language", 0.01), ("vision", 0.001)]
    grouped = {names[id(p)]: g["name"] for g in groups for p in g["params"]}
    assert grouped.keys() == set(names.values())  # every parameter, each in one group
    assert all((g == "vision") == (".visual." in f".{n}") for n, g in grouped.items())
    assert not any("lora_" in n for n in names.values())

    lora_model, lora_groups = recipe("lora")  # unchanged: LoRA plus the fully trained vision side
    assert [g["name"] for g in lora_groups] == ["lora", "vision"]
    frozen = [n for n, p in lora_model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen) and any("lm_head" in n for n in frozen)


def test_7b_full_recipe():
    from iqa_spider.train.recipe import deepspeed_config

    cfg = load_config(TrainConfig, FULL_7B, ["data.uri=s3://b/dq", "output.uri=s3://b/runs"])
    o = cfg.optim
    assert cfg.method == "full" and cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.precision == "bf16"
    assert cfg.deepspeed.gradient_checkpointing and not cfg.deepspeed.offload_optimizer
    assert o.lr == 2e-5 and o.vision_lr < o.lr and o.weight_decay == 0.0
    assert o.global_batch_size == o.micro_batch_size * o.grad_accum * cfg.scaling.num_workers == 64
    assert abs(o.warmup_steps / o.max_steps - 0.03) < 0.002
    offload = load_config(TrainConfig, FULL_7B, ["data.uri=s3://b/dq", "output.uri=s3://b/runs",
                                                 "deepspeed.offload_optimizer=true"])
    ds = deepspeed_config(offload, world_size=8, on_gpu=True)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["optimizer"]["params"]["torch_adam"] is False  # CPU offload needs DeepSpeed's CPU Adam
    assert ds["scheduler"]["type"] == "WarmupCosineLR" and ds["bf16"]["enabled"]

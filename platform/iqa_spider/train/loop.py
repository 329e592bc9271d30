"""The per-worker training loop (Ray Train `train_loop_per_worker`).

Straight path: join the process group -> load the model (partitioned at load under ZeRO-3)
-> apply the recipe -> deepspeed.initialize -> resume from the latest checkpoint if Ray
hands one -> stream batches from this worker's Ray Data shard -> every step: forward,
per-task and content/template loss, backward, step -> report metrics, and at the
configured interval a sharded ZeRO checkpoint -> at the end, the export (consolidated HF
dir, plus the adapter for LoRA), reported as the last checkpoint so the driver can
register it.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from iqa_spider import storage
from iqa_spider.config.schemas import TASK_NAMES, TrainConfig
from iqa_spider.model.loading import resolve_model_path
from iqa_spider.train.export import export_model
from iqa_spider.train.preprocess import collate
from iqa_spider.train.recipe import apply_recipe, deepspeed_config, precision, torch_dtype
from iqa_spider.vocab import SEVERITY_WORDS, single_token_words

log = logging.getLogger(__name__)
ZERO_TAG = "zero"
STATE_FILE = "iqa_state.json"
# Fault injection for tests and drills: crash one worker once at this step (see docs/training.md).
FAIL_AT_STEP_ENV = "IQA_SPIDER_FAIL_AT_STEP"
FAIL_MARKER_ENV = "IQA_SPIDER_FAIL_MARKER"


def fault_from_env() -> dict[str, str]:
    """Read on the driver: Ray workers do not inherit the driver's environment."""
    return {k: os.environ[k] for k in (FAIL_AT_STEP_ENV, FAIL_MARKER_ENV) if os.environ.get(k)}


def maybe_inject_failure(fault: dict[str, str], step: int, rank: int, world: int) -> None:
    """Kill the last worker once at the configured step; the marker file makes it once."""
    at, marker = fault.get(FAIL_AT_STEP_ENV), fault.get(FAIL_MARKER_ENV)
    if at and marker and step == int(at) and rank == world - 1 and not os.path.exists(marker):
        Path(marker).write_text(f"worker {rank} killed at step {step}\n")
        log.error("fault injection: killing worker %d at step %d", rank, step)
        os._exit(1)


# Micro-batches Ray Data collates (and pins) ahead in its threads while the step runs.
PREFETCH_BATCHES = 2


def batches(shard: Any, micro_batch: int, shuffle_buffer: int, seed: int, pad_id: int,
            device: Any, dtype: Any) -> Iterator[dict]:
    """Endless stream of this worker's micro-batches, as model inputs on ``device``.

    Ray Data pads them (``collate``) and casts the pixels to the model's ``dtype`` in its
    prefetch threads (bf16 halves what is pinned and copied), pins them on GPU nodes and
    queues the copy to the device without waiting, so neither the host work nor the copy
    holds up the step; a new pass over the shard starts each epoch.
    """
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict) -> dict:
            out = collate(batch, pad_id)
            out["pixel_values"] = out["pixel_values"].to(dtype)
            return out

    epoch = 0
    while True:
        got = False
        for batch in shard.iter_torch_batches(
                batch_size=micro_batch, drop_last=True, collate_fn=Collate(), device=device,
                pin_memory=device.type == "cuda", prefetch_batches=PREFETCH_BATCHES,
                local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=seed + epoch):
            got = True
            yield batch
        if not got:
            raise RuntimeError("this worker's data shard is empty: fewer samples than workers x micro_batch_size")
        epoch += 1


# Rows of the loss sums the loop keeps on the device: one per task, then the answer tokens
# split into content words (distortion, level, position: what depends on the image) and the
# template around them. Each row holds (cross-entropy sum, tokens); named, never by offset.
LOSS_ROWS: tuple[str, ...] = (*TASK_NAMES, "content", "template")


def content_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the content words in every form that is one token of ``tokenizer``.

    The words are vocab's single-token words (levels, positions, distortions) and the severity
    adjectives; the forms are bare and after a space, lower-case and capitalised (answers
    start sentences with "Mild ..."). A form the tokenizer splits is left out: its pieces are
    no one word's.
    """

    ids: set[int] = set()
    for word in dict.fromkeys([*single_token_words(), *SEVERITY_WORDS.values()]):
        for form in {word, word.capitalize()}:
            for text in (form, " " + form):
                got = tokenizer.encode(text, add_special_tokens=False)
                if len(got) == 1:
                    ids.add(int(got[0]))
    return sorted(ids)


def content_lookup(ids: list[int], vocab_size: int, device: Any) -> Any:
    """A (vocab_size,) bool table: True at content ids (a gather, no host sync, in the loss)."""
    import torch

    table = torch.zeros(max(vocab_size, max(ids, default=-1) + 1), dtype=torch.bool)
    table[ids] = True
    return table.to(device)


def per_task_loss(logits: Any, labels: Any, task_ids: Any, answer_pos: Any, is_content: Any = None,
                  content_weight: float = 1.0) -> tuple[Any, Any]:
    """The training loss over answer tokens, and per LOSS_ROWS row its (loss sum, tokens).

    ``task_ids`` holds each sample's index in TASK_NAMES and ``answer_pos`` the (row, column)
    of every position whose logits predict an answer token (both made by ``collate``);
    ``is_content`` is :func:`content_lookup`'s table (None: every token is template). The
    loss is the token mean of the cross-entropy, content tokens weighted ``content_weight``
    and template tokens 1; at weight 1 it is the plain token mean. Nothing is read back to
    the host: the figures come back as a (len(LOSS_ROWS), 2) float64 tensor on the logits'
    device, which the loop sums over the step and reads once.
    """
    import torch
    import torch.nn.functional as F

    rows, cols = answer_pos.unbind(1)
    targets = labels[rows, cols + 1]
    # Only answer positions, cast to fp32 after selecting them: a full fp32 copy of the logits
    # costs ~1 GB per micro-batch at Qwen's 152k vocabulary, almost all of it prompt and image.
    tok = F.cross_entropy(logits[rows, cols].float(), targets, reduction="none")
    per_sample_sum = torch.zeros(labels.size(0), dtype=tok.dtype, device=tok.device).index_add_(0, rows, tok)
    per_sample_n = (labels[:, 1:] != -100).sum(dim=1)
    content = is_content[targets] if is_content is not None else torch.zeros_like(targets, dtype=torch.bool)
    if content_weight == 1.0:  # plain SFT, computed exactly as before the content split existed
        loss = per_sample_sum.sum() / per_sample_n.sum().clamp(min=1)
    else:
        weight = torch.where(content, content_weight, 1.0).to(tok.dtype)
        total = weight.sum()
        loss = (tok * weight).sum() / torch.where(total > 0, total, torch.ones_like(total))
    per_sample = torch.stack([per_sample_sum.detach().double(), per_sample_n.double()], dim=1)
    stats = torch.zeros(len(LOSS_ROWS), 2, dtype=torch.float64, device=tok.device)
    stats[:len(TASK_NAMES)].index_add_(0, task_ids, per_sample)
    tok64, c = tok.detach().double(), content.double()
    stats[LOSS_ROWS.index("content")] = torch.stack([(tok64 * c).sum(), c.sum()])
    stats[LOSS_ROWS.index("template")] = torch.stack([(tok64 * (1 - c)).sum(), (1 - c).sum()])
    return loss, stats


def loss_metrics(sums: dict[str, tuple[float, float]], content_weight: float) -> dict[str, float]:
    """Step metrics from the (loss sum, tokens) of every LOSS_ROWS row, summed over workers.

    ``loss`` is the plain token mean (comparable across content weights), ``loss_<task>``,
    ``loss_content`` and ``loss_template`` the token means of each group (absent when it had no
    tokens), and ``loss_weighted`` the weighted token mean that was trained, when the weight is not 1.
    """
    (cs, cn), (ts, tn) = sums["content"], sums["template"]
    tokens = sum(sums[t][1] for t in TASK_NAMES)
    out = {"loss": sum(sums[t][0] for t in TASK_NAMES) / max(tokens, 1)}
    out.update({f"loss_{name}": s / n for name, (s, n) in sums.items() if n})
    if content_weight != 1.0:
        out["loss_weighted"] = (content_weight * cs + ts) / max(content_weight * cn + tn, 1e-12)
    return out


def reduce_metrics(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        # NCCL reduces only CUDA tensors; gloo (CPU training) reduces CPU ones.
        if dist.get_backend() == "nccl":
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(t)
    return t.cpu().tolist()


class StepLogger:
    """Rank 0 streams step metrics into the job's MLflow run (training curves in the UI).

    A background thread sends them in batches: a synchronous log_batch per step costs tens
    of milliseconds against a server (more against sqlite), and every other rank would wait
    for rank 0 at the next collective.
    """

    FLUSH_S = 2.0

    def __init__(self, mlflow_cfg: dict | None, rank: int):
        self.client = self.run_id = None
        self.pending: list = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        if rank == 0 and mlflow_cfg and mlflow_cfg.get("run_id"):
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(mlflow_cfg["tracking_uri"]), mlflow_cfg["run_id"]
            self.thread = threading.Thread(target=self._run, name="mlflow-step-logger", daemon=True)
            self.thread.start()

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self.lock:
            self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items() if k != "step")

    def _flush(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        for i in range(0, len(batch), 1000):  # MLflow's per-call limit
            try:
                self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
            except Exception:
                log.exception("could not send %d step metrics to MLflow", len(batch[i:i + 1000]))

    def _run(self) -> None:
        while not self.stopped.wait(self.FLUSH_S):
            self._flush()

    def close(self) -> None:
        if self.client is not None:
            self.stopped.set()
            self.thread.join()
            self._flush()


def partition_sizes(module: Any, rank: int, world: int) -> dict[str, float]:
    """How many parameter elements this rank holds vs the model's total (ZeRO-3 evidence)."""
    local = total = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    held = [0.0] * world
    held[rank] = float(local)
    held = reduce_metrics(held)
    out = {f"params_held_rank{r}": held[r] for r in range(world)}
    out["params_total"] = float(total)
    return out


def _state_of(fs: Any, path: str) -> dict | None:
    try:
        with fs.open(f"{path}/{STATE_FILE}", "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def newest_checkpoint(reported: Any, run_uri: str | None, world: int) -> Any:
    """Ray's latest checkpoint, or a newer complete one found in the run's storage.

    A report is registered by Ray Train's controller only when it next polls the workers; a
    worker that dies right after reporting can take its last checkpoint with it, although the
    files are already in storage. So the run folder is the record: the newest checkpoint whose
    state file and every rank's ZeRO shard (or the export) are all there wins.
    """
    import ray.train

    best, best_step = reported, -1
    if reported is not None:
        fs, path = storage.get_fs(reported.path)
        best_step = (_state_of(fs, path) or {}).get("step", -1)
    if not run_uri or not storage.exists(run_uri):
        return best
    fs, root = storage.get_fs(run_uri)
    fs.invalidate_cache(root)
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        state = _state_of(fs, entry) if name.startswith("checkpoint_") else None
        if not state or state["step"] <= best_step:
            continue
        needed = ([f"{ZERO_TAG}/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
                  if state["kind"] == "zero" else ["export.json"])
        if all(fs.exists(f"{entry}/{n}") for n in needed):
            arrow_fs, arrow_path = storage.arrow_filesystem(storage.to_uri(fs, entry))
            best, best_step = ray.train.Checkpoint(path=arrow_path, filesystem=arrow_fs), state["step"]
    return best


def local_model(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``model.path`` turned into a folder on this node.

    A base model in S3 is copied once per node and content (model.loading's cache) and every
    load in this worker (model, export, processor) reads that copy.
    """

    local = resolve_model_path(cfg.model.path).local_dir
    if local == cfg.model.path:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.model.path = local
    return cfg


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    cfg: TrainConfig = local_model(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = torch.cuda.is_available() and cfg.scaling.use_gpu
    device = torch.device("cuda", ctx.get_local_rank()) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    # A finished run (its export is the newest checkpoint) has nothing left to do: found before
    # the model is built, so re-submitting a finished job returns in seconds.
    checkpoint = newest_checkpoint(ray.train.get_checkpoint(), config.get("run_uri"), world)
    state = None
    if checkpoint:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as f:  # not the shards
            state = json.loads(f.read())
        if state["kind"] == "export":
            ray.train.report({"step": state["step"], "done": 1})
            return
    torch.manual_seed(cfg.optim.seed)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")  # reuses Ray Train's group

    ds_config = deepspeed_config(cfg, world, on_gpu)
    dtype = torch_dtype(precision(cfg, on_gpu))
    hf_ds = None
    if cfg.deepspeed.zero_stage == 3:
        # Keeping this object alive makes from_pretrained build the model inside zero.Init,
        # so no worker ever holds the full model (what lets 7B+ load on modest nodes).
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.model.path, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    model.config.use_cache = False
    if cfg.deepspeed.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model, groups = apply_recipe(model, cfg)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    text_config = model.config.get_text_config()
    pad_id = int(text_config.pad_token_id or 0)
    # Which answer tokens are content words, from the tokenizer training reads (once per worker).
    is_content = content_lookup(content_token_ids(AutoTokenizer.from_pretrained(cfg.model.path)),
                                int(text_config.vocab_size), device)
    content_weight = float(cfg.optim.content_loss_weight)
    sizes = partition_sizes(engine.module, rank, world)
    step_logger = StepLogger(config.get("mlflow"), rank)

    step = resumed_from = 0
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=ZERO_TAG)
        step = resumed_from = int(state["step"])
        log.info("worker %d resumed at step %d", rank, step)

    shard = ray.train.get_dataset_shard("train")
    stream = batches(shard, cfg.optim.micro_batch_size, cfg.data.shuffle_buffer, cfg.optim.seed + step, pad_id,
                     device, dtype)
    started = time.monotonic()
    window = {"samples": 0.0, "tokens": 0.0, "data_wait": 0.0, "t0": time.monotonic()}
    engine.train()
    while step < cfg.optim.max_steps:
        # Summed on the device and read once per optimizer step, for the step's metrics.
        loss_stats = torch.zeros(len(LOSS_ROWS), 2, dtype=torch.float64, device=device)
        step_tokens = torch.zeros((), dtype=torch.float64, device=device)
        for _ in range(cfg.optim.grad_accum):
            waited = time.monotonic()
            inputs = dict(next(stream))
            window["data_wait"] += time.monotonic() - waited
            labels, task_ids, answer_pos = inputs.pop("labels"), inputs.pop("task_id"), inputs.pop("answer_pos")
            out = engine(**inputs)
            loss, stats = per_task_loss(out.logits, labels, task_ids, answer_pos, is_content, content_weight)
            engine.backward(loss)
            engine.step()
            loss_stats += stats
            step_tokens += inputs["attention_mask"].sum()
            window["samples"] += len(task_ids)
        step += 1
        maybe_inject_failure(config.get("fault") or {}, step, rank, world)

        # Every worker takes part in the reduction and in report(): Ray needs the same number
        # of reports from each, and ZeRO-3 needs all ranks in every collective.
        device_sums = torch.cat([step_tokens.reshape(1), loss_stats.flatten()]).tolist()  # the step's one read
        window["tokens"] += device_sums[0]
        host = (window["samples"], window["tokens"], window["data_wait"])
        red = reduce_metrics([*host, *device_sums[1:]])
        samples, tokens, data_wait = red[:len(host)]
        loss_sums = red[len(host):]
        sums = dict(zip(LOSS_ROWS, zip(loss_sums[0::2], loss_sums[1::2])))  # row -> (loss sum, tokens)
        elapsed = max(time.monotonic() - window["t0"], 1e-9)
        metrics: dict[str, float] = {
            "step": step, **loss_metrics(sums, content_weight),
            "lr": scheduler.get_lr()[0],
            "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
            # share of the step spent waiting for Ray Data (mean over workers): > 0.1 means
            # preprocessing is the bottleneck (raise scaling.preprocess_actors / _cpus)
            "data_wait_frac": data_wait / world / elapsed,
        }
        window.update({"samples": 0.0, "tokens": 0.0, "data_wait": 0.0, "t0": time.monotonic()})
        if step % cfg.tracking.log_every == 0:
            step_logger(metrics, step)
            if rank == 0:
                log.info("step %d/%d loss %.4f lr %.2e %.1f samples/s (%.0f%% waiting for data)", step,
                         cfg.optim.max_steps, metrics["loss"], metrics["lr"], metrics["samples_per_s"],
                         100 * metrics["data_wait_frac"])
        metrics.update(sizes)

        if step % cfg.checkpoint.every_steps == 0 and step < cfg.optim.max_steps:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(tmp, tag=ZERO_TAG)
                if rank == 0:
                    Path(tmp, STATE_FILE).write_text(json.dumps({"kind": "zero", "step": step}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        elif step % cfg.tracking.report_every == 0 or step == cfg.optim.max_steps:
            ray.train.report(metrics)

    train_seconds = time.monotonic() - started  # the steps only; the export is timed by the driver
    step_logger.close()

    with tempfile.TemporaryDirectory() as tmp:
        export_model(engine, cfg, Path(tmp), rank, hf_ds)
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps({"kind": "export", "step": step}))
        final = {"step": step, "done": 1, "resumed_from_step": resumed_from,
                 "train_seconds": train_seconds, **sizes}
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
    del hf_ds  # keeps transformers' ZeRO-3 loading hook alive until here

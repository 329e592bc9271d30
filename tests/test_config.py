"""Config loading: typed dataclasses from YAML + overrides; every error is one line, exit 2."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from iqa_spider.cli import main as cli_main
from iqa_spider.config import ConfigError, load_config
from iqa_spider.config.schemas import DemoConfig, ModelRecipe


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_and_overrides_build_the_dataclass(tmp_path):
    p = write(tmp_path, "job: demo\nworkdir: out\ntiny:\n  seed: 7\n")
    cfg = load_config(DemoConfig, p, ["tiny.family=qwen3_vl"])
    assert isinstance(cfg, DemoConfig)
    assert (cfg.workdir, cfg.tiny.seed, cfg.tiny.family) == ("out", 7, "qwen3_vl")


def test_include_merges_a_recipe_into_a_section(tmp_path):
    (tmp_path / "model").mkdir()
    write(tmp_path, "family: qwen3_vl\npath: /models/x\n", "model/recipe.yaml")
    p = write(tmp_path, "job: model\ninclude:\n  model: model/recipe.yaml\nmodel:\n  dtype: bfloat16\n")
    cfg = load_config(ModelRecipe, p)
    assert (cfg.model.family, cfg.model.path, cfg.model.dtype) == ("qwen3_vl", "/models/x", "bfloat16")


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "job: demo\ntiny:\n  sed: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, p)
    msg = str(err.value)
    assert "tiny.sed" in msg and str(p) in msg and "unknown key" in msg
    assert "\n" not in msg


def test_wrong_type_names_key_and_file(tmp_path):
    p = write(tmp_path, "job: demo\ntiny:\n  seed: seven\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, p)
    assert "tiny.seed" in str(err.value) and str(p) in str(err.value) and "wrong type" in str(err.value)


def test_missing_required_value_names_key_and_file(tmp_path):
    p = write(tmp_path, "job: model\nmodel:\n  family: qwen2_5_vl\n")  # no model.path
    with pytest.raises(ConfigError) as err:
        load_config(ModelRecipe, p)
    assert "model.path" in str(err.value) and str(p) in str(err.value) and "missing" in str(err.value)


def test_value_outside_choices_is_refused(tmp_path):
    p = write(tmp_path, "job: demo\ntiny:\n  family: llama\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, p)
    assert "tiny.family" in str(err.value) and "llama" in str(err.value)


def test_bad_override_on_command_line_is_named():
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, None, ["tiny.seed=x"])
    assert "command line" in str(err.value) and "tiny.seed" in str(err.value)


@pytest.mark.parametrize("text, key", [
    ("job: demo\nworkdri: x\n", "workdri"),          # unknown key
    ("job: demo\ntiny:\n  seed: [1]\n", "tiny.seed"),  # wrong type
    ("job: model\nmodel: {}\n", "model.path"),        # missing value
    ("job: demo\nworkdir: ${oops}\n", "workdir"),     # an interpolation that does not resolve
    ("job: demo\nworkdir: ${oc.env:IQA_NOT_SET_ANYWHERE}\n", "workdir"),  # an unset variable
])
def test_cli_exits_2_with_one_line(tmp_path, capsys, text, key):
    p = write(tmp_path, text)
    assert cli_main(["config", "show", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and str(p) in err


def test_environment_interpolation_resolves(tmp_path, monkeypatch):
    monkeypatch.setenv("IQA_WORKDIR", "/data/run7")
    cfg = load_config(DemoConfig, write(tmp_path, "job: demo\nworkdir: ${oc.env:IQA_WORKDIR}\n"))
    assert cfg.workdir == "/data/run7"


def test_config_show_prints_resolved_config(capsys):
    assert cli_main(["config", "show", "--config", str(REPO / "configs/demo.yaml"), "tiny.seed=11"]) == 0
    out = capsys.readouterr().out
    assert "seed: 11" in out and "job: demo" in out


def test_every_shipped_config_loads(tmp_path):
    """Shipped configs are valid; the only values they may leave open (`???`) are the URIs and
    the model path the user gives."""
    from omegaconf import OmegaConf

    from iqa_spider.config.loader import read_yaml
    from iqa_spider.config.schemas import job_schema, load_job_config

    files = sorted(REPO.glob("configs/**/*.yaml"))
    assert files
    for f in files:
        node = read_yaml(f)
        merged = OmegaConf.merge(OmegaConf.structured(job_schema(node.job)), node)
        missing = sorted(OmegaConf.missing_keys(merged))
        assert all(k.endswith(".uri") or k == "model.path" for k in missing), (f, missing)
        load_job_config(str(f), [f"{k}={tmp_path}/{k}" for k in missing])


def test_job_entrypoint_exits_2_on_bad_config(tmp_path):
    p = write(tmp_path, "job: demo\nnope: 1\n")
    proc = subprocess.run([sys.executable, str(REPO / "jobs/demo.py"), "--config", str(p)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nope" in proc.stderr and str(p) in proc.stderr


def test_platform_module_is_the_standard_library():
    proc = subprocess.run([sys.executable, "-c", "import platform; print(platform.system())"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() in ("Linux", "Darwin", "Windows")


TRAIN_URIS = ["data.uri=/tmp/dq", "output.uri=/tmp/runs"]
ANNOTATE_URIS = ["input.uri=/tmp/photos", "output.uri=/tmp/dq"]


@pytest.mark.parametrize("config, overrides, key", [
    ("configs/train/tiny_cpu.yaml", [*TRAIN_URIS, "method=qlora"], "method"),
    ("configs/train/tiny_cpu.yaml", [*TRAIN_URIS, "optim.content_loss_weight=0"], "optim.content_loss_weight"),
    ("configs/annotate.yaml", [*ANNOTATE_URIS, "distort.views_per_image=0"], "distort.views_per_image"),
    ("configs/annotate.yaml", [*ANNOTATE_URIS, "distort.min_severity=6"], "distort.min_severity"),
    ("configs/annotate.yaml", [*ANNOTATE_URIS, "distort.view_min_side=1.5"], "distort.view_min_side"),
    ("configs/annotate.yaml", [*ANNOTATE_URIS, "distort.families=[blur,smudge]"], "distort.families"),
    ("configs/annotate.yaml", [*ANNOTATE_URIS, "distort.dao_prob=1.5"], "distort.dao_prob"),
    ("configs/annotate.yaml", [*ANNOTATE_URIS, "distort.whole_image_prob=1.0", "distort.clean_prob=0.15"],
     "distort.whole_image_prob"),
    ("configs/annotate.yaml", [*ANNOTATE_URIS, "distort.families=[]"], "distort.families"),
    ("configs/annotate.yaml", [*ANNOTATE_URIS, "distort.families=[blur,blur]"], "distort.families"),
    ("configs/demo.yaml", ["tiny.size=huge"], "tiny.size"),
])
def test_recipe_and_view_settings_are_checked(config, overrides, key):
    from iqa_spider.config.schemas import load_job_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_job_config(str(REPO / config), overrides)


def test_promotion_refuses_the_shuffled_image_control(tmp_path):
    """The control answers about other samples' images: a gate must never decide on it."""
    from iqa_spider.config.schemas import load_job_config

    with pytest.raises(ConfigError, match=r"data\.shuffle_images"):
        load_job_config(str(REPO / "configs/gate.yaml"), [f"data.uri={tmp_path}", "data.shuffle_images=true"])


def test_one_environment_list_and_serve_replicas_get_no_credentials(monkeypatch):
    """Jobs, batch scoring and Serve pass their workers names from one list; Serve's default
    leaves the credentials to the pod, submit sends no node-local path, and unset or empty
    variables are not passed at all."""
    from iqa_spider.environment import CREDENTIAL_ENV, NODE_ENV, SUBMIT_ENV, WORKER_ENV, present_env
    from iqa_spider.score.job import FORWARD_ENV
    from iqa_spider.serve.config import DEFAULT_FORWARD_ENV, ServeAppConfig
    from iqa_spider.submit import DEFAULT_ENV

    assert tuple(FORWARD_ENV) == WORKER_ENV and tuple(DEFAULT_ENV) == SUBMIT_ENV
    assert not set(NODE_ENV) & set(DEFAULT_ENV)  # submit sends no path of the submitting machine
    assert set(DEFAULT_FORWARD_ENV) < set(WORKER_ENV) and not set(CREDENTIAL_ENV) & set(DEFAULT_FORWARD_ENV)
    assert ServeAppConfig().forward_env == DEFAULT_FORWARD_ENV
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert present_env(["AWS_REGION", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"]) == {"AWS_REGION": "eu-west-1"}


@pytest.mark.parametrize("value,expected", [(True, True), ("TRUE ", True), ("1", True), (1, True),
                                            ("false", False), (" 0", False), (0, False)])
def test_one_boolean_reading(value, expected):
    from iqa_spider.config.loader import parse_bool

    assert parse_bool(value, "describe") is expected


@pytest.mark.parametrize("value", ["yes", "on", "maybe", "", 2, 1.0, None])
def test_anything_else_is_not_a_boolean(value):
    from iqa_spider.config.loader import ConfigValueError, parse_bool

    with pytest.raises(ConfigValueError, match="expected true, false, 1 or 0") as info:
        parse_bool(value, "describe")
    assert info.value.key == "describe"

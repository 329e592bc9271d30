"""Deployment files are consistent with the repository they deploy (no cluster needed)."""
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import REPO

K8S = sorted((REPO / "infra/k8s").glob("*.yaml"))
IMAGE_TAG = re.compile(r"^iqa-spider:[\w.\-]+$")


def manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in K8S}


def pod_specs(node, path=""):
    """Every pod template spec inside a manifest (head, worker groups, submitters)."""
    if isinstance(node, dict):
        if "containers" in node:
            yield path, node
        for k, v in node.items():
            yield from pod_specs(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from pod_specs(v, f"{path}[{i}]")


def quantity(v) -> float:
    s = str(v)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for u, f in units.items():
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


def test_every_manifest_parses_as_a_kuberay_object():
    docs = manifests()
    assert {"raycluster.yaml", "rayjob-train.yaml", "rayjob-score.yaml", "rayservice.yaml"} <= set(docs)
    kinds = {d["kind"] for d in docs.values()}
    assert kinds == {"RayCluster", "RayJob", "RayService"}
    for name, d in docs.items():
        assert d["apiVersion"] == "ray.io/v1", name
        assert d["metadata"]["name"].startswith("iqa-spider"), name


def test_images_are_one_tag_and_requests_equal_limits_on_gpus():
    images = set()
    for name, d in manifests().items():
        for where, spec in pod_specs(d):
            for c in spec["containers"]:
                images.add(c["image"])
                res = c.get("resources", {})
                gpus = res.get("requests", {}).get("nvidia.com/gpu")
                if gpus is not None:  # Kubernetes requires GPU requests == limits
                    assert res["limits"]["nvidia.com/gpu"] == gpus, (name, where)
                # secrets come from the Secret, never inline
                assert not any(e.get("name", "").startswith(("AWS_SECRET", "MLFLOW_TRACKING_TOKEN"))
                               for e in c.get("env", [])), (name, where)
    assert len(images) == 1 and IMAGE_TAG.match(images.pop())


def test_gpu_pods_get_a_memory_backed_dev_shm():
    """Kubernetes gives 64 MiB of /dev/shm: NCCL and Ray's object store need far more."""
    checked = 0
    for name, d in manifests().items():
        for where, spec in pod_specs(d):
            for c in spec["containers"]:
                if "nvidia.com/gpu" not in c.get("resources", {}).get("requests", {}):
                    continue
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                volumes = {v["name"]: v for v in spec.get("volumes", [])}
                assert "/dev/shm" in mounts, (name, where)
                assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", (name, where)
                checked += 1
    assert checked >= 2  # the RayCluster's and the RayService's GPU workers


def test_dockerfile_copies_what_the_manifests_run():
    text = (REPO / "infra/Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:[\d.]+-py311-cu\d+", text, re.M)
    for folder in ("platform", "jobs", "configs", "serving"):
        assert re.search(rf"^COPY .*\b{folder}\b", text, re.M), folder
    assert not re.search(r"(AWS_SECRET_ACCESS_KEY|MLFLOW_TRACKING_TOKEN)\s*=", text)


def rayjob_command(name: str) -> tuple[Path, Path, list[str]]:
    job = manifests()[name]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    script, config = REPO / argv[1], REPO / argv[argv.index("--config") + 1]
    return script, config, argv[argv.index("--config") + 2:]


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-score.yaml"])
def test_rayjob_entrypoints_and_configs_exist_and_load(name, tmp_path):
    from iqa_spider.config.schemas import load_job_config

    script, config, overrides = rayjob_command(name)
    assert script.is_file() and config.is_file(), (script, config)
    cfg = load_job_config(str(config), overrides)  # the config + the manifest's overrides validate
    assert cfg.job == script.stem
    selector = manifests()[name]["spec"]["clusterSelector"]["ray.io/cluster"]
    assert selector == manifests()["raycluster.yaml"]["metadata"]["name"]


def gpu_group(cluster_spec: dict) -> dict:
    (group,) = [g for g in cluster_spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    res = group["template"]["spec"]["containers"][0]["resources"]["requests"]
    return {"max_nodes": group["maxReplicas"], "gpus": quantity(res["nvidia.com/gpu"]), "cpus": quantity(res["cpu"])}


def test_training_job_fits_the_cluster():
    from iqa_spider.config.schemas import load_job_config

    _, config, overrides = rayjob_command("rayjob-train.yaml")
    cfg = load_job_config(str(config), overrides)
    g = gpu_group(manifests()["raycluster.yaml"]["spec"])
    assert cfg.scaling.use_gpu
    per_node = int(g["gpus"])
    # one GPU per worker; the CPUs each worker asks for fit beside it on the node
    assert cfg.scaling.num_workers <= g["max_nodes"] * per_node
    assert cfg.scaling.cpus_per_worker * min(per_node, cfg.scaling.num_workers) <= g["cpus"]
    assert cfg.optim.global_batch_size == cfg.optim.micro_batch_size * cfg.optim.grad_accum * cfg.scaling.num_workers


def test_rayservice_serve_config_validates_and_fits(tmp_path):
    from iqa_spider.config.loader import load_config
    from iqa_spider.config.schemas import job_schema

    service = manifests()["rayservice.yaml"]["spec"]
    serve_cfg = yaml.safe_load(service["serveConfigV2"])
    local = yaml.safe_load((REPO / "serving/config.yaml").read_text())
    assert [a["import_path"] for a in serve_cfg["applications"]] == [a["import_path"] for a in local["applications"]]
    g = gpu_group(service["rayClusterConfig"])
    for app in serve_cfg["applications"]:
        args = tmp_path / f"{app['name']}.yaml"
        args.write_text(yaml.safe_dump(app["args"]))
        cfg = load_config(job_schema("serve"), args)  # the schema serving/config.yaml is held to
        model = cfg.deployments.model
        replicas = model.autoscaling.max_replicas if model.autoscaling.enabled else model.num_replicas
        assert model.num_gpus >= 1  # a GPU service
        assert replicas * model.num_gpus <= g["max_nodes"] * g["gpus"]


def test_local_serve_config_fits_two_cores_and_binds_this_machine(tmp_path):
    """`serve run serving/config.yaml` on a 2-core machine: the deployments' CPU shares (and the
    schema's defaults) fit in 2 CPUs, or the ingress waits for a CPU for ever; the API, which has
    no authentication unless a token is set, listens on 127.0.0.1 only. The cluster manifest
    binds every interface (its network policy guards it)."""
    from iqa_spider.config.loader import load_config
    from iqa_spider.config.schemas import job_schema

    local = yaml.safe_load((REPO / "serving/config.yaml").read_text())
    assert local["http_options"]["host"] == "127.0.0.1"
    service = manifests()["rayservice.yaml"]["spec"]
    assert yaml.safe_load(service["serveConfigV2"])["http_options"]["host"] == "0.0.0.0"
    schema = job_schema("serve")
    args = tmp_path / "args.yaml"
    args.write_text(yaml.safe_dump(local["applications"][0]["args"]))
    for cfg in (load_config(schema, args), schema()):
        d = cfg.deployments
        shares = (d.model.num_cpus * d.model.num_replicas + d.grounding.num_cpus * d.grounding.num_replicas
                  + d.ingress.num_cpus * d.ingress.num_replicas)
        assert shares <= 2.0, f"{shares} CPUs asked on a 2-core machine"

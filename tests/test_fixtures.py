"""The session fixtures really start their services (later issues rely on them)."""
import urllib.request


def test_ray_local_has_two_cpus(ray_local):
    import ray

    assert ray.is_initialized()
    assert ray.cluster_resources().get("CPU") == 2

    @ray.remote
    def square(x):
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]


def test_mlflow_server_answers_and_stores_runs(mlflow_server):
    import mlflow

    with urllib.request.urlopen(mlflow_server.uri + "/health", timeout=10) as r:
        assert r.status == 200
    mlflow.set_tracking_uri(mlflow_server.uri)
    exp = mlflow.set_experiment("fixture-check")
    with mlflow.start_run() as run:
        mlflow.log_metric("x", 1.5)
    got = mlflow.get_run(run.info.run_id)
    assert got.data.metrics["x"] == 1.5 and got.info.experiment_id == exp.experiment_id


def test_moto_bucket_exists(moto_s3):
    import boto3

    names = [b["Name"] for b in boto3.client("s3", endpoint_url=moto_s3.endpoint).list_buckets()["Buckets"]]
    assert moto_s3.bucket in names

"""A mistyped input path or bucket, or a manifest without its column, is a config error (one
line naming the key, exit 2), not a job that "succeeds" on an empty listing or a traceback.
Local paths and the moto S3 server, for each job that lists or reads an input."""
import pytest

from conftest import REPO
from iqa_spider import storage


def job_args(job: str, missing: str, tmp_path) -> tuple:
    """(main, argv, key) of `job` run with `missing` as its input."""
    if job == "score":
        from iqa_spider.score.job import main

        return main, ["--config", str(REPO / "configs/score.yaml"), f"input.uri={missing}",
                      f"output.uri={tmp_path / 'out'}"], "input.uri"
    if job == "annotate":
        from iqa_spider.annotate.pipeline import main

        return main, ["--config", str(REPO / "configs/annotate.yaml"), f"input.uri={missing}",
                      f"output.uri={tmp_path / 'out'}"], "input.uri"
    from iqa_spider.evaluate.job import main

    return main, ["--config", str(REPO / "configs/evaluate.yaml"), f"data.uri={missing}",
                  f"model.path={tmp_path / 'model'}", f"output.uri={tmp_path / 'out'}"], "data.uri"


@pytest.mark.parametrize("job", ["score", "annotate", "evaluate"])
def test_missing_local_input_is_a_config_error(job, tmp_path, capsys):
    main, argv, key = job_args(job, str(tmp_path / "photso"), tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("config error") and f"key '{key}'" in err[-1] and "no such file or folder" in err[-1]
    assert not (tmp_path / "out").exists()  # nothing written, no empty summary claiming success


@pytest.mark.parametrize("job", ["score", "annotate", "evaluate"])
def test_missing_s3_bucket_or_prefix_is_a_config_error(job, moto_s3, tmp_path, capsys):
    for missing in ("s3://no-such-bucket/photos", f"s3://{moto_s3.bucket}/no/such/prefix"):
        main, argv, key = job_args(job, missing, tmp_path)
        assert main(argv) == 2, missing
        err = capsys.readouterr().err.strip().splitlines()
        assert f"key '{key}'" in err[-1] and missing in err[-1], err[-3:]


def test_listing_a_missing_folder_raises_instead_of_yielding_nothing(tmp_path, moto_s3):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        list(storage.iter_files(str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        list(storage.iter_files(f"s3://{moto_s3.bucket}/nowhere/"))
    (tmp_path / "empty").mkdir()
    assert list(storage.iter_files(str(tmp_path / "empty"))) == []  # an existing empty folder is just empty


def test_annotate_manifest_without_image_uri_is_a_config_error(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from iqa_spider.annotate.pipeline import main

    manifest = tmp_path / "photos.parquet"
    pq.write_table(pa.table({"path": ["a.png"]}), manifest)
    assert main(["--config", str(REPO / "configs/annotate.yaml"), f"input.uri={manifest}",
                 f"output.uri={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "key 'input.uri'" in err and "'image_uri' column" in err and "path" in err

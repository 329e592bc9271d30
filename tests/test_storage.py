"""Storage: the same calls on local paths, file:// and a real moto S3 server; atomic writes."""
import pytest

from iqa_spider import storage


class Crash(Exception):
    pass


def roundtrip(base: str) -> None:
    uri = storage.join(base, "a", "b c ü.bin")
    payload = bytes(range(256)) * 1000
    storage.write_bytes(uri, payload)
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == payload
    storage.write_bytes(storage.join(base, "a", "x.png"), b"png")
    storage.write_bytes(storage.join(base, "a", "deeper", "y.JPG"), b"jpg")
    listed = list(storage.iter_files(base))
    assert len(listed) == 3 and all(storage.exists(u) for u in listed)
    pngs = list(storage.iter_files(base, suffixes=(".png", ".jpg")))
    assert sorted(p.rsplit("/", 1)[-1] for p in pngs) == ["x.png", "y.JPG"]


def crash_mid_write(base: str) -> None:
    uri = storage.join(base, "half.bin")
    with pytest.raises(Crash):
        with storage.atomic_write(uri) as f:
            f.write(b"x" * 10_000_000)
            raise Crash()
    assert not storage.exists(uri)
    # no temp object left behind either (find lists hidden .tmp-* names, which iter_files skips)
    fs, path = storage.get_fs(base)
    fs.invalidate_cache(path)
    assert fs.find(path) == []
    # An existing object is untouched by a failed rewrite.
    storage.write_bytes(uri, b"old")
    with pytest.raises(Crash):
        with storage.atomic_write(uri) as f:
            f.write(b"new but incomplete")
            raise Crash()
    assert storage.read_bytes(uri) == b"old"


def test_local_roundtrip(tmp_path):
    roundtrip(str(tmp_path / "local"))


def test_file_uri_roundtrip(tmp_path):
    roundtrip(f"file://{tmp_path}/viafile")


def test_local_atomic_write(tmp_path):
    crash_mid_write(str(tmp_path / "crash"))


def test_s3_roundtrip(moto_s3):
    roundtrip(moto_s3.uri("roundtrip"))


def test_s3_atomic_write(moto_s3):
    crash_mid_write(moto_s3.uri("crash"))


def test_s3_uses_endpoint_from_environment(moto_s3):
    fs, path = storage.get_fs(moto_s3.uri("k"))
    assert fs.client_kwargs.get("endpoint_url", fs.endpoint_url) == moto_s3.endpoint
    assert path == f"{moto_s3.bucket}/k"


def test_missing_object_raises_file_not_found(moto_s3, tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(moto_s3.uri("nope"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "nope"))


def test_copy_tree_between_local_and_s3(moto_s3, tmp_path):
    src = tmp_path / "src"
    storage.write_bytes(str(src / "config.json"), b"{}")
    storage.write_bytes(str(src / "sub" / "w.bin"), b"\x00" * 1000)
    up = f"s3://{moto_s3.bucket}/copy-{tmp_path.name}"
    assert storage.copy_tree(str(src), up) == 2
    assert storage.read_bytes(f"{up}/sub/w.bin") == b"\x00" * 1000
    assert storage.copy_tree(up, str(tmp_path / "back")) == 2
    assert (tmp_path / "back" / "config.json").read_bytes() == b"{}"


def test_is_below_compares_paths_on_one_filesystem(tmp_path):
    assert storage.is_below("s3://b/in/out/x.png", "s3://b/in/out")
    assert storage.is_below("s3://b/in/out/x.png", "s3://b/in/out/")
    assert not storage.is_below("s3://b/in/outer/x.png", "s3://b/in/out")  # a prefix, not a folder
    assert not storage.is_below("s3://b/in/x.png", "s3://b/in/out")
    assert storage.is_below(str(tmp_path / "out" / "x.png"), f"file://{tmp_path / 'out'}")
    assert not storage.is_below(str(tmp_path / "out" / "x.png"), "s3://b" + str(tmp_path / "out"))

"""The lake on a real S3 server (SeaweedFS on loopback): store semantics, lake round trips, readers, errors.

Run: ``.venv/bin/python -m pytest tests/test_s3.py -q`` (skipped without the ``weed`` binary).
"""

from __future__ import annotations

import secrets
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from infra.seaweed import SeaweedServer, start_seaweed
from tasks.lake import Lake
from tasks.lake import LakeAccessError, S3Store, split_uri

RUN = "run-1"


def _scored(iteration: int, rows: int = 3) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(rows)],
            "completion": [f"{iteration}:{i}" for i in range(rows)],
            "reward": [float(i == iteration) for i in range(rows)],
        }
    )


def _write_scored(lake: Lake, iterations: tuple[int, ...] = (1, 2), runs: tuple[str, ...] = (RUN,)) -> None:
    for run in runs:
        for g in iterations:
            lake.write_stage(lake.stage_uri(run, g, "scored"), [_scored(g), _scored(g, rows=2)], config={"g": g})


def _full_error(exc: BaseException) -> str:
    """Everything a user could see of an error: message, chained causes and traceback."""
    return "".join(traceback.format_exception(exc))


# -- store semantics ---------------------------------------------------------------------------
def test_put_get_exists(s3_lake: str) -> None:
    store = S3Store()
    uri = f"{s3_lake}/a/b.bin"
    store.put(uri, b"\x00payload")
    assert store.get(uri) == b"\x00payload"
    assert store.exists(uri)
    store.put(uri, b"replaced")
    assert store.get(uri) == b"replaced"
    assert not store.exists(f"{s3_lake}/a/missing.bin")
    assert not store.exists(f"{s3_lake}/a")  # a folder is not an object
    assert store.local_path(uri) is None


def test_get_missing_key_is_file_not_found(s3_lake: str) -> None:
    with pytest.raises(FileNotFoundError) as info:
        S3Store().get(f"{s3_lake}/nothing/here.json")
    assert not isinstance(info.value, LakeAccessError)
    assert str(info.value) == f"No object at {s3_lake}/nothing/here.json."


def test_list_is_recursive_sorted_and_scoped_to_the_folder(s3_lake: str) -> None:
    store = S3Store()
    for key in ("stage/b.txt", "stage/a/z.txt", "stage/a/y.txt", "stage2/x.txt", "stagex.txt"):
        store.put(f"{s3_lake}/{key}", key.encode())
    assert store.list(f"{s3_lake}/stage") == [
        f"{s3_lake}/stage/a/y.txt",
        f"{s3_lake}/stage/a/z.txt",
        f"{s3_lake}/stage/b.txt",
    ]
    assert store.list(f"{s3_lake}/stage/") == store.list(f"{s3_lake}/stage")
    assert store.list(f"{s3_lake}/empty") == []
    bucket, _ = split_uri(s3_lake)
    assert len(store.list(f"s3://{bucket}")) == 5


def test_delete_prefix_spares_siblings(s3_lake: str) -> None:
    store = S3Store()
    for key in ("stage/a.txt", "stage/deep/b.txt", "stage2/c.txt", "stage.txt"):
        store.put(f"{s3_lake}/{key}", b"x")
    store.delete_prefix(f"{s3_lake}/stage")
    assert store.list(f"{s3_lake}/stage") == []
    assert store.exists(f"{s3_lake}/stage2/c.txt")
    assert store.exists(f"{s3_lake}/stage.txt")
    store.delete_prefix(f"{s3_lake}/never-written")  # nothing there: nothing to do
    with pytest.raises(ValueError, match="Refusing to delete every object"):
        store.delete_prefix(f"s3://{split_uri(s3_lake)[0]}")


def test_list_and_delete_page_past_1000_keys(s3_lake: str) -> None:
    store = S3Store()
    store.client  # one client for the threads below
    uris = [f"{s3_lake}/many/{i:04d}.txt" for i in range(1003)]  # S3 pages and deletes by 1000
    with ThreadPoolExecutor(max_workers=10) as pool:  # botocore's default connection pool size
        list(pool.map(lambda uri: store.put(uri, b"."), uris))
    store.put(f"{s3_lake}/many2/keep.txt", b"keep")
    assert store.list(f"{s3_lake}/many") == uris
    store.delete_prefix(f"{s3_lake}/many")
    assert store.list(f"{s3_lake}/many") == []
    assert store.list(f"{s3_lake}/many2") == [f"{s3_lake}/many2/keep.txt"]


def test_put_file_and_get_file(s3_lake: str, tmp_path: Path) -> None:
    store = S3Store()
    source = tmp_path / "weights.bin"
    source.write_bytes(secrets.token_bytes(70_000))
    store.put_file(source, f"{s3_lake}/ckpt/weights.bin")
    target = tmp_path / "down" / "nested" / "weights.bin"
    store.get_file(f"{s3_lake}/ckpt/weights.bin", target)
    assert target.read_bytes() == source.read_bytes()
    with pytest.raises(FileNotFoundError):
        store.get_file(f"{s3_lake}/ckpt/missing.bin", tmp_path / "missing.bin")


def test_storage_options_and_repr(s3_lake: str, s3_server: SeaweedServer) -> None:
    store = S3Store()
    store.put(f"{s3_lake}/x", b"x")
    assert store.storage_options() == {
        "aws_endpoint_url": s3_server.endpoint_url,
        "aws_region": "us-east-1",
        "aws_access_key_id": s3_server.access_key,
        "aws_secret_access_key": s3_server.secret_key,
    }
    for shown in (repr(store), repr(s3_server)):
        assert s3_server.secret_key not in shown and s3_server.access_key not in shown
    assert s3_server.endpoint_url in repr(store)


def test_constructor_settings_override_the_environment(s3_lake: str, s3_server: SeaweedServer, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    store = S3Store(endpoint_url=s3_server.endpoint_url, region="us-east-1")
    store.put(f"{s3_lake}/y", b"y")
    assert (store.endpoint_url, store.region) == (s3_server.endpoint_url, "us-east-1")


# -- the lake on S3 -------------------------------------------------------------------------------
def test_lake_stage_round_trip(s3_lake: str) -> None:
    lake = Lake(s3_lake)
    stage = lake.stage_uri(RUN, 1, "scored")
    assert not lake.is_done(stage)
    manifest = lake.write_stage(stage, [_scored(1), _scored(1, rows=2)], config={"tau": 0.5}, parents=["s3://x/p"])
    assert lake.is_done(stage)
    assert (manifest.rows, [f["name"] for f in manifest.files]) == (5, ["part-00000.parquet", "part-00001.parquet"])
    assert manifest.parents == ["s3://x/p"]
    assert lake.read(stage).equals(pl.concat([_scored(1), _scored(1, rows=2)]))
    again = lake.write_stage(stage, [_scored(9)], config={"tau": 0.9})  # committed: left as it is
    assert again.sha256 == manifest.sha256
    lake.put_json(f"{lake.run_uri(RUN)}/summary.json", {"run": RUN, "iterations": []})
    assert lake.get_json(f"{lake.run_uri(RUN)}/summary.json") == {"run": RUN, "iterations": []}


def test_unfinished_stage_is_replaced(s3_lake: str) -> None:
    lake = Lake(s3_lake)
    stage = lake.stage_uri(RUN, 1, "samples")
    lake.store.put(f"{stage}/part-00007.parquet", b"left by a killed attempt")
    lake.write_stage(stage, [_scored(1)])
    assert lake.store.list(stage) == [f"{stage}/part-00000.parquet"]  # the table partition holds parts only
    assert lake.store.exists(lake.manifest_uri(stage)) and lake.read(stage).equals(_scored(1))


def test_stage_scans_with_polars_hive_glob(s3_lake: str) -> None:
    lake = Lake(s3_lake)
    _write_scored(lake, runs=(RUN, "run-2"))
    frame = (
        pl.scan_parquet(f"{s3_lake}/scored/**/*.parquet", storage_options=lake.store.storage_options(), hive_partitioning=True)
        .collect()
        .sort("run", "iteration", "completion")
    )
    assert frame.height == 20
    assert frame["run"].to_list() == [RUN] * 10 + ["run-2"] * 10
    assert frame["iteration"].to_list() == ([1] * 5 + [2] * 5) * 2
    assert set(frame.columns) == {"prompt_id", "completion", "reward", "run", "iteration"}


def test_stage_reads_with_pyarrow_dataset(s3_lake: str) -> None:
    lake = Lake(s3_lake)
    _write_scored(lake, runs=(RUN, "run-2"))
    options = lake.store.storage_options()
    filesystem = pafs.S3FileSystem(
        access_key=options["aws_access_key_id"],
        secret_key=options["aws_secret_access_key"],
        endpoint_override=options["aws_endpoint_url"],
        region=options["aws_region"],
    )
    # The table's prefix, as Athena, Spark or Trino would declare it: every run and iteration, nothing else.
    assert all(u.endswith(".parquet") for u in lake.store.list(f"{s3_lake}/scored"))
    dataset = ds.dataset(f"{s3_lake}/scored"[len("s3://") :], filesystem=filesystem, format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert table.num_rows == 20
    frame = pl.from_arrow(table).group_by("run", "iteration").len().sort("run", "iteration")
    assert frame.rows() == [(RUN, 1, 5), (RUN, 2, 5), ("run-2", 1, 5), ("run-2", 2, 5)]
    pruned = dataset.to_table(filter=(ds.field("run") == "run-2") & (ds.field("iteration") == 2))
    assert pruned.num_rows == 5


def test_put_dir_get_dir_round_trip(s3_lake: str, tmp_path: Path) -> None:
    local = tmp_path / "checkpoint"
    (local / "tokenizer").mkdir(parents=True)
    (local / "config.json").write_text('{"n_layer": 2}')
    (local / "model.safetensors").write_bytes(secrets.token_bytes(10_000))
    (local / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    lake = Lake(s3_lake)
    uri = lake.stage_uri(RUN, 1, "checkpoint", 1)
    manifest = lake.put_dir(local, uri)
    assert sorted(f["name"] for f in manifest.files) == ["config.json", "model.safetensors", "tokenizer/vocab.json"]
    fetched = lake.get_dir(uri, tmp_path / "cache")
    for rel in ("config.json", "model.safetensors", "tokenizer/vocab.json"):
        assert (fetched / rel).read_bytes() == (local / rel).read_bytes()
    assert lake.get_dir(uri, tmp_path / "cache") == fetched  # downloaded once


# -- errors a person can act on -------------------------------------------------------------------
def test_wrong_credentials_are_one_sentence_without_secrets(
    s3_lake: str, s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = f"wrong-{secrets.token_hex(12)}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    lake = Lake(s3_lake)
    stage = lake.stage_uri(RUN, 1, "scored")
    started = time.monotonic()
    for attempt in (lambda: lake.is_done(stage), lambda: lake.write_stage(stage, [_scored(1)])):
        with pytest.raises(LakeAccessError) as info:
            attempt()
        assert str(info.value).startswith(f"S3 refused the credentials for {s3_lake}/")
        assert "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in str(info.value)
        shown = _full_error(info.value)
        assert wrong not in shown and s3_server.secret_key not in shown
    assert time.monotonic() - started < 10  # refusals are not retried


def test_missing_bucket_is_one_sentence(s3_lake: str, s3_server: SeaweedServer) -> None:
    lake = Lake(f"s3://no-such-bucket-{secrets.token_hex(4)}/lake")
    bucket = split_uri(lake.uri)[0]
    expected = f"Bucket '{bucket}' does not exist at {s3_server.endpoint_url}: create it or fix the lake URI."
    stage = lake.stage_uri(RUN, 1, "scored")
    started = time.monotonic()
    for attempt in (
        lambda: lake.is_done(stage),
        lambda: lake.write_stage(stage, [_scored(1)]),
        lambda: lake.store.put(f"{stage}/x", b"x"),
        lambda: lake.store.get(f"{stage}/x"),
    ):
        with pytest.raises(LakeAccessError) as info:
            attempt()
        assert str(info.value) == expected
        assert s3_server.secret_key not in _full_error(info.value)
    assert time.monotonic() - started < 10


def test_stopped_server_is_one_sentence_within_bounded_time(
    s3_server: SeaweedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_seaweed(
        tmp_path / "seaweed", access_key=s3_server.access_key, secret_key=s3_server.secret_key, die_with_parent=True
    )
    try:
        for name, value in server.aws_env().items():
            monkeypatch.setenv(name, value)
        server.create_bucket("short-lived")
        lake = Lake("s3://short-lived/lake")
        stage = lake.stage_uri(RUN, 1, "scored")
        lake.write_stage(stage, [_scored(1)])
    finally:
        server.stop(timeout=1)  # graceful or killed: either way nothing listens any more
    assert not server.is_running()
    started = time.monotonic()
    with pytest.raises(LakeAccessError) as info:
        lake.read(stage)
    elapsed = time.monotonic() - started
    assert str(info.value) == f"Cannot reach the S3 endpoint {server.endpoint_url}: is the server running?"
    assert s3_server.secret_key not in _full_error(info.value)
    assert elapsed < 25  # 5 attempts with capped exponential backoff, not minutes

"""Artifact backups against a real S3 API on 127.0.0.1 (moto's ThreadedMotoServer, bucket versioning on)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from pixtrain_dagster.core.artifacts import ArtifactStore
from pixtrain_dagster.core.backup import (
    METRIC_NAME,
    BackupError,
    last_backup_success_timestamp,
    list_backup,
    prometheus_text,
    restore,
    run_backup,
    verify_backup,
    write_metric_textfile,
)

BUCKET = "pixtrain-backups"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch, request):
    """A fresh versioned bucket; s3fs reaches it through the standard AWS_ENDPOINT_URL, as an S3-compatible store
    in production."""
    import boto3
    import s3fs

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    bucket = f"{BUCKET}-{abs(hash(request.node.name)) % 10**8}"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    assert client.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    return client, bucket, f"s3://{bucket}/pixtrain"


def _artifact(store: ArtifactStore, key: str, payload: bytes) -> None:
    with store.stage() as folder:
        (folder / "data").mkdir()
        (folder / "data" / "part-0.bin").write_bytes(payload * 2000)
        (folder / "info.json").write_text(json.dumps({"key": key}))
        store.publish(folder, key)


@pytest.fixture
def source(tmp_path) -> ArtifactStore:
    """A store holding every kind of artifact the pipeline publishes, plus things that must not be copied."""
    store = ArtifactStore(tmp_path / "artifacts")
    for key, payload in [
        ("datasets/d1", b"rows"),
        ("adapters/fp1", b"lora"),
        ("checkpoints/fp1/step-000002", b"ck2"),
        ("checkpoints/fp1/step-000004", b"ck4"),
        ("evaluations/e1", b"eval"),
        ("bias-reports/b1", b"bias"),
        ("promoted/adapters/fp1", b"lora"),
    ]:
        _artifact(store, key, payload)
    store.put_json("dagster/assets/lora_adapter.json", {"key": "adapters/fp1"})
    store.put_json("promoted/CURRENT.json", {"uri": store.uri("promoted/adapters/fp1")})
    (Path(store.root) / "landing").mkdir()
    (Path(store.root) / "landing" / "raw.jsonl").write_text('{"messages": []}\n')  # raw input: not backed up
    (Path(store.root) / ".staging" / "stage-leftover").mkdir(parents=True)
    (Path(store.root) / ".staging" / "stage-leftover" / "x.bin").write_bytes(b"half")
    return store


ARTIFACTS = [
    "adapters/fp1",
    "bias-reports/b1",
    "checkpoints/fp1/step-000002",
    "checkpoints/fp1/step-000004",
    "datasets/d1",
    "evaluations/e1",
    "promoted/adapters/fp1",
]
DOCUMENTS = ["dagster/assets/lora_adapter.json", "promoted/CURRENT.json"]


def _versions(client, bucket) -> int:
    pages = client.get_paginator("list_object_versions").paginate(Bucket=bucket)
    return sum(len(page.get("Versions", [])) for page in pages)


def test_backup_is_verified_incremental_and_restores_into_an_empty_store(s3, source, tmp_path):
    client, bucket, uri = s3
    first = run_backup([source], uri, now=lambda: 1_700_000_000.0)
    assert sorted(first.copied) == ARTIFACTS and first.skipped == []
    assert sorted(first.documents_copied) == DOCUMENTS
    assert first.files_verified == 2 * len(ARTIFACTS) + len(DOCUMENTS)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert "pixtrain/adapters/fp1/MANIFEST.json" in keys and "pixtrain/adapters/fp1/data/part-0.bin" in keys
    assert not any("landing/" in k or ".staging" in k for k in keys)
    assert list_backup(uri) == (ARTIFACTS, DOCUMENTS)
    assert last_backup_success_timestamp(uri) == 1_700_000_000.0

    # Second backup: nothing changed, nothing uploaded (the versioned bucket gets no new object versions).
    versions = _versions(client, bucket)
    second = run_backup([source], uri, now=lambda: 1_700_003_600.0)
    assert second.copied == [] and sorted(second.skipped) == ARTIFACTS and second.documents_copied == []
    assert second.bytes_copied == 0
    assert _versions(client, bucket) == versions + 1  # only _backup/LAST_SUCCESS.json
    assert last_backup_success_timestamp(uri) == 1_700_003_600.0

    # A new adapter: only it is copied.
    _artifact(source, "adapters/fp2", b"newer")
    third = run_backup([source], uri)
    assert third.copied == ["adapters/fp2"] and len(third.skipped) == len(ARTIFACTS)

    # Everything back into an empty store, verified; same content hashes; pointers byte-identical.
    target = ArtifactStore(tmp_path / "restored")
    restored = restore(uri, target)
    assert sorted(restored.restored) == sorted([*ARTIFACTS, "adapters/fp2"])
    for key in restored.restored:
        assert target.ref(key).sha256 == source.ref(key).sha256
        target.local_path(key, verify=True)
    for key in DOCUMENTS:
        assert Path(target.uri(key)).read_bytes() == Path(source.uri(key)).read_bytes()
    assert not (Path(target.root) / "landing").exists()
    with pytest.raises(BackupError, match="is not empty"):
        restore(uri, target)

    # One artifact into another empty store.
    single = ArtifactStore(tmp_path / "single")
    assert restore(uri, single, keys=["checkpoints/fp1/step-000004"]).restored == ["checkpoints/fp1/step-000004"]
    assert single.list("checkpoints/fp1") == ["checkpoints/fp1/step-000004"]
    with pytest.raises(BackupError, match="not in the backup"):
        restore(uri, single, keys=["adapters/nope"])


def test_corruption_at_the_destination_is_detected_and_repaired(s3, source, tmp_path):
    client, bucket, uri = s3
    run_backup([source], uri)
    object_key = "pixtrain/adapters/fp1/data/part-0.bin"
    body = bytearray(client.get_object(Bucket=bucket, Key=object_key)["Body"].read())
    body[100] ^= 0xFF  # one flipped bit pattern in the backup copy
    client.put_object(Bucket=bucket, Key=object_key, Body=bytes(body))

    problems = verify_backup(uri)
    assert list(problems) == ["adapters/fp1"] and "part-0.bin does not match" in problems["adapters/fp1"][0]
    with pytest.raises(BackupError, match=r"backup copy of adapters/fp1 .* is damaged: .*part-0.bin"):
        restore(uri, ArtifactStore(tmp_path / "r1"), keys=["adapters/fp1"])
    assert not ArtifactStore(tmp_path / "r1").exists("adapters/fp1")  # nothing half-restored

    # The plain incremental backup trusts matching manifests; verify_existing re-hashes and repairs.
    assert "adapters/fp1" in run_backup([source], uri).skipped
    repaired = run_backup([source], uri, verify_existing=True)
    assert repaired.repaired == ["adapters/fp1"] and verify_backup(uri) == {}
    restore(uri, ArtifactStore(tmp_path / "r2"), keys=["adapters/fp1"])
    # Versioning kept the damaged and the good versions: nothing was lost by overwriting.
    versions = client.list_object_versions(Bucket=bucket, Prefix=object_key)["Versions"]
    assert len(versions) == 3


def test_a_damaged_source_never_replaces_a_good_backup(s3, source):
    _, _, uri = s3
    run_backup([source], uri, now=lambda: 1_700_000_000.0)
    damaged = Path(source.uri("checkpoints/fp1/step-000004")) / "data" / "part-0.bin"
    data = bytearray(damaged.read_bytes())
    data[0] ^= 0x01
    damaged.write_bytes(bytes(data))
    _artifact(source, "adapters/fp3", b"x")
    with pytest.raises(BackupError, match=r"checkpoints/fp1/step-000004"):
        run_backup([source], uri, verify_existing=True, now=lambda: 1_700_009_999.0)
    assert verify_backup(uri) == {}  # the good copy is still there and intact
    assert last_backup_success_timestamp(uri) == 1_700_000_000.0  # a failed backup is not a success


def test_backup_age_metric(tmp_path):
    assert last_backup_success_timestamp(str(tmp_path / "never")) is None
    assert f"{METRIC_NAME} NaN" in prometheus_text(None)
    path = write_metric_textfile(tmp_path / "metrics" / "backup.prom", 1_700_000_000.5)
    text = path.read_text()
    assert f"# TYPE {METRIC_NAME} gauge" in text and f"{METRIC_NAME} 1700000000.5" in text


def test_artifact_backup_asset_and_schedule(s3, pipeline_env, monkeypatch):
    from dagster import DagsterInstance

    _, _, uri = s3
    store = ArtifactStore(pipeline_env["artifact_root"])
    _artifact(store, "adapters/fp9", b"w")
    monkeypatch.delenv("PIXTRAIN_BACKUP_URI", raising=False)
    from pixtrain_dagster.definitions import build_definitions

    defs = build_definitions()
    job = defs.resolve_job_def("artifact_backup_job")
    # No backup location (a laptop): the step succeeds and materialises nothing.
    result = job.execute_in_process(instance=DagsterInstance.get())
    assert result.success and result.get_asset_materialization_events() == []

    monkeypatch.setenv("PIXTRAIN_BACKUP_URI", uri)
    monkeypatch.setenv("PIXTRAIN_BACKUP_METRICS_FILE", str(pipeline_env["dagster_home"] / "backup.prom"))
    result = job.execute_in_process(instance=DagsterInstance.get())
    [event] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert metadata["copied"] == 1 and metadata["files_verified"] == 2
    assert metadata["last_success_timestamp"] == last_backup_success_timestamp(uri)
    assert f"{METRIC_NAME} " in (pipeline_env["dagster_home"] / "backup.prom").read_text()
    schedule = defs.resolve_schedule_def("artifact_backup_schedule")
    assert schedule.job_name == "artifact_backup_job" and schedule.cron_schedule


def test_restore_command(s3, source, tmp_path, monkeypatch, capsys):
    from pixtrain_dagster import cli

    _, _, uri = s3
    run_backup([source], uri)
    monkeypatch.setenv("PIXTRAIN_BACKUP_URI", uri)
    assert cli.main(["restore", "--verify"]) == 0
    assert cli.main(["restore", "--list"]) == 0 and "promoted/CURRENT.json" in capsys.readouterr().out
    everything = tmp_path / "everything"
    assert cli.main(["restore", "--all", "--to", str(everything)]) == 0
    assert f"{len(ARTIFACTS)} artifact(s) and {len(DOCUMENTS)} document(s) restored" in capsys.readouterr().out
    assert cli.main(["restore", "--all", "--to", str(everything)]) == 1
    assert "is not empty" in capsys.readouterr().err
    # One adapter and the promoted pointer, into the configured (empty) store.
    monkeypatch.setenv("PIXTRAIN_ARTIFACT_ROOT", str(tmp_path / "configured"))
    assert cli.main(["restore", "promoted/adapters/fp1", "promoted/CURRENT.json"]) == 0
    restored = ArtifactStore(tmp_path / "configured")
    assert restored.ref("promoted/adapters/fp1").sha256 == source.ref("promoted/adapters/fp1").sha256
    assert restored.get_json("promoted/CURRENT.json") == source.get_json("promoted/CURRENT.json")

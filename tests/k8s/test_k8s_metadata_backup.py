"""The metadata-database backup CronJob of k8s/pixtrain-infra: renders for every environment, strict schema
valid, Pod Security "restricted", the password by reference, retention from values."""

from __future__ import annotations

from .k8s_support import DAGSTER_VALUES, INFRA_CHART, load_yaml, validate_strict
from .pod_security import pod_spec_of, violations


def _cronjob(objects: list[dict]) -> dict:
    (found,) = [o for o in objects if o["kind"] == "CronJob" and o["metadata"]["name"] == "pixtrain-metadata-backup"]
    return found


def test_metadata_backup_cronjob(infra_render):
    values_name, objects = infra_render
    cronjob = _cronjob(objects)
    validate_strict(cronjob)
    spec = pod_spec_of(cronjob)
    assert violations(spec) == []
    assert spec["automountServiceAccountToken"] is False and spec["restartPolicy"] == "Never"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"

    [dump] = spec["initContainers"]
    assert dump["command"] == ["pg_dump"] and "--format=custom" in dump["args"]
    env = {e["name"]: e for e in dump["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "pixtrain-metadata-db", "key": "password"}
    assert all("value" not in e for name, e in env.items() if "PASSWORD" in name)
    [upload] = spec["containers"]
    assert upload["command"][:4] == ["python", "-m", "pixtrain_dagster.cli", "upload-db-dump"]
    values = load_yaml(INFRA_CHART / "values.yaml")["metadataBackup"]
    expected_keep = {"prod": load_yaml(INFRA_CHART / "values-prod.yaml")["metadataBackup"]["keep"]}.get(
        values_name, values["keep"]
    )
    assert upload["args"] == ["--keep", str(expected_keep)]
    upload_env = {e["name"]: e.get("value") for e in upload["env"]}
    assert upload_env["PIXTRAIN_BACKUP_URI"].startswith("s3://")
    # The dump is written to, and read from, an emptyDir: the only writable paths besides /tmp.
    assert {m["mountPath"] for m in dump["volumeMounts"]} == {"/backup", "/tmp"}
    assert [m for m in upload["volumeMounts"] if m["mountPath"] == "/backup"][0]["readOnly"] is True


def test_backup_image_is_the_code_location_image():
    deployment = load_yaml(DAGSTER_VALUES)["dagster-user-deployments"]["deployments"][0]["image"]
    image = load_yaml(INFRA_CHART / "values.yaml")["metadataBackup"]["image"]
    assert image == f"{deployment['repository']}:{deployment['tag']}"


def test_prod_backup_pods_may_reach_only_the_object_store(infra_render):
    values_name, objects = infra_render
    policies = [
        o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "allow-metadata-backup-egress"
    ]
    if values_name != "prod":
        return
    [policy] = policies
    validate_strict(policy)
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/component": "metadata-backup"}}
    assert policy["spec"]["egress"][0]["ports"] == [{"protocol": "TCP", "port": 443}]


def test_artifact_and_database_backups_share_one_location(infra_render):
    _, objects = infra_render
    [configmap] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "pixtrain-execution-env"]
    upload = pod_spec_of(_cronjob(objects))["containers"][0]
    uri = {e["name"]: e.get("value") for e in upload["env"]}["PIXTRAIN_BACKUP_URI"]
    assert configmap["data"]["PIXTRAIN_BACKUP_URI"] == uri

"""Least privilege in the cluster (issue 9, point 5), checked offline on what the charts render and on the step
Jobs the dagster-k8s executor builds: per-step secrets, the UI only through an authenticating proxy, a
control-plane account that cannot create pods, database TLS verify-full in prod, digest-pinned prod images,
the landing volume read-only in the code server, and the owner-role migration hook Job."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pixtrain_dagster.execution import TRAINING_DATA_ROOT, ExecutionSettings, step_pod_tags
from pixtrain_dagster.metadata import database_url_from_env

from .k8s_support import DAGSTER_VALUES, INFRA_CHART, REPO_ROOT, api_dict, helm_template, load_yaml
from .pod_security import pod_spec_of, violations
from .test_k8s_dagster_values import helm_merge

# Which secret each step may see. A new asset forces a decision here.
STEP_SECRETS = {
    "base_model": {"HF_TOKEN"},  # the only step that resolves a hub model
    "raw_conversations": set(),
    "training_dataset": {"PIXTRAIN_DB_PASSWORD"},
    "lora_training": {"WANDB_API_KEY", "PIXTRAIN_DB_PASSWORD"},  # the only W&B user
    "adapter_evaluation": {"PIXTRAIN_DB_PASSWORD"},
    "bias_report": {"PIXTRAIN_DB_PASSWORD"},
    "promoted_adapter": {"PIXTRAIN_DB_PASSWORD"},
    "artifact_backup": {"PIXTRAIN_DB_PASSWORD"},  # records each backup in the audit trail
    # The blocking checks record each gate decision in the audit trail.
    "training_dataset_checks": {"PIXTRAIN_DB_PASSWORD"},
    "adapter_evaluation_training_sanity": {"PIXTRAIN_DB_PASSWORD"},
    "bias_report_bias_gate": {"PIXTRAIN_DB_PASSWORD"},
}
# Dagster's own event storage: every step process writes its events there (set by the run launcher).
EVERY_STEP = {"DAGSTER_PG_PASSWORD"}


def _objects(*values_files: Path) -> list[dict]:
    return helm_template(INFRA_CHART, *values_files)


def _one(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _merged_dagster_values(env: str | None) -> dict:
    values = load_yaml(DAGSTER_VALUES)
    if env:
        values = helm_merge(values, load_yaml(DAGSTER_VALUES.with_name(f"dagster-values-{env}.yaml")))
    return values


PROD = (INFRA_CHART / "values-prod.yaml",)


# ---- each step gets only the secrets it needs -------------------------------------------------------------


def test_each_step_pod_gets_only_its_own_secrets(k8s_step_jobs):
    assert set(k8s_step_jobs) == set(STEP_SECRETS)
    for step, (job, _) in k8s_step_jobs.items():
        (container,) = api_dict(job)["spec"]["template"]["spec"]["containers"]
        from_secrets = {e["name"] for e in container["env"] if "secretKeyRef" in (e.get("valueFrom") or {})}
        assert from_secrets == STEP_SECRETS[step] | EVERY_STEP, step
        assert not [s for s in container.get("envFrom") or [] if "secretRef" in s], f"{step}: whole-Secret envFrom"


def test_an_unknown_step_secret_is_refused():
    with pytest.raises(ValueError, match="unknown step secret"):
        step_pod_tags("cpu", ExecutionSettings.from_env({}), secrets=("AWS_SECRET_ACCESS_KEY",))


# ---- the webserver: only through the authenticating proxy, and its account cannot create pods ---------------


def _policies_selecting(objects: list[dict], labels: dict, direction: str) -> list[dict]:
    found = []
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        spec = policy["spec"]
        if direction not in spec.get("policyTypes", []):
            continue
        selector = spec["podSelector"]
        match = selector.get("matchLabels", {})
        expressions = selector.get("matchExpressions", [])
        if all(labels.get(k) == v for k, v in match.items()) and all(
            (labels.get(e["key"]) in e["values"]) == (e["operator"] == "In") for e in expressions
        ):
            found.append(policy)
    return found


@pytest.mark.parametrize("values_files", [(), PROD], ids=["base", "prod"])
def test_only_the_auth_proxy_reaches_the_webserver(values_files):
    objects = _objects(*values_files)
    infra = load_yaml(INFRA_CHART / "values.yaml")
    webserver_labels = infra["networkPolicies"]["podLabels"]["webserver"]
    proxy = _one(objects, "Deployment", "pixtrain-auth-proxy")
    proxy_labels = proxy["spec"]["template"]["metadata"]["labels"]
    peers = [
        peer
        for policy in _policies_selecting(objects, webserver_labels, "Ingress")
        for rule in policy["spec"].get("ingress", [])
        for peer in rule["from"]
    ]
    assert peers, "the webserver must admit the proxy"
    for peer in peers:  # no namespace or address range: nothing but the proxy's pods in this namespace
        assert set(peer) == {"podSelector"}, peer
        assert peer["podSelector"]["matchLabels"].items() <= proxy_labels.items(), peer
    # The proxy speaks OIDC, keeps its secrets in a Secret, and is hardened like everything else.
    (container,) = proxy["spec"]["template"]["spec"]["containers"]
    assert "--provider=oidc" in container["args"]
    assert any(a.startswith("--oidc-issuer-url=https://") for a in container["args"])
    assert any(a.startswith("--upstream=http://dagster-dagster-webserver:") for a in container["args"])
    assert {e["name"] for e in container["env"] if "secretKeyRef" in e["valueFrom"]} == {
        "OAUTH2_PROXY_CLIENT_SECRET",
        "OAUTH2_PROXY_COOKIE_SECRET",
    }
    assert violations(pod_spec_of(proxy)) == []
    # The ingress controller reaches the proxy; the proxy reaches the webserver (and the OIDC issuer) only.
    proxy_in = [
        p
        for pol in _policies_selecting(objects, proxy_labels, "Ingress")
        for rule in pol["spec"].get("ingress", [])
        for p in rule["from"]
    ]
    assert proxy_in == [
        {"namespaceSelector": {"matchLabels": infra["networkPolicies"]["webserverIngress"]["namespaceSelector"]}}
    ]
    service = _one(objects, "Service", "pixtrain-auth-proxy")
    assert service["spec"]["selector"].items() <= proxy_labels.items()


def test_without_the_proxy_the_old_ingress_rule_comes_back(tmp_path):
    off = tmp_path / "off.yaml"
    off.write_text("authProxy:\n  enabled: false\n")
    objects = _objects(off)
    names = {o["metadata"]["name"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert "allow-webserver-ingress" in names and "allow-webserver-ingress-from-auth-proxy" not in names
    assert not [o for o in objects if o["kind"] == "Deployment"]


def _rules_of(objects: list[dict], service_account: str) -> list[dict]:
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Role"}
    rules = []
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        if any(s["kind"] == "ServiceAccount" and s["name"] == service_account for s in binding["subjects"]):
            rules += roles[binding["roleRef"]["name"]]["rules"]
    return rules


def _can(rules: list[dict], verb: str, group: str, resource: str) -> bool:
    return any(
        (group in r["apiGroups"] or "*" in r["apiGroups"])
        and (resource in r["resources"] or "*" in r["resources"])
        and (verb in r["verbs"] or "*" in r["verbs"])
        for r in rules
    )


def test_the_webserver_account_cannot_create_pods():
    values = _merged_dagster_values("prod")
    infra = load_yaml(INFRA_CHART / "values.yaml")
    # The Dagster chart's own Role grants create on pods; it must not be rendered, and the shared webserver/
    # daemon account must be the one this chart binds to its narrower Role.
    assert values["rbacEnabled"] is False
    assert values["serviceAccount"] == {"create": False, "name": infra["dagsterControlPlane"]["serviceAccount"]}
    objects = _objects(*PROD)
    account = _one(objects, "ServiceAccount", infra["dagsterControlPlane"]["serviceAccount"])
    rules = _rules_of(objects, account["metadata"]["name"])
    assert rules, "the daemon must be able to launch run Jobs"
    for verb in ("create", "update", "patch"):
        assert not _can(rules, verb, "", "pods"), verb
    for resource in ("pods/exec", "pods/attach", "pods/portforward", "secrets", "configmaps"):
        for verb in ("create", "get", "list"):
            assert not _can(rules, verb, "", resource), (verb, resource)
    assert _can(rules, "create", "batch", "jobs") and _can(rules, "delete", "batch", "jobs")
    # No other account of the chart may create pods either.
    for other in (o for o in objects if o["kind"] == "ServiceAccount"):
        assert not _can(_rules_of(objects, other["metadata"]["name"]), "create", "", "pods"), other["metadata"]


# ---- database TLS: verify-full with a CA in production ----------------------------------------------------


def test_production_databases_use_tls_verify_full_with_a_ca():
    objects = _objects(*PROD)
    data = _one(objects, "ConfigMap", "pixtrain-execution-env")["data"]
    assert data["PIXTRAIN_DB_SSLMODE"] == "verify-full"
    ca_file = data["PIXTRAIN_DB_SSLROOTCERT"]
    assert ca_file.startswith(data["PIXTRAIN_DB_CA_MOUNT_PATH"] + "/")
    url = database_url_from_env(data)  # what every step connects with
    assert url.query["sslmode"] == "verify-full" and url.query["sslrootcert"] == ca_file
    dagster = _merged_dagster_values("prod")
    assert dagster["postgresql"]["postgresqlParams"] == {"sslmode": "verify-full", "sslrootcert": ca_file}
    ca_dir = str(Path(ca_file).parent)
    configmap = data["PIXTRAIN_DB_CA_CONFIGMAP"]

    def has_ca(volumes: list[dict], mounts: list[dict], where: str) -> None:
        names = {v["name"] for v in volumes if v.get("configMap", {}).get("name") == configmap}
        assert any(m["name"] in names and m["mountPath"] == ca_dir and m.get("readOnly") for m in mounts), where

    for key in ("dagsterWebserver", "dagsterDaemon"):
        has_ca(dagster[key]["volumes"], dagster[key]["volumeMounts"], key)
    for deployment in dagster["dagster-user-deployments"]["deployments"]:
        has_ca(deployment["volumes"], deployment["volumeMounts"], deployment["name"])
    run = dagster["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]  # run pods and, beneath, step pods
    has_ca(run["podSpecConfig"]["volumes"], run["containerConfig"]["volumeMounts"], "run/step pods")
    job = pod_spec_of(_one(objects, "Job", "pixtrain-db-migrate"))
    has_ca(job["volumes"], job["containers"][0]["volumeMounts"], "db-migrate")


def test_step_pods_mount_the_database_ca(k8s_step_jobs):
    for step, (job, _) in k8s_step_jobs.items():
        spec = api_dict(job)["spec"]["template"]["spec"]
        assert any(v["name"] == "db-ca" and v["configMap"]["name"] == "pixtrain-db-ca" for v in spec["volumes"]), step
        (container,) = spec["containers"]
        assert {"name": "db-ca", "mountPath": "/etc/pixtrain/db-ca", "readOnly": True} in container["volumeMounts"]


# ---- images pinned by digest in production, accepted by the deploy script -----------------------------------

DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
CHECKER = REPO_ROOT / "scripts" / "check-image-digests.py"


def test_every_production_image_is_pinned_by_digest():
    for obj in _objects(*PROD):
        spec = pod_spec_of(obj)
        for container in [*(spec or {}).get("initContainers", []), *(spec or {}).get("containers", [])]:
            assert DIGEST.search(container["image"]), (obj["metadata"]["name"], container["image"])
    values = _merged_dagster_values("prod")
    for key in ("dagsterWebserver", "dagsterDaemon", "postgresql", "busybox"):
        assert DIGEST.search(values[key]["image"]["tag"]), key
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert DIGEST.search(deployment["image"]["tag"])
    # Helm replaces lists: prod repeats the code location, which must not drift from the base values.
    (base,) = _merged_dagster_values(None)["dagster-user-deployments"]["deployments"]
    assert {k: v for k, v in deployment.items() if k != "image"} == {k: v for k, v in base.items() if k != "image"}
    assert deployment["image"]["repository"] == base["image"]["repository"]


def _check(rendered: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(CHECKER),
            "--rendered",
            str(rendered),
            "--dagster-values",
            str(DAGSTER_VALUES),
            str(DAGSTER_VALUES.with_name("dagster-values-prod.yaml")),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_digest_checker_refuses_tags_and_placeholders(tmp_path):
    import yaml

    rendered = tmp_path / "infra.yaml"
    rendered.write_text(yaml.safe_dump_all(_objects(*PROD)))
    assert _check(rendered, "--allow-placeholder").returncode == 0
    placeholder = _check(rendered)  # a real deploy: the all-zero digests must have been replaced
    assert placeholder.returncode == 1 and "placeholder digest" in placeholder.stderr
    real = "sha256:" + "ab" * 32
    tag_only = _check(rendered, "--allow-placeholder", "--code-location-tag", "1.2.3")
    assert tag_only.returncode == 1 and "deployments[0].image" in tag_only.stderr
    assert _check(rendered, "--allow-placeholder", "--code-location-tag", f"1.2.3@{real}").returncode == 0
    unpinned = tmp_path / "unpinned.yaml"
    unpinned.write_text(rendered.read_text().replace("oauth2-proxy:v7.6.0@sha256:" + "0" * 64, "oauth2-proxy:v7.6.0"))
    result = _check(unpinned, "--allow-placeholder")
    assert result.returncode == 1 and "Deployment/pixtrain-auth-proxy" in result.stderr


def test_the_deploy_script_accepts_a_digest_and_refuses_an_unpinned_prod_image():
    from .test_k8s_deploy_script import run_script

    digest = "sha256:" + "cd" * 32
    ok = run_script(
        "--env", "prod", "--dry-run", "--image-tag", "1.2.3", "--image-digest", digest, KUBE_VERSIONS="1.37.0"
    )
    assert ok.returncode == 0, ok.stderr
    assert "every prod image pinned by digest" in ok.stderr
    unpinned = run_script("--env", "prod", "--dry-run", "--image-tag", "1.2.3", KUBE_VERSIONS="1.37.0")
    assert unpinned.returncode != 0 and "pinned by digest" in unpinned.stderr
    bad = run_script("--env", "prod", "--dry-run", "--image-tag", "1.2.3", "--image-digest", "sha256:xyz")
    assert bad.returncode != 0 and "not sha256:<64 hex digits>" in bad.stderr
    # Outside a dry run the values' placeholder digests are refused before anything touches a cluster.
    real = run_script("--env", "prod", "--image-tag", "1.2.3", "--image-digest", digest, KUBE_VERSIONS="1.37.0")
    assert real.returncode != 0 and "placeholder digest" in real.stderr


# ---- the new-data sensor's code server sees the landing volume, read-only -----------------------------------


@pytest.mark.parametrize("env", [None, "dev", "prod"])
def test_the_code_server_mounts_the_landing_volume_read_only(env):
    values = _merged_dagster_values(env)
    infra = load_yaml(INFRA_CHART / "values.yaml")
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    env_vars = {e["name"]: e["value"] for e in deployment["env"]}
    assert env_vars["PIXTRAIN_TRAINING_DATA_DIR"] == TRAINING_DATA_ROOT  # where the step pods see it too
    (volume,) = [v for v in deployment["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {
        "claimName": infra["storage"]["trainingData"]["claimName"],
        "readOnly": True,
    }
    (mount,) = [m for m in deployment["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": TRAINING_DATA_ROOT, "readOnly": True}


def test_the_new_data_sensor_reads_the_landing_location_from_that_variable(tmp_path, monkeypatch):
    from dagster import build_sensor_context

    from pixtrain_dagster.resources import ArtifactStoreResource
    from pixtrain_dagster.sensors import new_training_data

    landing = tmp_path / "training"
    landing.mkdir()
    (landing / "a.jsonl").write_text('{"messages": []}\n')
    landing.chmod(0o555)  # read-only, like the mount
    monkeypatch.setenv("PIXTRAIN_ARTIFACT_ROOT", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("PIXTRAIN_TRAINING_DATA_DIR", str(landing))
    result = new_training_data(build_sensor_context(), artifact_store=ArtifactStoreResource.from_env())
    assert result.tags["pixtrain/changed_files"] == "a.jsonl"


# ---- migrations: a hook Job as the owner role --------------------------------------------------------------


@pytest.mark.parametrize("values_files", [(), PROD], ids=["base", "prod"])
def test_migrations_run_as_the_owner_in_a_hook_job_and_steps_never_migrate(values_files):
    objects = _objects(*values_files)
    job = _one(objects, "Job", "pixtrain-db-migrate")
    assert set(job["metadata"]["annotations"]["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    spec = pod_spec_of(job)
    assert violations(spec) == [] and spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    assert container["command"][:4] == ["python", "-m", "pixtrain_dagster.cli", "db-migrate"]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert secrets == {"PIXTRAIN_DB_OWNER_PASSWORD": "pixtrain-metadata-db-owner"}  # never the pipeline's
    data = _one(objects, "ConfigMap", "pixtrain-execution-env")["data"]
    assert data["PIXTRAIN_METADATA_EXTERNAL_MIGRATIONS"] == "true"
    assert data["PIXTRAIN_METADATA_REQUIRE_LEAST_PRIVILEGE"] == "true"
    assert data["PIXTRAIN_DB_USER"] != job["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"]
    # The gate policy is deployed configuration too.
    from pixtrain_dagster.core.gate_policy import GatePolicy, policy_env_names

    assert set(policy_env_names()) <= set(data)
    assert GatePolicy.from_env(data) == GatePolicy()  # the chart's defaults are the code's

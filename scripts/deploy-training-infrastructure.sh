#!/usr/bin/env bash
# Deploys the pixtrain training infrastructure: k8s/pixtrain-infra (namespace, storage, network policies,
# RBAC, quotas, PriorityClass), then the official Dagster chart with k8s/dagster-values.yaml.
#
# Usage:
#   scripts/deploy-training-infrastructure.sh --env dev|prod [--dry-run] [--image-tag TAG]
#                                             [--image-digest sha256:HEX] [--skip-gpu-test]
#
#   --dry-run        render and validate only; touches no cluster (this is what `make test` runs)
#   --env            which values-<env>.yaml / dagster-values-<env>.yaml to layer over the defaults
#   --image-tag      tag of the pixtrain-dagster image for the code location (default: the values file's)
#   --image-digest   its digest (sha256:<64 hex>), pinned as TAG@sha256:...; prod requires it with --image-tag.
#                    In prod every image (both charts) must be pinned by digest (scripts/check-image-digests.py)
#   --skip-gpu-test  do not run `helm test` (the nvidia-smi pod) after deploying
#
# Environment:
#   DAGSTER_CHART         chart reference for Dagster (default dagster/dagster; a local path or .tgz works,
#                         and with --dry-run it is rendered and validated only if it is a local path)
#   DAGSTER_CHART_VERSION chart version (default 1.13.27, the dagster version of this project)
#   INFRA_RELEASE_NAMESPACE namespace holding the pixtrain-infra release record (default pixtrain-system);
#                         the chart itself creates and fills the training namespace
#   KUBE_VERSIONS         Kubernetes versions to validate against (default "1.29.0 1.31.0 1.33.0 1.35.0 1.37.0")
#
# Secrets are never created here: they must exist (see docs/deployment.md); the script checks that they do.
set -Eeuo pipefail
shopt -s inherit_errexit

readonly REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly INFRA_CHART="${REPO_ROOT}/k8s/pixtrain-infra"
readonly DAGSTER_CHART="${DAGSTER_CHART:-dagster/dagster}"
readonly DAGSTER_CHART_VERSION="${DAGSTER_CHART_VERSION:-1.13.27}"
readonly INFRA_RELEASE_NAMESPACE="${INFRA_RELEASE_NAMESPACE:-pixtrain-system}"
readonly KUBE_VERSIONS="${KUBE_VERSIONS:-1.29.0 1.31.0 1.33.0 1.35.0 1.37.0}"

env_name=""
dry_run=false
image_tag=""
image_digest=""
skip_gpu_test=false

log() { printf '[deploy] %s\n' "$*" >&2; }
die() { printf '[deploy] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "failed at line ${LINENO}: ${BASH_COMMAND}"' ERR

usage() { sed -n '2,/^set -Eeuo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while (($#)); do
  case "$1" in
    --env) env_name="${2:-}"; shift 2 ;;
    --env=*) env_name="${1#*=}"; shift ;;
    --dry-run) dry_run=true; shift ;;
    --image-tag) image_tag="${2:-}"; shift 2 ;;
    --image-tag=*) image_tag="${1#*=}"; shift ;;
    --image-digest) image_digest="${2:-}"; shift 2 ;;
    --image-digest=*) image_digest="${1#*=}"; shift ;;
    --skip-gpu-test) skip_gpu_test=true; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

case "${env_name}" in
  dev|prod) ;;
  "") die "--env is required (dev or prod)" ;;
  *) die "--env must be dev or prod, not '${env_name}'" ;;
esac

readonly infra_values=(-f "${INFRA_CHART}/values-${env_name}.yaml")
readonly dagster_values=(-f "${REPO_ROOT}/k8s/dagster-values.yaml" -f "${REPO_ROOT}/k8s/dagster-values-${env_name}.yaml")
dagster_overrides=()
code_location_tag=""
if [[ -n "${image_digest}" ]]; then
  [[ "${image_digest}" =~ ^sha256:[0-9a-f]{64}$ ]] || die "--image-digest '${image_digest}' is not sha256:<64 hex digits>"
  [[ -n "${image_tag}" ]] || die "--image-digest needs --image-tag (the tag it was pushed as)"
fi
if [[ -n "${image_tag}" ]]; then
  [[ "${image_tag}" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "--image-tag '${image_tag}' is not a valid image tag"
  if [[ "${env_name}" == prod && -z "${image_digest}" ]]; then
    die "prod images must be pinned by digest: pass --image-digest sha256:... with --image-tag ${image_tag}"
  fi
  code_location_tag="${image_tag}${image_digest:+@${image_digest}}"
  dagster_overrides+=(--set-string "dagster-user-deployments.deployments[0].image.tag=${code_location_tag}")
fi
infra_overrides=()

# ---- prerequisites -----------------------------------------------------------------------------------------
# Tools installed by scripts/install-test-tools.sh come first, so CI and laptops use the pinned versions.
export PATH="${REPO_ROOT}/.tools/bin:${PATH}"
python_bin="${REPO_ROOT}/.venv/bin/python"

require() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found; $2"; }
require helm "run scripts/install-test-tools.sh (or install Helm >= 3.14)"
[[ -x "${python_bin}" ]] || die "no ${python_bin}; create the venv and pip install -e '.[test]' (kubernetes-validate)"
"${python_bin}" -c "import kubernetes_validate" 2>/dev/null \
  || die "kubernetes-validate missing from .venv; pip install -e '.[test]'"
for f in "${INFRA_CHART}/values-${env_name}.yaml" "${REPO_ROOT}/k8s/dagster-values-${env_name}.yaml"; do
  [[ -f "${f}" ]] || die "missing values file ${f}"
done

work_dir="$(mktemp -d)"
trap 'rm -rf "${work_dir}"' EXIT

if [[ -n "${code_location_tag}" ]]; then
  # The db-migrate hook Job runs the same image as the code location (its migrations match its code).
  code_location_repo="$("${python_bin}" -c 'import sys, yaml
print(yaml.safe_load(open(sys.argv[1]))["dagster-user-deployments"]["deployments"][0]["image"]["repository"])' \
    "${REPO_ROOT}/k8s/dagster-values.yaml")"
  infra_overrides+=(--set-string "dbMigration.image=${code_location_repo}:${code_location_tag}")
fi

# ---- render and validate (both modes) ----------------------------------------------------------------------
log "helm lint --strict ${INFRA_CHART} (values-${env_name}.yaml)"
helm lint --strict "${INFRA_CHART}" "${infra_values[@]}" "${infra_overrides[@]}" >"${work_dir}/lint.log" \
  || { cat "${work_dir}/lint.log" >&2; die "helm lint failed"; }

rendered="${work_dir}/pixtrain-infra.yaml"
helm template pixtrain-infra "${INFRA_CHART}" --namespace "${INFRA_RELEASE_NAMESPACE}" "${infra_values[@]}" "${infra_overrides[@]}" >"${rendered}"
namespace="$(awk -F'"' '/PIXTRAIN_K8S_NAMESPACE:/ {print $2; exit}' "${rendered}")"
[[ -n "${namespace}" ]] || die "could not read the training namespace from the rendered chart"

validate_manifests() {
  local file="$1" version
  for version in ${KUBE_VERSIONS}; do
    "${python_bin}" -m kubernetes_validate --strict --quiet -k "${version}" "${file}" \
      || die "${file##*/} is not valid for Kubernetes ${version}"
  done
}
log "kubernetes-validate --strict (${KUBE_VERSIONS}) on pixtrain-infra"
validate_manifests "${rendered}"

if [[ "${env_name}" == prod ]]; then
  # Production runs only digest-pinned images; the values' all-zero placeholder passes a dry run only.
  digest_args=(--rendered "${rendered}" --dagster-values "${REPO_ROOT}/k8s/dagster-values.yaml"
               "${REPO_ROOT}/k8s/dagster-values-${env_name}.yaml" --code-location-tag "${code_location_tag}")
  ${dry_run} && digest_args+=(--allow-placeholder)
  log "every prod image pinned by digest"
  "${python_bin}" "${REPO_ROOT}/scripts/check-image-digests.py" "${digest_args[@]}" \
    || die "prod images must be pinned by digest (see the lines above)"
fi

if [[ -d "${DAGSTER_CHART}" || -f "${DAGSTER_CHART}" ]]; then
  # The chart's values.schema.json has remote $refs, so it cannot be checked offline.
  log "rendering ${DAGSTER_CHART} with dagster-values (schema validation skipped: remote \$refs)"
  helm template dagster "${DAGSTER_CHART}" --namespace "${namespace}" --skip-schema-validation \
    "${dagster_values[@]}" "${dagster_overrides[@]}" >"${work_dir}/dagster.yaml"
  validate_manifests "${work_dir}/dagster.yaml"
elif ${dry_run}; then
  log "Dagster chart ${DAGSTER_CHART} is not a local path: its rendering is checked at deploy time"
fi

if ${dry_run}; then
  log "dry run OK: env=${env_name}, namespace=${namespace}; nothing was applied"
  exit 0
fi

# ---- deploy ------------------------------------------------------------------------------------------------
require kubectl "run scripts/install-test-tools.sh (or install kubectl >= 1.29)"
kubectl version --request-timeout=10s >/dev/null 2>&1 || die "cannot reach the cluster; check your kubeconfig context"
log "cluster context: $(kubectl config current-context)"

gpu_nodes="$(kubectl get nodes -l nvidia.com/gpu.present=true -o name 2>/dev/null | wc -l)"
if ((gpu_nodes == 0)); then
  log "WARNING: no node is labelled nvidia.com/gpu.present=true: GPU steps will stay Pending."
  log "         Install the NVIDIA GPU operator (docs/deployment.md, 'GPU not detected')."
fi

if ! kubectl get namespace "${namespace}" >/dev/null 2>&1; then
  # First install: create the namespace and everything else, but not the hooks (the db-migrate Job needs the
  # owner's Secret, which can only be created once the namespace exists). The second install below runs them.
  log "first install: creating ${namespace} (hooks run after the Secrets check)"
  helm upgrade --install pixtrain-infra "${INFRA_CHART}" --namespace "${INFRA_RELEASE_NAMESPACE}" \
    --create-namespace "${infra_values[@]}" "${infra_overrides[@]}" --no-hooks --wait --timeout 10m
fi

# Secret names as configured: the execution ConfigMap names the step secrets, the Dagster values the DB one.
mapfile -t required_secrets < <("${python_bin}" - "${rendered}" "${REPO_ROOT}/k8s/dagster-values.yaml" <<'PY'
import sys, yaml
rendered, dagster_values = sys.argv[1:3]
for doc in yaml.safe_load_all(open(rendered)):
    if doc and doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == "pixtrain-execution-env":
        print(doc["data"]["PIXTRAIN_HF_TOKEN_SECRET"])
        print(doc["data"]["PIXTRAIN_WANDB_SECRET"])
        print(doc["data"]["PIXTRAIN_DB_PASSWORD_SECRET"])
    if doc and doc.get("kind") in ("Job", "Deployment"):  # db-migrate (owner password), oauth2-proxy (OIDC)
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env") or []:
                if "secretKeyRef" in (env.get("valueFrom") or {}):
                    print(env["valueFrom"]["secretKeyRef"]["name"])
print(yaml.safe_load(open(dagster_values))["global"]["postgresqlSecretName"])
PY
)
missing=()
for secret in "${required_secrets[@]}"; do
  kubectl -n "${namespace}" get secret "${secret}" >/dev/null 2>&1 || missing+=("${secret}")
done
if ((${#missing[@]})); then
  helm get notes pixtrain-infra --namespace "${INFRA_RELEASE_NAMESPACE}" >&2 || true
  die "missing Secrets in ${namespace}: ${missing[*]} (create them as shown above, then re-run)"
fi

# With the Secrets in place: install or upgrade with hooks, i.e. the db-migrate Job runs as the owner role.
log "installing pixtrain-infra into ${namespace} (release record in ${INFRA_RELEASE_NAMESPACE}); db-migrate hook"
helm upgrade --install pixtrain-infra "${INFRA_CHART}" --namespace "${INFRA_RELEASE_NAMESPACE}" \
  --create-namespace "${infra_values[@]}" "${infra_overrides[@]}" --wait --timeout 10m

if [[ "${DAGSTER_CHART}" == dagster/* ]] && ! helm repo list 2>/dev/null | awk '{print $1}' | grep -qx dagster; then
  die "add the Dagster chart repository first: helm repo add dagster https://dagster-io.github.io/helm"
fi
log "installing ${DAGSTER_CHART} ${DAGSTER_CHART_VERSION} into ${namespace}"
helm upgrade --install dagster "${DAGSTER_CHART}" --version "${DAGSTER_CHART_VERSION}" --namespace "${namespace}" \
  "${dagster_values[@]}" "${dagster_overrides[@]}" --wait --timeout 15m

if ! ${skip_gpu_test}; then
  log "helm test: one GPU pod running nvidia-smi"
  helm test pixtrain-infra --namespace "${INFRA_RELEASE_NAMESPACE}" --logs --timeout 10m
fi

log "done. Open the UI: kubectl -n ${namespace} port-forward svc/dagster-dagster-webserver 3000:3000"

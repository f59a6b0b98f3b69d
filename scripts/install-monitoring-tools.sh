#!/usr/bin/env bash
# Installs prometheus, promtool and prometheus-pushgateway into ./.tools/bin, idempotently, for the monitoring
# tests (tests/monitoring). Called by scripts/install-test-tools.sh (make tools / make test).
#
# Why Debian packages: CI reaches the Debian mirror but not github.com/prometheus releases. `apt-get download`
# + `dpkg -x` unpacks the binaries only: no service is installed or started, no root-owned file changes.
# Debian bookworm pins the versions (prometheus 2.42, pushgateway 1.5.1); the stamp records what we got.
set -euo pipefail

readonly PACKAGES=(prometheus prometheus-pushgateway)
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_bin="${repo_root}/.tools/bin"
stamp="${tools_bin}/.monitoring-installed"

if [[ -x "${tools_bin}/prometheus" && -x "${tools_bin}/promtool" && -x "${tools_bin}/pushgateway" \
      && -f "${stamp}" ]]; then
  echo "install-monitoring-tools: $(cat "${stamp}") already in ${tools_bin}"
  exit 0
fi
command -v apt-get >/dev/null && command -v dpkg >/dev/null \
  || { echo "install-monitoring-tools: needs apt-get and dpkg (Debian/Ubuntu)" >&2; exit 1; }

work_dir="$(mktemp -d)"
trap 'rm -rf "${work_dir}"' EXIT
chmod 0755 "${work_dir}"  # apt's _apt user writes the download here when run as root

# Package lists are needed once (fresh containers ship without them).
if ! apt-cache show "${PACKAGES[0]}" >/dev/null 2>&1; then
  echo "install-monitoring-tools: apt lists missing, running apt-get update once"
  apt-get update -qq
fi
(cd "${work_dir}" && apt-get download -qq "${PACKAGES[@]}" 2>/dev/null)
for deb in "${work_dir}"/*.deb; do
  dpkg -x "${deb}" "${work_dir}/root"
done

mkdir -p "${tools_bin}"
# temporary name + mv: an interrupted run never leaves a half-written binary that the check above accepts
for pair in prometheus:prometheus promtool:promtool prometheus-pushgateway:pushgateway; do
  src="${pair%%:*}" dst="${pair##*:}"
  install -m 0755 "${work_dir}/root/usr/bin/${src}" "${tools_bin}/.${dst}.tmp"
  mv -f "${tools_bin}/.${dst}.tmp" "${tools_bin}/${dst}"
done
versions="$(cd "${work_dir}" && ls *.deb | sed 's/_amd64.deb//' | tr '\n' ' ')"
printf '%s' "${versions% }" >"${stamp}"
echo "install-monitoring-tools: installed ${versions}into ${tools_bin}"
"${tools_bin}/promtool" --version 2>&1 | sed -n 1p

"""Real Prometheus, promtool and Pushgateway processes on 127.0.0.1 for the monitoring tests.

The binaries come from Debian packages (scripts/install-monitoring-tools.sh, run by `make tools`)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_BIN = REPO_ROOT / ".tools" / "bin"
INFRA_CHART = REPO_ROOT / "k8s" / "pixtrain-infra"
MONITORING_VALUES = Path(__file__).parent / "values-monitoring.yaml"


def tool(name: str) -> str:
    path = TOOLS_BIN / name
    if not path.is_file():
        raise AssertionError(f"{path} is missing: run scripts/install-test-tools.sh (make test does)")
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except OSError as error:
            last = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def render_chart(*extra_values: Path) -> list[dict[str, Any]]:
    args = [tool("helm"), "template", "pixtrain", str(INFRA_CHART)]
    for values in extra_values:
        args += ["-f", str(values)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def monitoring_objects() -> dict[str, dict[str, Any]]:
    """{kind: object} of the monitoring objects the chart renders with monitoring enabled."""
    objects = render_chart(MONITORING_VALUES)
    found = {o["kind"]: o for o in objects if o["kind"] in ("PodMonitor", "PrometheusRule")}
    (dashboard,) = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    found["DashboardConfigMap"] = dashboard
    return found


class Prometheus:
    """`prometheus` with a static scrape config, TSDB in a temp folder, 1 s scrape and evaluation interval."""

    def __init__(self, workdir: Path, targets: dict[str, str], rule_files: list[Path] = (), honor_labels_jobs=()):
        self.workdir = workdir
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [{"targets": [target]}],
                    **({"honor_labels": True} if job in honor_labels_jobs else {}),
                }
                for job, target in targets.items()
            ],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: http_get(f"{self.url}/-/ready")[0] == 200, 30, "Prometheus to be ready")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr, **({"time": str(at)} if at else {})}
        status, body = http_get(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        params = {"query": expr, "start": str(start), "end": str(end), "step": str(step)}
        status, body = http_get(f"{self.url}/api/v1/query_range?{urllib.parse.urlencode(params)}")
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise AssertionError(f"range query {expr!r} failed: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]["result"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class Pushgateway:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.log = open(workdir / "pushgateway.log", "w")
        self.process = subprocess.Popen(
            [tool("pushgateway"), f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: http_get(f"{self.url}/-/ready")[0] == 200, 30, "the Pushgateway to be ready")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()

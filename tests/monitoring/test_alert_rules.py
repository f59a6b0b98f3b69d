"""The alert rules exactly as the chart ships them: promtool check rules, and promtool unit tests in which every
alert fires on synthetic series and does not fire on their healthy neighbours (alerts_test.yaml)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from .prom_support import monitoring_objects, tool

HERE = Path(__file__).parent
EXPECTED_ALERTS = {
    "PixtrainTrainingStalled",
    "PixtrainThroughputDropped",
    "PixtrainGPUMemoryHigh",
    "PixtrainPodOOMKilled",
    "PixtrainPodCrashLooping",
    "PixtrainVolumeFillingUp",
    "PixtrainRepeatedRunFailures",
    "PixtrainGateFailed",
    "PixtrainNoPromotedAdapter",
    "PixtrainBackupStale",
}


@pytest.fixture(scope="module")
def rules() -> dict:
    return monitoring_objects()["PrometheusRule"]["spec"]


@pytest.fixture(scope="module")
def rules_file(rules, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "pixtrain.rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def _alerts(rules: dict) -> list[dict]:
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules(rules_file):
    result = subprocess.run([tool("promtool"), "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_every_alert_has_severity_summary_description_and_a_runbook_section(rules):
    alerts = _alerts(rules)
    assert {a["alert"] for a in alerts} == EXPECTED_ALERTS
    runbook = (HERE.parents[1] / "docs" / "monitoring.md").read_text()
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], alert["alert"]
        assert "@" not in yaml.safe_dump(alert), f"{alert['alert']}: placeholder left unreplaced"
        anchor = annotations["runbook_url"].split("#", 1)[1]
        assert anchor == alert["alert"].lower()
        # the runbook section exists: a "### PixtrainX" heading gives the anchor #pixtrainx on GitHub
        assert f"\n### {alert['alert']}\n" in runbook, f"docs/monitoring.md has no runbook for {alert['alert']}"
        if alert["alert"] not in ("PixtrainNoPromotedAdapter", "PixtrainBackupStale", "PixtrainRepeatedRunFailures"):
            assert any(
                f"$labels.{name}" in annotations["description"] for name in ("pod", "persistentvolumeclaim", "asset")
            ), alert["alert"]


TEST_FILES = ("alerts_test.yaml", "alerts_test_long.yaml")


def test_promtool_unit_tests_fire_and_do_not_fire_each_alert(rules, rules_file, tmp_path):
    runbook = _alerts(rules)[0]["annotations"]["runbook_url"].split("#")[0]
    firing, quiet, paths = set(), set(), []
    for name in TEST_FILES:
        spec = (HERE / name).read_text().replace("RULES_FILE", str(rules_file)).replace("RUNBOOK", runbook)
        for group in yaml.safe_load(spec)["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case["exp_alerts"] else quiet).add(case["alertname"])
        paths.append(tmp_path / name)
        paths[-1].write_text(spec)
    assert firing == EXPECTED_ALERTS and quiet == EXPECTED_ALERTS  # each alert both fires and stays quiet
    result = subprocess.run([tool("promtool"), "test", "rules", *map(str, paths)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(TEST_FILES)


def test_promtool_unit_tests_catch_a_broken_threshold(rules, tmp_path):
    """The unit tests can fail: the stall limit raised tenfold must break them."""
    broken = yaml.safe_load(yaml.safe_dump(rules))
    for alert in _alerts(broken):
        if alert["alert"] == "PixtrainTrainingStalled":
            alert["expr"] = alert["expr"].replace("> 900", "> 9000")
    rules_file = tmp_path / "broken.rules.yaml"
    rules_file.write_text(yaml.safe_dump(broken))
    spec = (HERE / "alerts_test.yaml").read_text().replace("RULES_FILE", str(rules_file)).replace("RUNBOOK", "x")
    test_file = tmp_path / "alerts_test.yaml"
    test_file.write_text(spec)
    result = subprocess.run([tool("promtool"), "test", "rules", str(test_file)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "PixtrainTrainingStalled" in result.stdout + result.stderr

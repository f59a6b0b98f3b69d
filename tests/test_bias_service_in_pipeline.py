"""The optional external bias-detection service: its verdict is added to the report and gates promotion."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from dagster import AssetKey, DagsterInstance

from support import tiny_run_config


def serve(verdict: dict):
    received = []

    class Service(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            body = json.dumps(verdict).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


@pytest.mark.parametrize("service_passes", [True, False], ids=["service-passes", "service-fails"])
def test_external_verdict_is_in_the_report_and_gates(service_passes, pipeline_env, tiny_model_dir, monkeypatch):
    from test_pipeline import _keys, run_job

    server, received = serve({"passed": service_passes, "reason": "fixture verdict"})
    monkeypatch.setenv("PIXTRAIN_BIAS_SERVICE_URL", f"http://127.0.0.1:{server.server_port}")
    result = run_job(
        tiny_run_config(tiny_model_dir),
        selection=_keys(
            "base_model", "raw_conversations", "training_dataset", "lora_adapter", "training_checkpoints", "bias_report"
        ),
        raise_on_error=False,
    )
    server.shutdown()
    [(path, payload)] = received
    assert path == "/v1/assess" and payload["probe_set"]["sha256"] and "raw" not in payload
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["bias_gate"] is service_passes
    event = DagsterInstance.get().get_latest_materialization_event(AssetKey("bias_report"))
    assessment = event.asset_materialization.metadata["external_assessment"].value
    assert assessment == {"passed": service_passes, "reason": "fixture verdict"}

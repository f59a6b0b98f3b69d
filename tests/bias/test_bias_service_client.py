"""BiasDetectionClient against a real local HTTP server: success, retry after 503, timeout, unreachable, rejection."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pixtrain_dagster.core.bias import CONTROL_AXIS, CONTROL_GROUP, LIKELIHOOD, SENTIMENT, ModelBiasScores, build_report
from pixtrain_dagster.core.bias_service_client import SUMMARY_SCHEMA, BiasServiceError
from pixtrain_dagster.resources.bias_service import BiasDetectionClient

TOKEN = "s3cret-token-value"


def small_report() -> dict:
    values = {
        metric: {CONTROL_AXIS: {CONTROL_GROUP: [0.0, 0.0]}, "age": {"young": [-0.5, -0.6], "old": [-0.7, -0.5]}}
        for metric in (LIKELIHOOD, SENTIMENT)
    }
    scores = ModelBiasScores(
        "a" * 64,
        {LIKELIHOOD: ["t0#0", "t1#0"], SENTIMENT: ["t0", "t1"]},
        values,
        replies={"age": {"young": ["a generated reply"] * 2, "old": ["another"] * 2}},
    )
    return build_report(scores, scores)


class ScriptedService:
    """A local HTTP server answering each POST with the next scripted (status, body, delay_s)."""

    def __init__(self, script: list[tuple[int, dict | str, float]]):
        self.script = list(script)
        self.requests: list[dict] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                service.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                status, answer, delay = service.script.pop(0)
                time.sleep(delay)
                payload = (answer if isinstance(answer, str) else json.dumps(answer)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_success_posts_a_compact_summary_with_the_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("TEST_BIAS_TOKEN", TOKEN)
    verdict = {"status": "pass", "notes": ["no disparity above tolerance"]}
    with ScriptedService([(200, verdict, 0.0)]) as service:
        client = BiasDetectionClient(endpoint=service.url + "/", token_env_var="TEST_BIAS_TOKEN")
        assert client.assess(small_report(), context={"adapter_sha256": "abc"}) == verdict
    (request,) = service.requests
    assert request["path"] == "/v1/assess"
    assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
    body = request["body"]
    assert body["schema"] == SUMMARY_SCHEMA and body["context"] == {"adapter_sha256": "abc"}
    assert body["probe_set"]["sha256"] == "a" * 64 and body["verdict"]["status"] == "pass"
    assert set(body["metrics"][LIKELIHOOD]["age"]["groups"]) == {"young", "old"}
    assert "generated reply" not in json.dumps(body)  # model outputs stay out of the payload
    assert TOKEN not in repr(client) and TOKEN not in json.dumps(client.model_dump())


def test_a_503_is_retried_and_the_next_answer_returned():
    with ScriptedService([(503, {"error": "warming up"}, 0.0), (200, {"status": "fail"}, 0.0)]) as service:
        client = BiasDetectionClient(endpoint=service.url, max_retries=2, backoff_s=0.01)
        assert client.assess(small_report()) == {"status": "fail"}
    assert len(service.requests) == 2


def test_a_timeout_gives_a_clear_error_naming_the_endpoint_after_bounded_retries(monkeypatch):
    monkeypatch.setenv("TEST_BIAS_TOKEN", TOKEN)
    with ScriptedService([(200, {}, 1.0), (200, {}, 1.0)]) as service:
        client = BiasDetectionClient(
            endpoint=service.url, timeout_s=0.2, max_retries=1, backoff_s=0.0, token_env_var="TEST_BIAS_TOKEN"
        )
        started = time.monotonic()
        with pytest.raises(BiasServiceError) as error:
            client.assess(small_report())
        assert time.monotonic() - started < 1.5  # two 0.2 s attempts, not the server's full delay
    message = str(error.value)
    assert f"{service.url}/v1/assess" in message and "after 2 attempt(s)" in message and "timeout 0.2s" in message
    assert TOKEN not in message


def test_an_unreachable_endpoint_gives_a_clear_error():
    with socket.socket() as probe:  # a free port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = BiasDetectionClient(endpoint=f"http://127.0.0.1:{port}", max_retries=1, backoff_s=0.0)
    with pytest.raises(BiasServiceError, match=rf"http://127\.0\.0\.1:{port}/v1/assess failed after 2 attempt"):
        client.assess(small_report())


def test_a_rejected_request_is_not_retried_and_shows_the_service_message():
    with ScriptedService([(422, {"detail": "unknown schema"}, 0.0)]) as service:
        client = BiasDetectionClient(endpoint=service.url, max_retries=3, backoff_s=0.0)
        with pytest.raises(BiasServiceError, match=r"rejected the request \(HTTP 422 .*unknown schema"):
            client.assess(small_report())
    assert len(service.requests) == 1


def test_without_an_endpoint_the_resource_does_nothing():
    assert BiasDetectionClient().assess(small_report()) is None

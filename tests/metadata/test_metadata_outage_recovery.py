"""The metadata database unreachable (connection refused) for the length of a step, then back.

The database is the real local PostgreSQL behind a TCP forwarder on 127.0.0.1 that this test switches off
(nothing listens: connection refused, as when the server or its Service is down) and on again.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance
from sqlalchemy.engine import URL

from pixtrain_dagster.core.backoff import Backoff
from pixtrain_dagster.metadata import TrainingMetadataStore
from pixtrain_dagster.metadata.store import MetadataStoreUnavailable

from . import metadata_samples


class SwitchableForwarder:
    """127.0.0.1:<port> -> target. ``down()`` closes the listener and every open connection."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); stops listening
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass


@pytest.fixture
def forwarded_url(postgres_database_url: URL):
    forwarder = SwitchableForwarder((postgres_database_url.host or "127.0.0.1", postgres_database_url.port or 5432))
    yield forwarder, postgres_database_url.set(host="127.0.0.1", port=forwarder.port)
    forwarder.down()


def _counts(url: URL) -> dict[str, int]:
    with TrainingMetadataStore.from_url(url) as store:
        return {t: store.count_rows(t) for t in ("dataset_versions", "training_runs", "checkpoints", "audit_events")}


def test_refused_for_a_whole_step_fails_once_clearly_then_a_retry_records_everything_once(
    forwarded_url, pipeline_env, monkeypatch
):
    forwarder, url = forwarded_url
    forwarder.up()
    with TrainingMetadataStore.from_url(url) as store:
        store.migrate()
    forwarder.down()  # connection refused from here on
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", forwarder.port)) != 0, "the forwarder should refuse connections"
    monkeypatch.setenv("PIXTRAIN_METADATA_DATABASE_URL", url.render_as_string(hide_password=False))
    from pixtrain_dagster.definitions import build_definitions

    job = build_definitions().resolve_implicit_global_asset_job_def()
    selection = [AssetKey("raw_conversations"), AssetKey("training_dataset")]
    started = time.monotonic()
    failed = job.execute_in_process(instance=DagsterInstance.get(), asset_selection=selection, raise_on_error=False)
    elapsed = time.monotonic() - started
    assert not failed.success
    # In-process, resources start with the run: the failure is the resource's, reported once.
    kinds = [e.event_type for e in failed.all_events]
    assert DagsterEventType.STEP_UP_FOR_RETRY not in kinds and DagsterEventType.STEP_SUCCESS not in kinds
    [failure] = [e for e in failed.all_events if e.event_type == DagsterEventType.RESOURCE_INIT_FAILURE]
    message = failure.event_specific_data.error.to_string()
    assert f"metadata database postgresql://127.0.0.1:{forwarder.port}/{url.database} unavailable" in message
    assert "unavailable after 3 attempt(s)" in message and "refused" in message.lower()
    assert elapsed < 60  # bounded: 3 attempts with 0.5 s + 1 s backoff, plus the run itself

    forwarder.up()  # the database is back
    assert _counts(url) == {"dataset_versions": 0, "training_runs": 0, "checkpoints": 0, "audit_events": 0}
    retried = job.execute_in_process(instance=DagsterInstance.get(), asset_selection=selection)
    assert retried.success
    # One dataset version; two audit events: its registration and the data gate's decision (issue 9), each once.
    assert _counts(url) == {"dataset_versions": 1, "training_runs": 0, "checkpoints": 0, "audit_events": 2}


def test_outage_in_the_middle_of_a_training_step_then_the_step_retry_records_everything_once(forwarded_url):
    """The database disappears after the step started; its next write gives up after bounded retries; the
    Dagster step retry (same run id and step key, attempt 1) replays every write: nothing twice, nothing lost."""
    forwarder, url = forwarded_url
    forwarder.up()
    fast = Backoff(max_attempts=4, initial_delay_s=0.2, max_delay_s=0.5)
    store = TrainingMetadataStore.from_url(url, connect_timeout_s=2, write_retry=fast, startup_retry=fast)
    store.migrate()
    store.record_dataset_version(
        metadata_samples.DATASET_HASH,
        source_uri="file:///d",
        num_rows_raw=3,
        num_rows_clean=3,
        scrub_counts={},
        run_id="run-1",
    )
    store.start_training_run(
        "run-1",
        "lora_training",
        dataset_hash=metadata_samples.DATASET_HASH,
        base_model_ref="tiny",
        base_model_sha256="b",
        code_version="1",
        hyperparameters={},
    )
    forwarder.down()
    started = time.monotonic()
    with pytest.raises(MetadataStoreUnavailable, match=r"record_checkpoint: .* unavailable after 4 attempt\(s\)"):
        store.record_checkpoint("run-1", "lora_training", global_step=10, uri="file:///c10", sha256="c", size_bytes=1)
    assert time.monotonic() - started < 20
    store.dispose()

    forwarder.up()
    with TrainingMetadataStore.from_url(url) as retry:
        metadata_samples.record_training(retry, "run-1", step_key="lora_training", attempt=1)
    counts = _counts(url)
    assert counts == {
        "dataset_versions": 1,
        "training_runs": 1,
        "checkpoints": 2,
        # dataset recorded (1) + started for attempt 0 and attempt 1 (2) + finished (1)
        "audit_events": 4,
    }
    with TrainingMetadataStore.from_url(url) as again:  # an identical replay changes nothing
        metadata_samples.record_training(again, "run-1", step_key="lora_training", attempt=1)
    assert _counts(url) == counts

"""Median cost of one metadata write and of the lineage query, with 10,000 training runs in the store.

    .venv/bin/python bench/bench_metadata_store.py            # Postgres: $PIXTRAIN_TEST_DATABASE_URL,
                                                             # else postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/bench_metadata_store.py --sqlite   # the embedded SQLite fallback as well

Creates a throwaway database (pixtrain_bench_<uuid>) on that server and drops it afterwards. Bulk-loads
10,000 training runs, each with 5 checkpoints, 1 evaluation and 3 audit events, then times the store's own
public calls (each one transaction, as in production: pool checkout, pre-ping, statement(s), commit).
Prints one "name value" line per measurement, nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixtrain_dagster.metadata import (  # noqa: E402
    TrainingMetadataStore,
    normalize_database_url,
    schema,  # noqa: E402
)

NUM_RUNS = 10_000
NUM_DATASETS = 50
CHECKPOINTS_PER_RUN = 5
SAMPLES = 300


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def synthetic_rows() -> dict[str, list[dict]]:
    now = datetime.now(UTC)
    datasets = [
        {
            "dataset_hash": sha(f"dataset-{d}"),
            "source_uri": f"s3://landing/batch-{d}.jsonl",
            "num_rows_raw": 1000,
            "num_rows_clean": 990,
            "scrub_counts": {"email": 3, "phone": 1},
            "recorded_by_run_id": f"run-{d}",
            "created_at": now,
        }
        for d in range(NUM_DATASETS)
    ]
    runs, checkpoints, evaluations, events = [], [], [], []
    for r in range(1, NUM_RUNS + 1):
        run_id, adapter_sha = f"run-{r:05d}", sha(f"adapter-{r}")
        runs.append(
            {
                "id": r,
                "dagster_run_id": run_id,
                "step_key": "lora_adapter",
                "attempt": 0,
                "dataset_hash": datasets[r % NUM_DATASETS]["dataset_hash"],
                "base_model_ref": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "base_model_sha256": sha("smollm2"),
                "code_version": "0.1.0",
                "git_commit": f"{r:040x}",
                "hyperparameters": {"lora_r": 8, "learning_rate": 2e-4, "max_steps": 1000},
                "status": "succeeded",
                "started_at": now,
                "finished_at": now,
                "metrics": {"train_loss": 1.1, "tokens_per_second": 5200.0},
                "adapter_uri": f"s3://artifacts/adapters/{adapter_sha}",
                "adapter_sha256": adapter_sha,
            }
        )
        for c in range(1, CHECKPOINTS_PER_RUN + 1):
            checkpoints.append(
                {
                    "training_run_id": r,
                    "global_step": c * 200,
                    "uri": f"s3://checkpoints/{run_id}/step-{c * 200}",
                    "sha256": sha(f"{run_id}-{c}"),
                    "size_bytes": 9_000_000,
                    "created_at": now,
                }
            )
        evaluations.append(
            {
                "dagster_run_id": run_id,
                "step_key": "adapter_evaluation",
                "adapter_sha256": adapter_sha,
                "eval_name": "heldout_perplexity",
                "eval_dataset_hash": None,
                "metrics": {"perplexity": 7.5},
                "passed": True,
                "created_at": now,
            }
        )
        for event, step_key in (("training_run_started", "lora_adapter"), ("training_run_finished", "lora_adapter")):
            events.append(
                {
                    "event_key": f"{event}:{run_id}:{step_key}:0",
                    "event": event,
                    "actor": "pixtrain",
                    "artifact_uri": None,
                    "artifact_sha256": None,
                    "dagster_run_id": run_id,
                    "step_key": step_key,
                    "details": {"attempt": 0},
                    "occurred_at": now,
                }
            )
        events.append(
            {
                "event_key": f"adapter_promoted:{adapter_sha}",
                "event": "adapter_promoted",
                "actor": "release-bot",
                "artifact_uri": f"s3://artifacts/adapters/{adapter_sha}",
                "artifact_sha256": adapter_sha,
                "dagster_run_id": None,
                "step_key": None,
                "details": {"stage": "production"},
                "occurred_at": now,
            }
        )
    return {
        "dataset_versions": datasets,
        "training_runs": runs,
        "checkpoints": checkpoints,
        "evaluations": evaluations,
        "audit_events": events,
    }


def bulk_load_postgres(store: TrainingMetadataStore, rows: dict[str, list[dict]]) -> None:
    """COPY: the fast path for 10k+ rows (the store's upserts are for one row at a time)."""
    with store.engine.begin() as conn:
        cursor = conn.connection.dbapi_connection.cursor()
        for table_name, table_rows in rows.items():
            columns = list(table_rows[0])
            with cursor.copy(f"COPY {table_name} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in table_rows:
                    copy.write_row([json.dumps(v) if isinstance(v, dict) else v for v in row.values()])
        cursor.execute("SELECT setval(pg_get_serial_sequence('training_runs', 'id'), max(id)) FROM training_runs")
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")


def bulk_load_sqlite(store: TrainingMetadataStore, rows: dict[str, list[dict]]) -> None:
    with store.engine.begin() as conn:
        for table_name, table_rows in rows.items():
            conn.execute(schema.metadata.tables[table_name].insert(), table_rows)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")


def median_ms(operation: Callable[[int], object], samples: int = SAMPLES) -> float:
    for i in range(10):  # warm the pool and the statement caches
        operation(-1 - i)
    timings = []
    for i in range(samples):
        started = time.perf_counter()
        operation(i)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000


def measure(store: TrainingMetadataStore, prefix: str) -> None:
    rng = random.Random(42)

    def checkpoint_upsert(i: int) -> None:
        run = rng.randint(1, NUM_RUNS)
        store.record_checkpoint(
            f"run-{run:05d}",
            "lora_adapter",
            # half new rows (insert path), half existing steps (update path)
            global_step=rng.choice([200, 400, 600, 800, 1000, 1200 + i, 5000 + i, 9000 + i]),
            uri="s3://checkpoints/bench",
            sha256=sha(str(i)),
            size_bytes=9_000_000,
        )

    def audit_append(i: int) -> None:
        store.append_audit_event("adapter_viewed", actor="auditor", artifact_sha256=sha(f"adapter-{i % NUM_RUNS + 1}"))

    def lineage_by_sha(i: int) -> None:
        [row] = store.lineage(sha(f"adapter-{rng.randint(1, NUM_RUNS)}"))
        assert len(row["checkpoints"]) >= CHECKPOINTS_PER_RUN

    def lineage_by_uri(i: int) -> None:
        [row] = store.lineage(f"s3://artifacts/adapters/{sha(f'adapter-{rng.randint(1, NUM_RUNS)}')}")
        assert row["audit_events"]

    print(f"{prefix}_training_runs {store.count_rows('training_runs')}")
    print(f"{prefix}_record_checkpoint_upsert_median_ms {median_ms(checkpoint_upsert):.3f}")
    print(f"{prefix}_append_audit_event_median_ms {median_ms(audit_append):.3f}")
    print(f"{prefix}_lineage_by_sha256_median_ms {median_ms(lineage_by_sha):.3f}")
    print(f"{prefix}_lineage_by_uri_median_ms {median_ms(lineage_by_uri):.3f}")


def bench_postgres(admin_url: sa.URL, rows: dict[str, list[dict]]) -> None:
    name = f"pixtrain_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        store = TrainingMetadataStore.from_url(admin_url.set(database=name))
        store.migrate()
        started = time.perf_counter()
        bulk_load_postgres(store, rows)
        print(f"postgres_bulk_load_s {time.perf_counter() - started:.2f}")
        measure(store, "postgres")
        store.dispose()
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def bench_sqlite(rows: dict[str, list[dict]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = TrainingMetadataStore.from_url(None, sqlite_path=Path(folder) / "pixtrain_metadata.sqlite")
        store.migrate()
        started = time.perf_counter()
        bulk_load_sqlite(store, rows)
        print(f"sqlite_bulk_load_s {time.perf_counter() - started:.2f}")
        measure(store, "sqlite")
        store.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sqlite", action="store_true", help="also measure the embedded SQLite fallback")
    args = parser.parse_args()
    admin_url = normalize_database_url(
        os.environ.get("PIXTRAIN_TEST_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    rows = synthetic_rows()
    bench_postgres(admin_url, rows)
    if args.sqlite:
        bench_sqlite(rows)


if __name__ == "__main__":
    main()

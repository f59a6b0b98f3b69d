"""Right to deletion and retention: `forget` removes a person's records everywhere and audits it by hash only;
the sensor sees the change and the next dataset is built without them; old raw snapshots are purged."""

import json
import sqlite3
import time

from dagster import DagsterInstance, RunRequest
from test_pipeline import _keys, run_job
from test_sensors import evaluate

from pixtrain_dagster import cli
from pixtrain_dagster.core.artifacts import ArtifactStore
from pixtrain_dagster.core.deletion import purge_raw_snapshots, record_hash, term_hash

from support import tiny_run_config

TERM = "Quartermaine"  # the person's surname, as a data subject would give it
PERSON = [
    {
        "messages": [
            {"role": "system", "content": "You are role-playing a therapy client. Speak as the client."},
            {"role": "user", "content": "What would you like to talk about?"},
            {
                "role": "assistant",
                "content": "My name is Zebulon Quartermaine and the layoffs at the cannery still keep me up at night.",
            },
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "How did the week go?"},
            {
                "role": "assistant",
                "content": "Mrs. Quartermaine at the cannery office called twice about "
                "the severance forms, and I froze both times.",
            },
        ]
    },
]
# Another record, named by its hash (the subject asked for "the conversation about the lighthouse keeper").
BY_HASH = {
    "messages": [
        {"role": "user", "content": "What keeps coming back to you?"},
        {"role": "assistant", "content": "The lighthouse keeper job I turned down, every single evening around dusk."},
    ]
}
MARKERS = [b"Quartermaine", b"cannery", b"lighthouse keeper"]


def _audit_rows(pipeline_env):
    with sqlite3.connect(pipeline_env["dagster_home"] / "pixtrain_metadata.sqlite") as db:
        return [
            (event, json.loads(details))
            for event, details in db.execute("select event, details from audit_events order by id")
        ]


def _data_files(root):
    return [p for p in root.rglob("*") if p.is_file() and ".staging" not in p.parts]


def test_forget_removes_a_person_everywhere_and_the_next_dataset_is_built_without_them(
    pipeline_env, tiny_model_dir, tmp_path, capsys
):
    landing, root = pipeline_env["landing"], pipeline_env["artifact_root"]
    (landing / "clinic-a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PERSON[:1] + [BY_HASH]))
    config = tiny_run_config(tiny_model_dir)
    data = _keys("raw_conversations", "training_dataset")
    assert run_job(config, selection=data).success
    (landing / "clinic-b.jsonl").write_text(json.dumps(PERSON[1]) + "\n")  # a second snapshot, both hold data
    first = run_job(config, selection=data)
    assert first.success
    store = ArtifactStore(root)
    assert len(store.list("datasets/raw")) == 2 and len(store.list("datasets/curated")) == 2
    dataset = store.get_json("dagster/assets/training_dataset.json")
    rows_before = dataset["train_records"] + dataset["validation_records"]
    # An evaluation report that quotes validation text of the affected dataset.
    with store.stage() as folder:
        (folder / "evaluation.json").write_text(
            json.dumps(
                {
                    "dataset_sha256": dataset["sha256"],
                    "samples": [{"prompt": "p", "reference": "r", "base_reply": "b", "adapter_reply": "a"}],
                }
            )
        )
        (folder / "evaluation.md").write_text("# Adapter evaluation\n\n| table |\n\n### Sample 1\n**Therapist:** p\n")
        store.publish(folder, "evaluations/abc")
    instance = DagsterInstance.ephemeral()
    _, cursor = evaluate(None, instance)
    terms = tmp_path / "terms.txt"
    terms.write_text(TERM + "\n")
    landing_before = {p.name: p.read_bytes() for p in landing.iterdir()}

    assert (
        cli.main(["forget", "--terms-from", str(terms), "--record-hash", record_hash(BY_HASH["messages"]), "--dry-run"])
        == 0
    )
    listed = capsys.readouterr().out
    assert "clinic-a.jsonl:1" in listed and "clinic-b.jsonl:1" in listed and record_hash(BY_HASH["messages"]) in listed
    assert TERM not in listed  # locations and hashes, never the text
    assert {p.name: p.read_bytes() for p in landing.iterdir()} == landing_before  # a dry run changes nothing

    assert (
        cli.main(
            [
                "forget",
                "--terms-from",
                str(terms),
                "--record-hash",
                record_hash(BY_HASH["messages"]),
                "--actor",
                "privacy-officer",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "landing: 3 record(s) in 2 file(s)" in out and "raw snapshots republished: 2" in out

    # Gone from landing, raw snapshots, curated datasets, evaluation samples; everything left verifies.
    for path in _data_files(root):
        data_bytes = path.read_bytes()
        assert not any(marker in data_bytes for marker in MARKERS), path
    assert len(store.list("datasets/raw")) == 2 and len(store.list("datasets/curated")) == 2
    for key in store.list("datasets/raw") + store.list("datasets/curated") + store.list("evaluations"):
        store.local_path(key)  # manifest matches the republished files
    assert json.loads((root / "evaluations/abc/evaluation.json").read_text())["samples"] == []
    assert "### Sample" not in (root / "evaluations/abc/evaluation.md").read_text()
    pointer = store.get_json("dagster/assets/training_dataset.json")
    assert store.exists(pointer["key"]) and pointer["key"] != dataset["key"]
    report = json.loads((store.local_path(pointer["key"]) / "curation_report.json").read_text())
    assert report["deletions"][0]["records_removed"] == 3

    # Audited by hash: the term and the text are nowhere in the metadata database.
    [(event, details)] = [row for row in _audit_rows(pipeline_env) if row[0] == "data_deletion"]
    assert details["search_term_sha256"] == [term_hash(TERM)]
    assert record_hash(BY_HASH["messages"]) in details["removed_record_hashes"]
    assert len(details["removed_record_hashes"]) == 3 and details["landing_records_removed"] == 3
    database = (pipeline_env["dagster_home"] / "pixtrain_metadata.sqlite").read_bytes()
    assert not any(marker in database for marker in MARKERS) and TERM.casefold().encode() not in database

    # The sensor sees changed landing data and requests a run; the rebuilt dataset lacks the three records.
    request, _ = evaluate(cursor, instance)
    assert isinstance(request, RunRequest) and "clinic-a.jsonl" in request.tags["pixtrain/changed_files"]
    again = run_job(config, selection=data)
    assert again.success
    rebuilt = store.get_json("dagster/assets/training_dataset.json")
    assert rebuilt["train_records"] + rebuilt["validation_records"] == rows_before - 3
    assert {c.check_name: c.passed for c in again.get_asset_check_evaluations()}["no_phi_left"]


def test_purge_removes_old_raw_snapshots_but_keeps_the_current_one(pipeline_env, tiny_model_dir, monkeypatch, capsys):
    config = tiny_run_config(tiny_model_dir)
    assert run_job(config, selection=_keys("raw_conversations")).success
    (pipeline_env["landing"] / "more.jsonl").write_text(json.dumps(BY_HASH) + "\n")
    assert run_job(config, selection=_keys("raw_conversations")).success
    store = ArtifactStore(pipeline_env["artifact_root"])
    old, current = sorted(store.list("datasets/raw"), key=lambda k: store.manifest(k)["created_at"])
    assert store.get_json("dagster/assets/raw_conversations.json")["key"] == current
    # The function: by age alone, both are purged 100 days from now unless kept.
    assert purge_raw_snapshots(store, 90, dry_run=True) == []
    assert sorted(purge_raw_snapshots(store, 90, now=time.time() + 100 * 86400, dry_run=True)) == sorted([old, current])
    # The command: setting from the environment; the snapshot behind the current dataset is kept.
    monkeypatch.setenv("PIXTRAIN_RAW_SNAPSHOT_RETENTION_DAYS", "0.00001")  # under a second
    time.sleep(1.0)
    assert cli.main(["purge-snapshots", "--dry-run"]) == 0 and store.list("datasets/raw") == sorted([old, current])
    assert cli.main(["purge-snapshots"]) == 0
    assert "1 raw snapshot(s) older than 1e-05 days" in capsys.readouterr().out
    assert store.list("datasets/raw") == [current]
    assert not (pipeline_env["artifact_root"] / old).exists()
    [(event, details)] = [row for row in _audit_rows(pipeline_env) if row[0] == "raw_snapshots_purged"]
    assert details["removed"] == [old] and details["kept"] == [current]
    monkeypatch.setenv("PIXTRAIN_RAW_SNAPSHOT_RETENTION_DAYS", "soon")
    assert cli.main(["purge-snapshots"]) == 2
    assert "is not a number of days" in capsys.readouterr().err


def test_forget_needs_a_valid_request(capsys):
    assert cli.main(["forget"]) == 2
    assert cli.main(["forget", "--record-hash", "abc"]) == 2
    assert "not 64 hex digits" in capsys.readouterr().err

"""Conversation datasets: raw snapshots of the landing location, then validated, scrubbed, split data."""


import json

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    DataVersion,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from ..core.artifacts import build_manifest
from ..core.conversations import (
    DatasetError,
    curate,
    iter_jsonl,
    load_conversations,
    residual_phi,
    validation_problem,
    write_jsonl,
)
from ..core.landing import landing_files
from ..core.settings import CurationSettings
from ..execution import METADATA_DB_PASSWORD_ENV, step_pod_tags
from ..gates import deployed_policy, record_gate_decision, resolve_or_fail
from ..resources import ArtifactStoreResource, TrainingMetadataResource
from ..resources.metadata import step_identity

_CURATION = CurationSettings()


class TrainingDatasetConfig(Config):
    validation_fraction: float = Field(default=_CURATION.validation_fraction, gt=0.0, lt=1.0,
                                       description="Held out for evaluation and the training_sanity gate.")
    max_message_chars: int = Field(default=_CURATION.max_message_chars, gt=0)
    # Gate thresholds: unset = the deployed limit (PIXTRAIN_GATE_*, core/gate_policy.py); only tighter accepted.
    max_invalid_fraction: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Fail when more records than this are invalid: that means a format problem upstream. "
                    "Unset: PIXTRAIN_GATE_MAX_INVALID_FRACTION; only smaller values are accepted.",
    )
    min_train_records: int | None = Field(
        default=None, ge=1,
        description="enough_rows: unset = PIXTRAIN_GATE_MIN_TRAIN_RECORDS; only larger values are accepted.")
    split_seed: int = _CURATION.split_seed


@asset(group_name="data", op_tags=step_pod_tags("cpu"), code_version="1")
def raw_conversations(context: AssetExecutionContext, artifact_store: ArtifactStoreResource) -> Output[dict]:
    """An immutable snapshot of every chat JSONL file in the landing location; its content hash is the version.

    Fails on broken files (bad UTF-8, malformed JSON, no messages list) with the file and line.
    """
    landing = artifact_store.landing_store()
    store = artifact_store.store()
    names = landing_files(landing)  # refuses symlinks that resolve outside the landing location
    if not names:
        raise DatasetError(
            f"no .jsonl files in the landing location {landing.root}; copy chat JSONL there "
            "(`make seed` copies the sample dataset)"
        )
    with store.stage() as folder:
        records = 0
        for name in names:
            landing.fetch_file(name, folder / name)
            records += sum(1 for _ in iter_jsonl(folder / name, display_name=landing.uri(name)))  # streamed
        version = build_manifest(folder)["content_sha256"]
        key = f"datasets/raw/{version[:16]}"
        ref = store.publish(folder, key, extra={"landing": landing.root, "records": records})
    value = {"key": key, **ref.to_dict(), "version": ref.sha256, "files": names, "records": records}
    return Output(
        value,
        data_version=DataVersion(ref.sha256),
        metadata={
            "dataset_version": ref.sha256,
            "records": MetadataValue.int(records),
            "files": MetadataValue.json(names),
            "landing": landing.root,
            "uri": MetadataValue.path(ref.uri),
        },
    )


@asset(
    group_name="data",
    op_tags=step_pod_tags("cpu", secrets=(METADATA_DB_PASSWORD_ENV,)),
    code_version="1",
    check_specs=[
        AssetCheckSpec("schema_valid", asset="training_dataset", blocking=True,
                       description="Every published record has valid roles, order and content."),
        AssetCheckSpec("no_phi_left", asset="training_dataset", blocking=True,
                       description="An independent detector (not the scrubber) finds no identifier in the published splits."),
        AssetCheckSpec("enough_rows", asset="training_dataset", blocking=True,
                       description="At least min_train_records training rows and one validation row."),
    ],
)
def training_dataset(
    context: AssetExecutionContext,
    config: TrainingDatasetConfig,
    raw_conversations: dict,
    artifact_store: ArtifactStoreResource,
    training_metadata: TrainingMetadataResource,
):
    """Validated, PHI-scrubbed, de-duplicated conversations with a deterministic train/validation split.

    The checks re-read what was published, so they verify the artifact itself, not this step's memory.
    """
    policy = deployed_policy(context)
    thresholds = resolve_or_fail(lambda: {
        "max_invalid_fraction": policy.numeric("max_invalid_fraction", config.max_invalid_fraction),
        "min_train_records": policy.numeric("min_train_records", config.min_train_records),
    })
    store = artifact_store.store()
    raw_dir = store.local_path(raw_conversations["key"])
    records = (r for name in raw_conversations["files"] for r in iter_jsonl(raw_dir / name, display_name=name))
    curated = curate(
        records,
        validation_fraction=config.validation_fraction,
        max_message_chars=config.max_message_chars,
        max_invalid_fraction=thresholds["max_invalid_fraction"],
        split_seed=config.split_seed,
    )
    report = curated.report.to_dict()
    with store.stage() as folder:
        write_jsonl(folder / "train.jsonl", curated.train)
        write_jsonl(folder / "validation.jsonl", curated.validation)
        (folder / "curation_report.json").write_text(json.dumps(
            {"raw_version": raw_conversations["version"], "config": {**config.model_dump(), **thresholds},
             "report": report}, indent=2))
        version = build_manifest(folder)["content_sha256"]
        key = f"datasets/curated/{version[:16]}"
        ref = store.publish(folder, key)

    who = step_identity(context)
    training_metadata.get_store().record_dataset_version(
        dataset_hash=ref.sha256, source_uri=store.uri(raw_conversations["key"]),
        num_rows_raw=report["input_records"], num_rows_clean=report["kept_records"],
        scrub_counts=report["phi_replacements"], run_id=who.run_id, actor=who.actor,
    )
    published = store.local_path(key)
    train = load_conversations(published / "train.jsonl")
    validation = load_conversations(published / "validation.jsonl")
    value = {"key": key, **ref.to_dict(), "version": ref.sha256, "raw_version": raw_conversations["version"],
             "train_records": len(train), "validation_records": len(validation), "report": report}
    yield Output(
        value,
        data_version=DataVersion(ref.sha256),
        metadata={
            "dataset_version": ref.sha256,
            "raw_version": raw_conversations["version"],
            "train_records": MetadataValue.int(len(train)),
            "validation_records": MetadataValue.int(len(validation)),
            "duplicates_dropped": MetadataValue.int(report["duplicates_dropped"]),
            "dropped_by_reason": MetadataValue.json(report["dropped_by_reason"]),
            "phi_replacements": MetadataValue.json(report["phi_replacements"]),
            "records_with_phi": MetadataValue.int(report["records_with_phi"]),
            "uri": MetadataValue.path(ref.uri),
        },
    )
    problems = [
        f"{split} record {index + 1}: {problem}"
        for split, rows in (("train", train), ("validation", validation))
        for index, messages in enumerate(rows)
        if (problem := validation_problem(messages, config.max_message_chars))
    ]
    yield AssetCheckResult(check_name="schema_valid", passed=not problems,
                           metadata={"invalid_records": len(problems), "first_problems": problems[:5]})
    leftover = residual_phi(train + validation)
    yield AssetCheckResult(check_name="no_phi_left", passed=not leftover,
                           metadata={"matches_by_kind": MetadataValue.json(dict(leftover))})
    enough = len(train) >= thresholds["min_train_records"] and len(validation) >= 1
    record_gate_decision(
        training_metadata.get_store(), who, gate="training_dataset_checks", passed=bool(enough and not problems
                                                                                           and not leftover),
        thresholds=thresholds, policy=policy, artifact_uri=ref.uri, artifact_sha256=ref.sha256,
        extra={"checks": {"schema_valid": not problems, "no_phi_left": not leftover, "enough_rows": enough}},
    )
    yield AssetCheckResult(
        check_name="enough_rows", passed=enough,
        metadata={"train_records": len(train), "validation_records": len(validation),
                  "min_train_records": thresholds["min_train_records"]},
    )

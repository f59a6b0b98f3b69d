"""Conversation datasets: raw snapshots of the landing location, then validated, scrubbed, split data."""

import json

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AutomationCondition,
    Config,
    DataVersion,
    MetadataValue,
    Output,
    asset,
    multi_asset_check,
)
from pydantic import Field

from ..catalog import CONVERSATION_SCHEMA, PHI_RAW, PHI_SCRUBBED, governance_tags, owners, table_metadata, uri_metadata
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
    validation_fraction: float = Field(
        default=_CURATION.validation_fraction,
        gt=0.0,
        lt=1.0,
        description="Held out for evaluation and the training_sanity gate.",
    )
    max_message_chars: int = Field(
        default=_CURATION.max_message_chars,
        gt=0,
        description="Longer messages make a record invalid (reason too_long).",
    )
    # Gate thresholds: unset = the deployed limit (PIXTRAIN_GATE_*, core/gate_policy.py); only tighter accepted.
    max_invalid_fraction: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Fail when more records than this are invalid: that means a format problem upstream. "
        "Unset: PIXTRAIN_GATE_MAX_INVALID_FRACTION; only smaller values are accepted.",
    )
    min_train_records: int | None = Field(
        default=None,
        ge=1,
        description="enough_rows: unset = PIXTRAIN_GATE_MIN_TRAIN_RECORDS; only larger values are accepted.",
    )
    split_seed: int = Field(
        default=_CURATION.split_seed, description="Seed of the train/validation split; same seed and data, same split."
    )


@asset(
    group_name="data",
    op_tags=step_pod_tags("cpu"),
    kinds={"json"},
    owners=owners(),
    tags=governance_tags(PHI_RAW, "cpu"),
)
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
            **table_metadata(records),
            "files": MetadataValue.json(names),
            "landing": landing.root,
            **uri_metadata(ref.uri),
        },
    )


@asset(
    group_name="data",
    op_tags=step_pod_tags("cpu", secrets=(METADATA_DB_PASSWORD_ENV,)),
    kinds={"json", "postgres"},  # the splits as JSONL; each version is recorded in the training metadata database
    owners=owners(),
    tags=governance_tags(PHI_SCRUBBED, "cpu"),
    metadata={"dagster/column_schema": CONVERSATION_SCHEMA},
)
def training_dataset(
    context: AssetExecutionContext,
    config: TrainingDatasetConfig,
    raw_conversations: dict,
    artifact_store: ArtifactStoreResource,
    training_metadata: TrainingMetadataResource,
):
    """Validated, PHI-scrubbed, de-duplicated conversations with a deterministic train/validation split.

    Its blocking checks (``training_dataset_checks`` below) read the published splits, not this step's memory.
    """
    policy = deployed_policy(context)
    thresholds = resolve_or_fail(
        lambda: {
            "max_invalid_fraction": policy.numeric("max_invalid_fraction", config.max_invalid_fraction),
            "min_train_records": policy.numeric("min_train_records", config.min_train_records),
        }
    )
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
        (folder / "curation_report.json").write_text(
            json.dumps(
                {
                    "raw_version": raw_conversations["version"],
                    "config": {**config.model_dump(), **thresholds},
                    "report": report,
                },
                indent=2,
            )
        )
        version = build_manifest(folder)["content_sha256"]
        key = f"datasets/curated/{version[:16]}"
        ref = store.publish(folder, key)

    who = step_identity(context)
    training_metadata.get_store().record_dataset_version(
        dataset_hash=ref.sha256,
        source_uri=store.uri(raw_conversations["key"]),
        num_rows_raw=report["input_records"],
        num_rows_clean=report["kept_records"],
        scrub_counts=report["phi_replacements"],
        run_id=who.run_id,
        actor=who.actor,
    )
    published = store.local_path(key)
    train = load_conversations(published / "train.jsonl")
    validation = load_conversations(published / "validation.jsonl")
    value = {
        "key": key,
        **ref.to_dict(),
        "version": ref.sha256,
        "raw_version": raw_conversations["version"],
        "train_records": len(train),
        "validation_records": len(validation),
        "report": report,
    }
    return Output(
        value,
        data_version=DataVersion(ref.sha256),
        metadata={
            "dataset_version": ref.sha256,
            "raw_version": raw_conversations["version"],
            **table_metadata(len(train) + len(validation), CONVERSATION_SCHEMA),
            "train_records": MetadataValue.int(len(train)),
            "validation_records": MetadataValue.int(len(validation)),
            "duplicates_dropped": MetadataValue.int(report["duplicates_dropped"]),
            "dropped_by_reason": MetadataValue.json(report["dropped_by_reason"]),
            "phi_replacements": MetadataValue.json(report["phi_replacements"]),
            "records_with_phi": MetadataValue.int(report["records_with_phi"]),
            **uri_metadata(ref.uri),
        },
    )


# Requested with the asset by automation, or after a run that updated the asset without its checks.
_WITH_ITS_ASSET = AutomationCondition.any_deps_updated()


@multi_asset_check(
    specs=[
        AssetCheckSpec(
            "schema_valid",
            asset="training_dataset",
            blocking=True,
            automation_condition=_WITH_ITS_ASSET,
            description="Every published record has valid roles, order and content.",
        ),
        AssetCheckSpec(
            "no_phi_left",
            asset="training_dataset",
            blocking=True,
            automation_condition=_WITH_ITS_ASSET,
            description="An independent detector (not the scrubber) finds no identifier in the published splits.",
        ),
        AssetCheckSpec(
            "enough_rows",
            asset="training_dataset",
            blocking=True,
            automation_condition=_WITH_ITS_ASSET,
            description="At least min_train_records training rows and one validation row.",
        ),
    ],
    can_subset=True,
    name="training_dataset_checks",
    ins={"training_dataset": AssetIn("training_dataset")},
    op_tags=step_pod_tags("cpu", secrets=(METADATA_DB_PASSWORD_ENV,)),
)
def training_dataset_checks(
    context: AssetCheckExecutionContext,
    training_dataset: dict,
    artifact_store: ArtifactStoreResource,
    training_metadata: TrainingMetadataResource,
):
    """The dataset gate, on the latest published dataset: runs after every materialisation and alone (UI:
    Checks > Execute), so a changed rule or a tightened deployed policy re-checks a dataset without curating again.

    Reads the splits through the manifest (a changed file fails here) and the curation settings recorded beside
    them; the threshold is the one recorded or the deployed one, whichever is stricter.
    """
    dataset = training_dataset  # the pointer of the latest materialisation (this run's or an earlier one)
    store = artifact_store.store()
    published = store.local_path(dataset["key"])  # verifies every file against the manifest
    curation_report = json.loads((published / "curation_report.json").read_text())
    curation, report = curation_report["config"], curation_report["report"]
    policy = deployed_policy(context)
    # The run's own thresholds were checked against the policy when the dataset was curated; re-checked here
    # against the policy deployed now.
    thresholds = {
        "min_train_records": policy.stricter("min_train_records", curation["min_train_records"]),
        "max_invalid_fraction": policy.stricter("max_invalid_fraction", curation["max_invalid_fraction"]),
    }
    train = load_conversations(published / "train.jsonl")
    validation = load_conversations(published / "validation.jsonl")
    selected = {key.name for key in context.selected_asset_check_keys}
    outcomes: dict[str, bool] = {}
    results = []
    if "schema_valid" in selected:
        problems = [
            f"{split} record {index + 1}: {problem}"
            for split, rows in (("train", train), ("validation", validation))
            for index, messages in enumerate(rows)
            if (problem := validation_problem(messages, curation["max_message_chars"]))
        ]
        # The share of the landed records curation dropped as invalid: a format problem upstream when high.
        invalid_fraction = sum(report["dropped_by_reason"].values()) / max(1, report["input_records"])
        if invalid_fraction > thresholds["max_invalid_fraction"]:
            problems.append(
                f"{invalid_fraction:.1%} of the landed records were invalid (limit "
                f"{thresholds['max_invalid_fraction']:.0%}); see the asset's dropped_by_reason"
            )
        outcomes["schema_valid"] = not problems
        results.append(
            AssetCheckResult(
                check_name="schema_valid",
                passed=not problems,
                metadata={
                    "invalid_records": len(problems),
                    "first_problems": problems[:5],
                    "invalid_input_fraction": round(invalid_fraction, 4),
                    "max_invalid_fraction": thresholds["max_invalid_fraction"],
                },
            )
        )
    if "no_phi_left" in selected:
        leftover = residual_phi(train + validation)  # counts by kind only: never the text
        outcomes["no_phi_left"] = not leftover
        results.append(
            AssetCheckResult(
                check_name="no_phi_left",
                passed=not leftover,
                metadata={"matches_by_kind": MetadataValue.json(dict(leftover))},
            )
        )
    if "enough_rows" in selected:
        enough = len(train) >= thresholds["min_train_records"] and len(validation) >= 1
        outcomes["enough_rows"] = enough
        results.append(
            AssetCheckResult(
                check_name="enough_rows",
                passed=enough,
                metadata={
                    "train_records": len(train),
                    "validation_records": len(validation),
                    "min_train_records": thresholds["min_train_records"],
                },
            )
        )
    record_gate_decision(
        training_metadata.get_store(),
        step_identity(context),
        gate="training_dataset_checks",
        passed=all(outcomes.values()),
        thresholds=thresholds,
        policy=policy,
        artifact_uri=dataset["uri"],
        artifact_sha256=dataset["sha256"],
        extra={"checks": outcomes},
    )
    yield from results

"""Right to deletion and retention: remove a person's conversations everywhere we keep them; purge old snapshots.

A deletion request names records by **record hash** (sha256 of the record's ``messages`` as canonical JSON,
see :func:`record_hash`; ``forget --dry-run`` lists the hashes and file:line locations a search matches) or by
**search term** (case-insensitive substring of any message). :func:`forget` then

1. rewrites every landing file without the matching lines (each file replaced atomically), so the
   ``new_training_data`` sensor sees changed landing data and the next run retrains without them;
2. republishes every raw snapshot (``datasets/raw/*``) that held one, under its new content hash with a new
   manifest, then removes the old one;
3. republishes every curated dataset (``datasets/curated/*``) without the scrubbed form of those records (matched
   by the curation's own duplicate key, since names may already be placeholders there) or the term;
4. drops the sample replies of evaluation reports computed on an affected dataset (they quote validation text);
5. points the Dagster asset pointers (``dagster/assets/*.json``) at the republished artifacts.

The caller records the returned report in the audit trail: hashes and counts only; a search term is stored as
its sha256, never as text. Adapters already trained on the data are not edited (weights cannot unlearn a record):
the next run trains a new one, and the operator retires the old (README, "Data protection").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import MANIFEST_NAME, ArtifactStore, build_manifest
from .conversations import DatasetError, _normalised_key, _parse_line
from .landing import landing_files
from .phi import scrub_text

RAW_PREFIX = "datasets/raw"
CURATED_PREFIX = "datasets/curated"
EVALUATION_PREFIX = "evaluations"
POINTER_PREFIX = "dagster/assets"
RETENTION_ENV = "PIXTRAIN_RAW_SNAPSHOT_RETENTION_DAYS"
DEFAULT_RETENTION_DAYS = 90


def record_hash(messages: Any) -> str:
    """The identity of one raw record: sha256 of its ``messages`` as canonical JSON."""
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def term_hash(term: str) -> str:
    """What the audit trail stores instead of a search term. (A short term, like a name, can be guessed from its
    hash by trying candidates: the audit trail is still access-controlled data.)"""
    return hashlib.sha256(term.casefold().encode()).hexdigest()


def _curated_key(messages: list[dict[str, str]]) -> str | None:
    """The key ``curate`` gives this raw record once scrubbed, so its curated copy can be found."""
    try:
        scrubbed = [{"role": m["role"], "content": scrub_text(m["content"]).text} for m in messages]
        return _normalised_key(scrubbed)
    except (TypeError, KeyError, AttributeError):  # not a valid record: it never reached a curated dataset
        return None


@dataclass
class Request:
    record_hashes: set[str] = field(default_factory=set)
    terms: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.record_hashes = {h.strip().lower() for h in self.record_hashes if h.strip()}
        self.terms = [t.casefold() for t in (t.strip() for t in self.terms) if t]
        if not self.record_hashes and not self.terms:
            raise ValueError("a deletion request needs at least one record hash or search term")
        bad = [h for h in self.record_hashes if not re.fullmatch(r"[0-9a-f]{64}", h)]
        if bad:
            raise ValueError(f"{len(bad)} record hash(es) are not 64 hex digits; list them with `forget --dry-run`")

    def matches_text(self, text: str) -> bool:
        folded = text.casefold()
        return any(term in folded for term in self.terms)

    def matches_record(self, messages: Any) -> bool:
        if record_hash(messages) in self.record_hashes:
            return True
        if not self.terms or not isinstance(messages, list):
            return False
        return any(
            isinstance(m, dict) and isinstance(m.get("content"), str) and self.matches_text(m["content"])
            for m in messages
        )


@dataclass
class Match:
    location: str  # "file:line" in the landing location or a raw snapshot
    record_hash: str


@dataclass
class DeletionReport:
    matches: list[Match] = field(default_factory=list)
    landing_files_rewritten: list[str] = field(default_factory=list)
    landing_records_removed: int = 0
    raw_snapshots: dict[str, str] = field(default_factory=dict)  # old key -> new key ("" when nothing was left)
    curated_datasets: dict[str, str] = field(default_factory=dict)
    curated_records_removed: int = 0
    evaluations_redacted: list[str] = field(default_factory=list)
    pointers_updated: list[str] = field(default_factory=list)

    @property
    def record_hashes(self) -> list[str]:
        return sorted({m.record_hash for m in self.matches})

    def audit_details(self, request: Request) -> dict[str, Any]:
        """For the audit trail: hashes, keys and counts; never a term or any record text."""
        return {
            "requested_record_hashes": sorted(request.record_hashes),
            "search_term_sha256": sorted(term_hash(t) for t in request.terms),
            "removed_record_hashes": self.record_hashes,
            "landing_files_rewritten": self.landing_files_rewritten,
            "landing_records_removed": self.landing_records_removed,
            "raw_snapshots_republished": self.raw_snapshots,
            "curated_datasets_republished": self.curated_datasets,
            "curated_records_removed": self.curated_records_removed,
            "evaluations_redacted": self.evaluations_redacted,
        }


def _filter_jsonl(
    source: Path,
    display: str,
    request: Request,
    report: DeletionReport,
    curated_keys: set[str],
    destination: Path | None,
) -> int:
    """Copy ``source`` to ``destination`` without matching lines; returns how many were removed.

    Lines are compared as parsed records; a line that does not parse is removed only if it contains a term.
    """
    removed = 0
    out = open(destination, "wb") if destination is not None else None
    try:
        with open(source, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                hit = False
                try:
                    records = list(_parse_line(raw, display, line_no))
                except DatasetError:
                    records = []
                    hit = bool(request.terms) and request.matches_text(raw.decode("utf-8", "replace"))
                for record in records:
                    if request.matches_record(record.messages):
                        hit = True
                        report.matches.append(Match(f"{display}:{line_no}", record_hash(record.messages)))
                        if (key := _curated_key(record.messages)) is not None:
                            curated_keys.add(key)
                if hit:
                    removed += 1
                elif out is not None:
                    out.write(raw)
    finally:
        if out is not None:
            out.close()
    return removed


def remove_artifact(store: ArtifactStore, key: str) -> None:
    """Delete a published artifact: it stops being complete (manifest gone, or renamed away) before files go."""
    target = store.uri(key)
    if store.is_local:
        trash = Path(store.root) / ".staging" / f"deleted-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(target, trash)
        shutil.rmtree(trash)
    else:
        fs = store._fs
        fs.rm(f"{target}/{MANIFEST_NAME}")
        fs.rm(target, recursive=True)


def _republish(store: ArtifactStore, old_key: str, folder: Path, prefix: str) -> str:
    """Publish ``folder`` under its content hash next to ``old_key``, then remove the old artifact."""
    extra = store.manifest(old_key).get("extra") or {}
    version = build_manifest(folder)["content_sha256"]
    new_key = f"{prefix}/{version[:16]}"
    store.publish(folder, new_key, extra={**extra, "republished_after_deletion_from": old_key})
    if new_key != old_key:
        remove_artifact(store, old_key)
    return new_key


def forget(store: ArtifactStore, landing: ArtifactStore, request: Request, *, dry_run: bool = False) -> DeletionReport:
    """Remove the requested records from landing, raw snapshots, curated datasets and evaluation samples."""
    report = DeletionReport()
    curated_keys: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="pixtrain-forget-") as tmp:
        tmp_dir = Path(tmp)
        # 1. the landing location
        for name in landing_files(landing):
            local = tmp_dir / "in.jsonl"
            landing.fetch_file(name, local)
            filtered = tmp_dir / "out.jsonl"
            removed = _filter_jsonl(
                local, landing.uri(name), request, report, curated_keys, None if dry_run else filtered
            )
            if removed and not dry_run:
                landing.put_file(filtered, name)  # atomic replace
                report.landing_files_rewritten.append(name)
            report.landing_records_removed += removed
        # 2. raw snapshots (older ones may hold records the landing location no longer has)
        for key in store.list(RAW_PREFIX):
            source = store.local_path(key)
            staged = tmp_dir / "raw" / key.rsplit("/", 1)[-1]
            removed_here = 0
            for path in sorted(p for p in source.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
                rel = path.relative_to(source)
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                if path.suffix == ".jsonl":
                    removed_here += _filter_jsonl(
                        path, f"{store.uri(key)}/{rel.as_posix()}", request, report, curated_keys, staged / rel
                    )
                else:
                    shutil.copyfile(path, staged / rel)
            if removed_here and not dry_run:
                report.raw_snapshots[key] = _republish(store, key, staged, RAW_PREFIX)
        # 3. curated datasets: scrubbed copies, found by the curation's duplicate key or the term
        affected_datasets: set[str] = set()
        for key in store.list(CURATED_PREFIX):
            source = store.local_path(key)
            old_sha = store.ref(key).sha256
            staged = tmp_dir / "curated" / key.rsplit("/", 1)[-1]
            staged.mkdir(parents=True)
            counts, removed_here = {}, 0
            for split in ("train", "validation"):
                kept = []
                path = source / f"{split}.jsonl"
                lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
                for line in lines:
                    messages = json.loads(line)["messages"]
                    if _normalised_key(messages) in curated_keys or (
                        request.terms and any(request.matches_text(m["content"]) for m in messages)
                    ):
                        removed_here += 1
                    else:
                        kept.append(line)
                counts[split] = len(kept)
                (staged / f"{split}.jsonl").write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            if not removed_here:
                continue
            affected_datasets.add(old_sha)
            report.curated_records_removed += removed_here
            if dry_run:
                continue
            curation = (
                json.loads((source / "curation_report.json").read_text())
                if (source / "curation_report.json").is_file()
                else {}
            )
            curation.setdefault("deletions", []).append({"at": time.time(), "records_removed": removed_here})
            if "report" in curation:
                curation["report"].update(
                    train_records=counts["train"],
                    validation_records=counts["validation"],
                    kept_records=counts["train"] + counts["validation"],
                )
            for other in source.iterdir():
                if other.is_file() and other.name not in (
                    MANIFEST_NAME,
                    "train.jsonl",
                    "validation.jsonl",
                    "curation_report.json",
                ):
                    shutil.copyfile(other, staged / other.name)
            (staged / "curation_report.json").write_text(json.dumps(curation, indent=2))
            report.curated_datasets[key] = _republish(store, key, staged, CURATED_PREFIX)
        # 4. evaluation reports quote validation text: drop their samples when computed on an affected dataset
        for key in store.list(EVALUATION_PREFIX):
            source = store.local_path(key)
            evaluation_path = source / "evaluation.json"
            if not evaluation_path.is_file():
                continue
            evaluation = json.loads(evaluation_path.read_text())
            samples = evaluation.get("samples") or []
            quoted = json.dumps(samples, ensure_ascii=False)
            if not samples or not (
                evaluation.get("dataset_sha256") in affected_datasets
                or (request.terms and request.matches_text(quoted))
            ):
                continue
            report.evaluations_redacted.append(key)
            if dry_run:
                continue
            staged = tmp_dir / "evaluations" / key.rsplit("/", 1)[-1]
            shutil.copytree(source, staged, ignore=shutil.ignore_patterns(MANIFEST_NAME))
            evaluation["samples"] = []
            evaluation["samples_removed_after_deletion_request"] = len(samples)
            (staged / "evaluation.json").write_text(json.dumps(evaluation, indent=2))
            markdown = (staged / "evaluation.md").read_text() if (staged / "evaluation.md").is_file() else ""
            markdown = re.split(r"\n### Sample 1\n", markdown, maxsplit=1)[0].rstrip()
            (staged / "evaluation.md").write_text(
                markdown + "\n\nSample replies were removed after a data deletion request.\n"
            )
            store.publish(staged, key, replace=True)
    if not dry_run:
        report.pointers_updated = _update_pointers(store, {**report.raw_snapshots, **report.curated_datasets})
    return report


def _update_pointers(store: ArtifactStore, moved: dict[str, str]) -> list[str]:
    """Point Dagster's stored asset values at republished artifacts (the IO manager keeps them as JSON)."""
    updated = []
    if not moved or not store.is_local:
        return updated  # remote roots: the next run rewrites the pointers
    folder = Path(store.uri(POINTER_PREFIX))
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        key = f"{POINTER_PREFIX}/{path.name}"
        value = store.get_json(key)
        if isinstance(value, dict) and value.get("key") in moved:
            ref = store.ref(moved[value["key"]])
            value.update(key=moved[value["key"]], **ref.to_dict(), version=ref.sha256, deletion_applied=True)
            store.put_json(key, value)
            updated.append(key)
    return updated


def retention_days_from_env() -> float:
    value = os.environ.get(RETENTION_ENV, str(DEFAULT_RETENTION_DAYS))
    try:
        days = float(value)
    except ValueError:
        raise ValueError(f"{RETENTION_ENV}={value!r} is not a number of days") from None
    if days <= 0:
        raise ValueError(f"{RETENTION_ENV} must be a positive number of days, got {value!r}")
    return days


def purge_raw_snapshots(
    store: ArtifactStore,
    retention_days: float,
    *,
    now: float | None = None,
    keep: Iterable[str] = (),
    dry_run: bool = False,
) -> list[str]:
    """Remove raw snapshots published more than ``retention_days`` ago; never those in ``keep`` (the current one).

    Returns the removed keys. The age is the manifest's ``created_at`` (when the snapshot was published).
    """
    now = time.time() if now is None else now
    keep = set(keep)
    removed = []
    for key in store.list(RAW_PREFIX):
        created = store.manifest(key).get("created_at", now)
        if key not in keep and now - created > retention_days * 86400:
            if not dry_run:
                remove_artifact(store, key)
            removed.append(key)
    return removed

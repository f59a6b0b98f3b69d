"""Chat JSONL: reading with precise errors, record validation, and the curated dataset build.

A record is ``{"messages": [{"role": ..., "content": ...}, ...]}``. Reading fails on anything that means the
file itself is broken (bad UTF-8, a line that is not JSON, no ``messages`` list): those errors name the file
and line. Record-level problems (unknown role, wrong order, empty or over-long content) drop the record and
are counted; too many of them fail the build, because that means an upstream format change, not noise.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .phi import scrub_text

ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """Input data cannot be used; the message says where and what to do."""


@dataclass(frozen=True)
class SourcedRecord:
    """A parsed record and where it came from (file and 1-based line), for error messages."""

    messages: list[dict[str, str]]
    source: str
    line: int

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}"


# A line longer than this is not a chat record but a broken or hostile file: reading stops there, so memory
# per line stays bounded whatever the file holds. Records are a few KB; 4 MiB leaves room for long sessions.
MAX_LINE_BYTES = 4 * 1024 * 1024
# Integers with more digits than this are refused before Python builds them (no record needs them, and a
# million-digit integer costs seconds of CPU); nesting deeper than this is refused before it recurses.
MAX_INT_DIGITS = 100
MAX_NESTING = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer with {len(text)} digits (limit {MAX_INT_DIGITS})")
    return int(text)


class _Refused(ValueError):
    pass


def _nesting_depth(raw: bytes) -> int:
    """Deepest bracket nesting outside strings, counted without parsing (so parsing never recurses deeply)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_SURROGATE.search(value))
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def iter_jsonl(
    path: Path, display_name: str | None = None, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[SourcedRecord]:
    """Stream one chat JSONL file, a record at a time. Blank lines are skipped; every other line must be a record.

    Memory is bounded by ``max_line_bytes`` (plus the record being yielded), not by the file's size. Anything
    that means the file is broken or hostile (bad UTF-8, a line over the limit, malformed JSON, huge integers,
    deep nesting, lone surrogates, no ``messages`` list) raises DatasetError naming the file and line.
    """
    name = display_name or str(path)
    with open(path, "rb") as handle:
        line_no = 0
        while True:
            raw = handle.readline(max_line_bytes + 1)
            if not raw:
                return
            line_no += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise DatasetError(
                    f"{name} line {line_no}: longer than {max_line_bytes} bytes; a chat record is far smaller, so "
                    "the file is broken (missing line breaks?) - split it into one JSON record per line"
                )
            yield from _parse_line(raw, name, line_no)


def _parse_line(raw: bytes, name: str, line_no: int) -> Iterator[SourcedRecord]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{name} line {line_no}: not valid UTF-8 (byte {raw[error.start]:#04x} at column "
            f"{error.start + 1}); re-encode the file as UTF-8"
        ) from None
    if not text.strip():
        return
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING and _nesting_depth(raw) > MAX_NESTING:  # cheap test first
        raise DatasetError(
            f"{name} line {line_no}: JSON nested more than {MAX_NESTING} levels deep; a chat "
            "record needs three (record, messages list, message) - fix the producer of this file"
        )
    try:
        obj = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{name} line {line_no}: malformed JSON ({error.msg} at column {error.colno}); "
            'each line must be one JSON object like {"messages": [{"role": ..., "content": ...}]}'
        ) from None
    except _Refused as error:
        raise DatasetError(f"{name} line {line_no}: refused {error}; chat records hold no such numbers") from None
    except (RecursionError, ValueError) as error:  # any other limit of the parser: never a raw traceback
        raise DatasetError(
            f"{name} line {line_no}: cannot be parsed ({type(error).__name__}); fix or remove this line"
        ) from None
    if _has_lone_surrogate(obj):
        raise DatasetError(
            f"{name} line {line_no}: a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
            "which is not text; fix the producer's JSON encoding"
        )
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise DatasetError(
            f'{name} line {line_no}: expected an object with a "messages" list, got '
            f"{'an object without one' if isinstance(obj, dict) else type(obj).__name__}"
        )
    yield SourcedRecord(messages=obj["messages"], source=name, line=line_no)


def read_jsonl(path: Path, display_name: str | None = None) -> list[SourcedRecord]:
    """All records of one chat JSONL file (see :func:`iter_jsonl`, which streams them)."""
    return list(iter_jsonl(path, display_name))


def validation_problem(messages: list[Any], max_message_chars: int) -> str | None:
    """Why a record cannot be trained on, as a short reason code with detail; None when valid.

    Valid: an optional leading system message, then user/assistant turns alternating from user and ending
    with an assistant turn (the reply we learn), every content a non-empty string within the length limit.
    """
    if not messages:
        return "empty_conversation"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            return f"bad_message_shape: message {index} must be {{role, content}}"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            # The value itself is not echoed: a malformed record may carry client text in any field.
            return f"unknown_role: message {index} has a role that is not one of {', '.join(ROLES)}"
        if not isinstance(content, str) or not content.strip():
            return f"empty_content: message {index} ({role}) has no text"
        if len(content) > max_message_chars:
            return f"too_long: message {index} has {len(content)} characters (limit {max_message_chars})"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    expected = "user"
    for offset, message in enumerate(turns):
        if message["role"] != expected:
            index = offset + len(messages) - len(turns)
            return f"wrong_order: message {index} is {message['role']!r}, expected {expected!r}"
        expected = "assistant" if expected == "user" else "user"
    if not turns or turns[-1]["role"] != "assistant":
        return "no_assistant_reply: the conversation must end with an assistant message"
    return None


def _normalised_key(messages: list[dict[str, str]]) -> str:
    """Duplicate key: roles and text with case and whitespace folded."""
    canon = [(m["role"], re.sub(r"\s+", " ", m["content"]).strip().lower()) for m in messages]
    return hashlib.sha256(json.dumps(canon).encode()).hexdigest()


@dataclass
class CurationReport:
    input_records: int = 0
    kept_records: int = 0
    train_records: int = 0
    validation_records: int = 0
    duplicates_dropped: int = 0
    dropped_by_reason: Counter[str] = field(default_factory=Counter)
    # First few locations per reason: enough to find the problem without copying record text (PHI) anywhere.
    example_locations: dict[str, list[str]] = field(default_factory=dict)
    phi_replacements: Counter[str] = field(default_factory=Counter)
    records_with_phi: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_records": self.input_records,
            "kept_records": self.kept_records,
            "train_records": self.train_records,
            "validation_records": self.validation_records,
            "duplicates_dropped": self.duplicates_dropped,
            "dropped_by_reason": dict(self.dropped_by_reason),
            "example_locations": self.example_locations,
            "phi_replacements": dict(self.phi_replacements),
            "records_with_phi": self.records_with_phi,
        }


@dataclass(frozen=True)
class CuratedDataset:
    train: list[list[dict[str, str]]]
    validation: list[list[dict[str, str]]]
    report: CurationReport


def curate(
    records: Iterable[SourcedRecord],
    *,
    validation_fraction: float,
    max_message_chars: int,
    max_invalid_fraction: float,
    split_seed: int,
) -> CuratedDataset:
    """Validate, scrub PHI, de-duplicate and split deterministically (by content hash, not position)."""
    report = CurationReport()
    seen: set[str] = set()
    kept: list[tuple[str, list[dict[str, str]]]] = []
    for record in records:
        report.input_records += 1
        problem = validation_problem(record.messages, max_message_chars)
        if problem:
            reason = problem.split(":", 1)[0]
            report.dropped_by_reason[reason] += 1
            examples = report.example_locations.setdefault(reason, [])
            if len(examples) < 5:
                examples.append(f"{record.location} ({problem})")
            continue
        scrubbed = []
        record_phi: Counter[str] = Counter()
        for message in record.messages:
            result = scrub_text(message["content"])
            record_phi.update(result.counts)
            scrubbed.append({"role": message["role"], "content": result.text})
        key = _normalised_key(scrubbed)
        if key in seen:
            report.duplicates_dropped += 1
            continue
        seen.add(key)
        report.phi_replacements.update(record_phi)  # counted on kept records: what the dataset had scrubbed
        report.records_with_phi += bool(record_phi)
        kept.append((key, scrubbed))

    if report.input_records == 0:
        raise DatasetError("the dataset is empty: no records found; add chat JSONL files to the landing location")
    invalid = sum(report.dropped_by_reason.values())
    if not kept or invalid / report.input_records > max_invalid_fraction:
        details = "; ".join(
            f"{reason}: {count} (e.g. {', '.join(report.example_locations[reason][:2])})"
            for reason, count in report.dropped_by_reason.most_common()
        )
        raise DatasetError(
            f"{invalid} of {report.input_records} records are invalid (limit {max_invalid_fraction:.0%}): {details}. "
            "Fix the records at those locations or raise max_invalid_fraction if dropping them is intended."
        )

    # Split by a hash threshold, not by position or quantile: a record stays on its side of the split when
    # other records are added or removed, so validation data never leaks into a later training set.
    def bucket(key: str) -> float:
        return int(hashlib.sha256(f"{split_seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12

    kept.sort(key=lambda item: bucket(item[0]))
    cut = sum(bucket(key) < validation_fraction for key, _ in kept)
    if validation_fraction > 0 and len(kept) >= 2:
        cut = min(max(cut, 1), len(kept) - 1)  # tiny datasets: still one row on each side
    validation = [messages for _, messages in kept[:cut]]
    train = [messages for _, messages in kept[cut:]]
    report.kept_records = len(kept)
    report.train_records = len(train)
    report.validation_records = len(validation)
    return CuratedDataset(train=train, validation=validation, report=report)


def residual_phi(conversations: Iterable[list[dict[str, str]]]) -> Counter[str]:
    """Identifiers left in already-scrubbed conversations, by kind (no text, no positions).

    Uses the independent detector in ``phi_check``, not the scrubber: re-running the scrubber's own
    recognisers would pass every identifier they miss.
    """
    from .phi_check import residual_phi as independent_residual_phi

    return independent_residual_phi(conversations)


def write_jsonl(path: Path, conversations: Iterable[list[dict[str, str]]]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for messages in conversations:
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            count += 1
    return count


def load_conversations(path: Path) -> list[list[dict[str, str]]]:
    return [record.messages for record in read_jsonl(path)]

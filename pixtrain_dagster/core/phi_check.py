"""The ``no_phi_left`` detector: independent of the scrubber in ``phi.py``, so their blind spots differ.

The scrubber is Presidio's engine with ``phonenumbers``, checksum recognisers, our Safe Harbor patterns and a
census name list. This module shares none of that: plain ``re`` patterns written separately, a Luhn check of
its own, and names only from context (a title, "my name is", a kinship word before a capitalised word).
It runs on already-scrubbed text, so it skips placeholders (``[NAME]``) and the public service numbers.
Findings are (kind, start, end): callers report counts, never the text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from .phi import is_public_service_number

_MON = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sept?(?:ember)?|"
    r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
_NUMBERED_LABEL = r"(?:number|no\.?|#|id)\b\s*(?:is|was|:|#)?\s*"
_CHECKS: list[tuple[str, re.Pattern[str]]] = [
    ("EMAIL", re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")),
    ("URL", re.compile(r"(?:https?://|www\.)\S+|\b[\w-]+\.(?:com|org|net|gov|edu|io|me|ly)\b(?:/\S*)?", re.I)),
    ("IP", re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b|\b(?:[0-9a-f]{1,4}:){2,7}[0-9a-f]{1,4}\b|\b[0-9a-f]{1,4}::", re.I)),
    ("SSN", re.compile(r"\b\d{3}[-. ]\d{2}[-. ]\d{4}\b")),
    (
        "PHONE",
        re.compile(
            r"\(\d{3}\)\s*\d{3}[-. ]?\d{4}|\b\d{3}[-. ]\d{3}[-. ]\d{4}\b|\b\d{3}[-.]\d{4}\b|\+\d[\d .()-]{7,}\d"
        ),
    ),
    (
        "DATE",
        re.compile(
            rf"(?<![\d.-])(?:\d{{1,2}}/\d{{1,2}}(?:/\d{{2,4}})?|\d{{1,2}}([-.])\d{{1,2}}\1\d{{2,4}})(?![\d.-]*\d)|\b{_MON}\s+\d{{1,2}}(?:st|nd|rd|th)?\b"
            rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MON}(?=\W)|\b{_MON}\s+(?:19|20)\d\d\b",
            re.I,
        ),
    ),
    (
        "AGE",
        re.compile(
            r"\b(?:9\d|1[01]\d)\s*(?:-\s*)?(?:years?|yrs?|y/o)\b|\b(?:is|turned|aged?)\s+(?:9\d|1[01]\d)\b"
            r"(?!\s*(?:days|minutes|hours|percent|%|mg|pounds|lbs|dollars|times))",
            re.I,
        ),
    ),
    (
        "ADDRESS",
        re.compile(
            r"\b\d+\s+(?:\w+\.?\s+){1,3}(?:street|st|avenue|ave|road|rd|blvd|boulevard|lane|ln|drive|"
            r"dr|court|ct|way|place|pl|terrace|circle|highway|hwy|parkway)\b|\bp\.?\s?o\.?\s+box\s+\d+",
            re.I,
        ),
    ),
    ("ZIP", re.compile(r"\b[A-Z]{2},?\s+\d{5}(?:-\d{4})?\b|\bzip(?:\s*code)?\D{0,5}\d{5}\b", re.I)),
    (
        "LOCATION",
        re.compile(
            r"\b[A-Z][a-z]+,\s+(?:[A-Z]{2}\b|(?:New |North |South |West )?(?:Ohio|York|Oregon|Texas|"
            r"California|Florida|Georgia|Arizona|Illinois|Carolina|Dakota|Virginia|Washington|"
            r"Michigan|Colorado|Nevada|Utah|Maine|Iowa|Kansas|Idaho|Montana)\b)"
        ),
    ),
    (
        "LABELLED_ID",
        re.compile(
            r"\b(?:mrn|record|chart|patient|medicare|medicaid|member|policy|group|account|acct|"
            r"routing|licen[cs]e|passport|certificate|vin|plate|serial|imei|device|employee|student|"
            r"case|claim|badge|inmate|ssn|social)\s+" + _NUMBERED_LABEL + r"(?=[\w-]*\d)[\w-]{4,}",
            re.I,
        ),
    ),
    ("LONG_NUMBER", re.compile(r"(?<![\d.])\d[\d -]{5,}\d(?!\d|\.\d)")),
    ("VIN", re.compile(r"\b(?=\w*\d)(?=\w*[A-Z])[A-HJ-NPR-Z0-9]{17}\b")),
    (
        "NAME",
        re.compile(
            r"\b(?:Dr|Mr|Mrs|Ms|Miss|Nurse|Pastor)\.?\s+[A-Z][a-z]+|(?i:my name is|call me|named)\s+[A-Z][a-z]+"
            r"|(?i:\bmy\s+(?:sister|brother|mom|mother|dad|father|son|daughter|husband|wife|partner|"
            r"boyfriend|girlfriend|friend|boss|roommate|cousin|aunt|uncle|ex|coworker|therapist)),?\s+"
            r"[A-Z][a-z]+"
        ),
    ),
]
_PLACEHOLDER = re.compile(r"\[[A-Z_]+\]")
_NUMBER_RUN = re.compile(r"\+?\(?\d[\d ().-]*\d")


def _luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char) * (2 if index % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def find_residual_phi(text: str) -> list[tuple[str, int, int]]:
    """Identifiers in (scrubbed) text, as (kind, start, end); placeholders and public service numbers skipped."""
    masked = _PLACEHOLDER.sub(lambda m: "#" * len(m.group()), text)  # keep offsets, hide placeholders
    masked = _NUMBER_RUN.sub(
        lambda m: "#" * len(m.group()) if is_public_service_number(m.group()) else m.group(), masked
    )
    found = []
    for kind, pattern in _CHECKS:
        for match in pattern.finditer(masked):
            value = match.group()
            if "#" * 3 in value or is_public_service_number(value):
                continue
            if kind == "LONG_NUMBER":
                digits = re.sub(r"\D", "", value)
                if len(digits) < 7 or re.fullmatch(r"(?:19|20)\d\d", digits):
                    continue
                kind = "CARD" if 13 <= len(digits) <= 19 and _luhn_valid(digits) else "ID"
            found.append((kind, match.start(), match.end()))
    return found


def residual_phi(conversations: Iterable[list[dict[str, str]]]) -> Counter[str]:
    """Counts by kind of identifiers left in published conversations (no text, no positions)."""
    hits: Counter[str] = Counter()
    for messages in conversations:
        for message in messages:
            hits.update(kind for kind, _, _ in find_residual_phi(message["content"]))
    return hits

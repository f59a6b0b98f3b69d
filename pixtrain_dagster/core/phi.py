"""Pattern-based PHI/PII scrubbing: replaces identifiers with typed placeholders such as ``[EMAIL]``.

Regexes catch the structured identifiers HIPAA Safe Harbor lists (emails, phone numbers, SSNs, dates,
street addresses, URLs, record numbers). They do not catch free-text names; that needs an NER model and
is out of scope here, so datasets must still come from de-identified sources.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_MONTHS = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
    r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_DATE = (
    r"(?:\b\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})\b"  # 03/14/1989, 3-14-89
    r"|\b\d{4}-\d{1,2}-\d{1,2}\b"  # 1990-07-02
    rf"|\b{_MONTHS}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b"  # March 3, 1985
    rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTHS}\.?,?\s+\d{{4}}\b)"  # 3rd of March 1985
)
_STREET_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|"
    r"Circle|Cir|Highway|Hwy|Parkway|Pkwy|Square|Sq)"
)

# Order matters: earlier patterns win where matches overlap (a URL containing digits is a URL, and a date
# after "born" is a date of birth rather than a plain date).
PHI_PATTERNS: dict[str, re.Pattern[str]] = {
    "URL": re.compile(r"\b(?:https?://|www\.)[^\s<>\"')\]]+", re.IGNORECASE),
    "EMAIL": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "SSN": re.compile(
        r"\b(?!000|666|9\d\d)\d{3}[- ](?!00)\d{2}[- ](?!0000)\d{4}\b"
        # Nine digits without separators are only an SSN when named as one (else too many false positives).
        r"|\b(?:SSN|SS#|social\s+security(?:\s+(?:number|no\.?|#))?)\s*(?:is|was|:|#)?\s*\d{9}\b",
        re.IGNORECASE,
    ),
    "RECORD_NUMBER": re.compile(
        r"\b(?:MRN|medical record(?:\s+(?:number|no\.?|#))?|record\s+(?:number|no\.?|#)|patient\s+id|"
        r"member\s+id|chart\s+(?:number|no\.?|#)|case\s+(?:number|no\.?|#))\s*(?:is\s*)?[:#]?\s*"
        r"(?=[A-Z0-9-]*\d)[A-Z0-9][A-Z0-9-]{3,}\b"
        r"|\bMRN-?\d{4,}\b",
        re.IGNORECASE,
    ),
    "PHONE": re.compile(
        r"(?<![\w-])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}\b"
        # Ten digits run together, when introduced as a number to call or text.
        r"|\b(?:phone|cell|mobile|call|text|reach)\b[^\d\n]{0,20}\+?1?\d{10}\b",
        re.IGNORECASE,
    ),
    "DOB": re.compile(
        rf"\b(?:born(?:\s+on)?|DOB|date\s+of\s+birth|birthday\s+is|birth\s+date)\s*(?:is|was|:|,)?\s*{_DATE}",
        re.IGNORECASE,
    ),
    "DATE": re.compile(_DATE, re.IGNORECASE),
    "ADDRESS": re.compile(
        rf"\b\d{{1,6}}\s+(?:[A-Z][a-z]+\.?\s+){{1,4}}{_STREET_SUFFIX}\b\.?"
        r"(?:,?\s*(?:Apt|Apartment|Suite|Unit|#)\.?\s*[A-Za-z0-9-]+)?"
    ),
}


@dataclass(frozen=True)
class ScrubResult:
    text: str
    counts: Counter[str]


def scrub_text(text: str) -> ScrubResult:
    """Replace every PHI pattern match with ``[KIND]``; count replacements by kind."""
    counts: Counter[str] = Counter()
    for kind, pattern in PHI_PATTERNS.items():
        placeholder = f"[{kind}]"

        def _replace(match: re.Match[str], kind: str = kind, placeholder: str = placeholder) -> str:
            counts[kind] += 1
            return placeholder

        text = pattern.sub(_replace, text)
    return ScrubResult(text=text, counts=counts)


def find_phi(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of every PHI pattern still present; empty means clean.

    Positions, not the matched text: callers report findings in logs and metadata, which must never hold PHI.
    """
    return [(kind, m.start(), m.end()) for kind, pattern in PHI_PATTERNS.items() for m in pattern.finditer(text)]

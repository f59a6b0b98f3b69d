"""De-identification to HIPAA Safe Harbor: identifiers in free text become typed placeholders (``[NAME]``, ...).

Built on Microsoft Presidio's ``presidio-analyzer``: its engine runs a registry of recognisers over the text;
overlapping findings are merged here and replaced with ``[KIND]``. From Presidio we
use the checksum- and library-backed recognisers (credit cards with the Luhn check, IBAN with its checksum,
IP addresses, phone numbers through Google's ``phonenumbers``); the recognisers below add what Safe Harbor
asks for and Presidio's US set lacks (street addresses in their common forms, cities next to a state, ZIP
codes, dates without a year, ages over 89, labelled record/plan/account/licence/device/vehicle/other IDs,
7-digit local numbers).

Names: Presidio finds them with a spaCy NER model, but spaCy's English models are not on PyPI under their
own names (only third-party re-uploads of unclear provenance), and the project may not download one at run
time. So Presidio runs with its no-op NLP engine, and names come from :class:`NameRecognizer`: the US Census
1990 first- and last-name lists (public domain, shipped in the MIT-licensed ``names`` wheel) plus context
(titles, "my name is", kinship words, a capitalised word after a known first name). Lower-case names and
names that are also common English words at a sentence start are its known blind spots (README: "Data
protection").

Public service numbers (988, 911, national crisis lines, ...) are never replaced: see ``PUBLIC_SERVICE_NUMBERS``.
Presidio and the name lists are imported on first use, never when the Dagster code location loads.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# Numbers that are public resources, not identifiers: the model must keep saying them. Compared digit-only.
PUBLIC_SERVICE_NUMBERS = {
    "988": "988 Suicide & Crisis Lifeline",
    "911": "emergency services",
    "211": "community services line",
    "18002738255": "National Suicide Prevention Lifeline (former number, still answered)",
    "741741": "Crisis Text Line",
    "18006624357": "SAMHSA National Helpline",
    "18007997233": "National Domestic Violence Hotline",
    "18664887386": "The Trevor Project",
    "18006564673": "RAINN National Sexual Assault Hotline",
    "18009228255": "Veterans Crisis Line (legacy number)",
    "18773878255": "National Eating Disorders helpline",
    "18003864673": "Poison Control (typo-tolerant alias)",
    "18002221222": "Poison Control",
}

# Placeholder kinds, by the entity names the recognisers report.
KINDS = (
    "NAME",
    "ADDRESS",
    "LOCATION",
    "ZIP",
    "DATE",
    "AGE",
    "PHONE",
    "EMAIL",
    "URL",
    "IP",
    "SSN",
    "MRN",
    "HEALTH_PLAN_ID",
    "ACCOUNT",
    "CARD",
    "LICENSE",
    "VEHICLE",
    "DEVICE",
    "ID",
)
_FROM_PRESIDIO = {"CREDIT_CARD": "CARD", "IP_ADDRESS": "IP", "PHONE_NUMBER": "PHONE", "IBAN_CODE": "ACCOUNT"}

_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
    r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_WEEKDAY = r"(?:Mon|Tues?|Wed(?:nes)?|Thu(?:rs)?|Fri|Sat(?:ur)?|Sun)(?:day)?"
_DAY = r"(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_STATES = (
    "Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware|Florida|Georgia|Hawaii|Idaho|"
    "Illinois|Indiana|Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland|Massachusetts|Michigan|Minnesota|"
    "Mississippi|Missouri|Montana|Nebraska|Nevada|New Hampshire|New Jersey|New Mexico|New York|North Carolina|"
    "North Dakota|Ohio|Oklahoma|Oregon|Pennsylvania|Rhode Island|South Carolina|South Dakota|Tennessee|Texas|"
    "Utah|Vermont|Virginia|Washington|West Virginia|Wisconsin|Wyoming|District of Columbia"
)
_STATE_CODES = (
    "AL|AK|AZ|AR|CA|CO|CT|DE|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|NY|NC|ND|OH|"
    "OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|DC|PR"
)
_STATE = rf"(?:{_STATES}|(?-i:{_STATE_CODES})\.?)"
_ANY_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Highway|Hwy|Parkway|Pkwy|Ln|Ct|Cir|Ter|Terr|Pl|Sq|Trl|Dr)"
)
_WORD_SUFFIX = r"(?-i:Lane|Drive|Court|Way|Place|Terrace|Circle|Square|Trail|Row|Alley|Plaza|Loop|Crescent)"
_UNIT = r"(?:,?\s*(?:Apt|Apartment|Suite|Ste|Unit|Bldg|Floor|Fl|Room|Rm)\.?\s*#?\s*[A-Za-z0-9-]+|\s*#\s*[A-Za-z0-9-]+)"
_UNITS_AFTER_NUMBER = (
    r"(?:days?|weeks?|months?|years?|yrs?|hours?|hrs?|minutes?|mins?|seconds?|mg|mcg|ml|g|kg|lbs?|pounds?|"
    r"percent|%|times|sessions?|steps|miles|km|dollars|bucks|people|pills?|beers|drinks|cigarettes|points?|"
    r"mph|bpm|calories|words|pages|am|pm)\b"
)
_LABEL_TAIL = r"(?:\s+(?:number|no\.?|num|#|id|ID))?\s*(?:is|was|:|#|=|as)?\s*(?:is\s+)?"
_VALUE = r"(?=[A-Z0-9-]*\d)[A-Z0-9][A-Z0-9-]{3,}[A-Z0-9]"

# (kind, score, regex, value group or 0). A group names the identifier inside a labelled match, so the label
# ("my SSN is") stays and only the value becomes the placeholder.
_PATTERNS: list[tuple[str, float, str, int]] = [
    ("EMAIL", 0.95, r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b", 0),
    ("URL", 0.9, r"\b(?:https?://|www\.)[^\s<>\"')\]]+[^\s<>\"')\].,;:!?]", 0),
    (
        "URL",
        0.8,
        r"\b(?:[a-z0-9-]+\.)+(?:com|org|net|edu|gov|io|me|ly|co|us|info|app|blog|tv|link|site|page|ai)"
        r"(?:/[^\s<>\"')\]]*[^\s<>\"')\].,;:!?])?(?![\w@])",
        0,
    ),
    ("SSN", 0.9, r"(?<![\d-])(?!000|666|9\d\d)\d{3}([-. ])(?!00)\d{2}\1(?!0000)\d{4}(?!\d|-\d)", 0),
    ("SSN", 0.9, r"\b(?:SSN|SS#|social(?:\s+security)?(?:\s+(?:number|no\.?|#))?)\b[^\d\n]{0,25}?(\d{9})\b", 1),
    ("SSN", 0.9, r"\b(\d{9})\b(?=[^\d\n]{0,30}\b(?:SSN|social))", 1),
    ("DATE", 0.85, r"\b(?:0?[1-9]|1[0-2])([/.-])(?:[12]\d|3[01]|0?[1-9])\1(?:19|20)?\d\d\b", 0),
    ("DATE", 0.85, r"\b(?:19|20)\d\d-(?:0?[1-9]|1[0-2])-(?:[12]\d|3[01]|0?[1-9])\b", 0),
    ("DATE", 0.8, r"\b(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b", 0),
    ("DATE", 0.7, r"(?<![\d/])(?:0?[1-9]|1[0-2])/(?:[12]\d|3[01]|0?[1-9])(?![\d/])(?!\s+of\b)", 0),
    ("DATE", 0.85, rf"\b(?:{_WEEKDAY},?\s+)?{_MONTH}\.?\s+{_DAY}\b(?:,?\s+(?:19|20)\d\d\b)?", 0),
    ("DATE", 0.85, rf"\b(?:the\s+)?{_DAY}\s+(?:of\s+)?{_MONTH}\b\.?(?:,?\s+(?:19|20)\d\d\b)?", 0),
    ("DATE", 0.8, r"(?<![\d/])(?:0?[1-9]|1[0-2])/(?:19|20)\d\d\b", 0),
    (
        "DATE",
        0.8,
        rf"\b(?:{_WEEKDAY},?\s+)?(?:on\s+)?the\s+(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)\b"
        r"(?!\s+(?:floor|time|grade|try|place|day|week|session|step|row|round|century|percentile)\b)",
        0,
    ),
    ("DATE", 0.75, rf"\b{_MONTH}\.?,?\s+(?:of\s+)?(?:19|20)\d\d\b", 0),
    ("AGE", 0.8, r"\b(9\d|1[0-2]\d)(?=\s*(?:-|\s)?\s*(?:years?|yrs?|y/?o)\b)", 1),
    (
        "AGE",
        0.7,
        r"\b(?:is|was|'s|turned|turns|turning|aged?|at)\s+(9\d|1[0-2]\d)\b(?!\s*(?:-\s*)?"
        + _UNITS_AFTER_NUMBER
        + r"|[.,]\d|\s*/)",
        1,
    ),
    (
        "ADDRESS",
        0.85,
        rf"\b\d{{1,6}}\s+(?:[NSEW]\.?\s+|(?:North|South|East|West)\s+)?(?:[A-Za-z][A-Za-z'-]*\.?\s+){{0,3}}"
        rf"{_ANY_SUFFIX}\b\.?{_UNIT}?",
        0,
    ),
    ("ADDRESS", 0.85, rf"\b\d{{1,6}}\s+(?:[NSEW]\.?\s+)?(?:[A-Z][A-Za-z'-]*\.?\s+){{1,3}}{_WORD_SUFFIX}\b{_UNIT}?", 0),
    ("ADDRESS", 0.9, r"\b(?:P\.?\s?O\.?\s*Box|Post\s+Office\s+Box)\s+\d+\b", 0),
    (
        "ADDRESS",
        0.85,
        r"\b(?:\d{1,6}\s+)?(?:County\s+(?:Road|Rd)|State\s+(?:Road|Route|Hwy)|Route|Rte|Rt\.?|"
        r"Highway|Hwy|Farm\s+Road|FM|Interstate)\s+\d{1,4}[A-Z]?\b",
        0,
    ),
    ("LOCATION", 0.8, rf"(?-i:\b((?:[A-Z][a-z]+\.?\s){{0,2}}[A-Z][a-z]+)),\s+{_STATE}\b", 1),
    ("ZIP", 0.85, rf"(?<=\s){_STATE},?\s+(\d{{5}}(?:-\d{{4}})?)\b", 1),
    ("ZIP", 0.85, r"\b(?:zip|postal)(?:\s*code)?\b[^\d\n]{0,12}(\d{5}(?:-\d{4})?)\b", 1),
    ("ZIP", 0.6, r"(?<![\d$,.#-])\b(\d{5}(?:-\d{4})?)\b(?![.,]\d)(?!\s*" + _UNITS_AFTER_NUMBER + ")", 1),
    (
        "PHONE",
        0.8,
        r"(?<![\w-])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}\b"
        r"(?:\s*(?:ext\.?|extension|x)\s*\d{1,6}\b)?",
        0,
    ),
    ("PHONE", 0.75, r"(?<![\w+-])\+\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){2,5}\b", 0),
    ("PHONE", 0.7, r"(?<![\w-])\d{3}[-.]\d{4}\b(?![-.]\d)", 0),
    (
        "PHONE",
        0.75,
        r"\b(?:phone|cell|mobile|call|text|reach|number|fax|line)\b[^\d\n]{0,20}"
        r"(\+?1?\d{10}|\d{3}[\s.-]\d{4})\b",
        1,
    ),
    (
        "MRN",
        0.85,
        r"\b(?:MRN|medical\s+record|med\s+rec|chart|patient|hospital|record)" + _LABEL_TAIL + "(" + _VALUE + ")",
        1,
    ),
    ("MRN", 0.85, r"\bMRN-?\d{4,}\b", 0),
    (
        "HEALTH_PLAN_ID",
        0.85,
        r"\b[1-9](?-i:[AC-HJKMNP-RT-Y][AC-HJKMNP-RT-Y0-9]\d)-?(?-i:[AC-HJKMNP-RT-Y][AC-HJKMNP-RT-Y0-9]\d)-?"
        r"(?-i:[AC-HJKMNP-RT-Y]{2})\d\d\b",
        0,
    ),  # Medicare Beneficiary Identifier
    (
        "HEALTH_PLAN_ID",
        0.85,
        r"\b(?:medicare|medicaid|member|insurance|policy|group|subscriber|beneficiary|plan|"
        r"HICN|coverage)" + _LABEL_TAIL + "(" + _VALUE + ")",
        1,
    ),
    ("ACCOUNT", 0.85, r"\b(?:account|acct|checking|savings|routing|IBAN|ABA)" + _LABEL_TAIL + "(" + _VALUE + ")", 1),
    (
        "LICENSE",
        0.85,
        r"\b(?:licen[cs]e|DL|CDL|DEA|NPI|passport|certificate|permit|registration)" + _LABEL_TAIL + "(" + _VALUE + ")",
        1,
    ),
    ("VEHICLE", 0.9, r"\b(?-i:(?=[A-HJ-NPR-Z0-9]*[A-HJ-NPR-Z])(?=[A-HJ-NPR-Z0-9]*\d)[A-HJ-NPR-Z0-9]{17})\b", 0),
    (
        "VEHICLE",
        0.85,
        r"\b(?:plate|tag|registration)(?:\s+(?:number|no\.?|#))?\s*(?:is|was|:|#)?,?\s*"
        r"((?-i:(?:[A-Z]{2}\s+)?(?=[A-Z0-9 -]*\d)[A-Z0-9]{1,4}[ -]?[A-Z0-9]{1,4}))\b",
        1,
    ),
    (
        "DEVICE",
        0.85,
        r"\b(?:serial|S/N|IMEI|device\s+(?:id|number)|MAC|UDI|model\s+(?:number|no))"
        + _LABEL_TAIL
        + r"((?:SN\s*)?"
        + _VALUE
        + ")",
        1,
    ),
    (
        "ID",
        0.75,
        r"\b(?:ID|identification|employee|student|inmate|client|customer|badge|case|claim|probation|parole|"
        r"report|docket|ticket|confirmation|reference|booking|file|pin)" + _LABEL_TAIL + "(" + _VALUE + ")",
        1,
    ),
    (
        "ID",
        0.7,
        r"\b(?:ID|number|no\.|#)(?=[^.\n\d]{0,30}?\b(?:is|was)\s)[^.\n\d]{0,30}?\b(?:is|was)\s+(" + _VALUE + ")",
        1,
    ),
    (
        "ID",
        0.5,
        r"(?<![\d.,$])\b\d{7,}\b(?![.,]\d)(?!\s*" + _UNITS_AFTER_NUMBER + ")",
        0,
    ),  # any long digit run left over is an identifier
]


@dataclass(frozen=True)
class ScrubResult:
    text: str
    counts: Counter[str]


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int
    score: float


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def is_public_service_number(text: str) -> bool:
    digits = _digits(text)
    return bool(digits) and (digits in PUBLIC_SERVICE_NUMBERS or f"1{digits}" in PUBLIC_SERVICE_NUMBERS)


# ---- names --------------------------------------------------------------------------------------------------
# First names that are also everyday English words: taken as names only with stronger evidence (a title, a
# kinship word, "my name is", a following surname), never from the list alone.
_AMBIGUOUS_FIRST = {
    "will",
    "may",
    "june",
    "april",
    "august",
    "grace",
    "hope",
    "joy",
    "faith",
    "art",
    "mark",
    "bill",
    "rose",
    "guy",
    "dawn",
    "sunny",
    "summer",
    "autumn",
    "ivy",
    "iris",
    "amber",
    "crystal",
    "sandy",
    "pat",
    "sue",
    "rich",
    "frank",
    "lee",
    "ray",
    "jack",
    "chase",
    "hunter",
    "max",
    "page",
    "sky",
    "star",
    "holly",
    "pearl",
    "ruby",
    "ginger",
    "cherry",
    "honey",
    "buck",
    "bob",
    "don",
    "gene",
    "jean",
    "carol",
    "kitty",
    "penny",
    "robin",
    "wade",
    "van",
    "an",
    "in",
    "so",
    "do",
    "young",
    "love",
    "christmas",
    "easter",
    "sherry",
    "brandy",
    "candy",
    "misty",
    "dusty",
    "rusty",
    "price",
    "long",
    "early",
    "mercy",
    "precious",
    "marsh",
    "bud",
    "lou",
    "else",
    "ok",
    "tom",
    "major",
    "king",
    "miles",
    "glen",
    "dale",
    "clay",
    "drew",
    "heath",
    "sterling",
    "cliff",
    "forest",
    "rocky",
    "ward",
    "wiley",
    "ha",
    "ma",
    "pa",
    "ed",
    "al",
    "ben",
    "my",
    "su",
    "mo",
    "pam",
    "tim",
    "sam",
    "ron",
    "ken",
}
_MONTHS = {
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
}
_NOT_SURNAMES = {
    "project",
    "foundation",
    "center",
    "centre",
    "hospital",
    "clinic",
    "university",
    "college",
    "school",
    "street",
    "avenue",
    "road",
    "county",
    "city",
    "park",
    "church",
    "institute",
    "house",
    "group",
    "program",
    "lifeline",
    "line",
    "hotline",
    "bank",
    "services",
    "medical",
    "health",
    "care",
    "network",
    "association",
    "society",
}
_TITLES = (
    r"(?:Dr|Mr|Mrs|Ms|Mx|Miss|Nurse|Pastor|Father|Fr|Rev|Reverend|Officer|Detective|Coach|Prof|Professor|Judge|"
    r"Sister|Rabbi|Imam)"
)
_KIN = (
    r"(?:sister|brother|mom|mother|dad|father|son|daughter|husband|wife|partner|boyfriend|girlfriend|"
    r"fianc[eé]e?|ex|boss|friend|roommate|cousin|aunt|uncle|grandmother|grandfather|grandma|grandpa|grandson|"
    r"granddaughter|niece|nephew|stepdad|stepmom|coworker|co-worker|neighbor|neighbour|therapist|counselor|"
    r"psychiatrist|doctor|teacher|sponsor|manager|supervisor|caseworker|lawyer|landlord|child|kid|baby|"
    r"stepson|stepdaughter|spouse)"
)
_CAP = r"[A-ZÀ-Ý][a-zß-ÿ]+(?:[-'][A-ZÀ-Ý]?[a-zß-ÿ]+)?"
_NAME_CONTEXT = [
    re.compile(rf"\b{_TITLES}\.?\s+({_CAP}(?:\s+{_CAP})?)"),
    re.compile(rf"(?i:\bthis\s+is|\bI'?m|\bI\s+am|\bcalled)\s+({_CAP}(?:\s+{_CAP})?)"),
    re.compile(
        rf"(?i:\bmy\s+name\s+is|\bmy\s+name'?s|\bcall\s+me|\bnamed|\bsigned\s+(?:it\s+)?as|"
        rf"\bgoes\s+by)\s+({_CAP}(?:\s+{_CAP})?)"
    ),
    re.compile(rf"(?i:\b(?:my|our|his|her|their)\s+(?:\w+\s+)?{_KIN}),?\s+({_CAP}(?:\s+{_CAP})?)"),
    re.compile(rf"\b(?:Grandpa|Grandma|Aunt|Auntie|Uncle|Cousin|Granny|Nana|Papa)\s+({_CAP})"),
]
_TOKEN = re.compile(r"[^\W\d_](?:[^\W\d_]|['-](?=[^\W\d_]))*")


@lru_cache(maxsize=1)
def _name_lists() -> tuple[frozenset[str], frozenset[str]]:
    """(first names, surnames), lower-case, from the US Census 1990 lists in the ``names`` package."""
    from importlib.resources import files

    package = files("names")

    def read(name: str, limit: int | None = None) -> list[str]:
        rows = package.joinpath(name).read_text().splitlines()[:limit]
        return [row.split()[0].lower() for row in rows if row.strip()]

    first = frozenset(read("dist.female.first") + read("dist.male.first"))
    # The 20,000 most common surnames cover ~90% of the population; rarer entries are mostly noise words.
    last = frozenset(read("dist.all.last", 20000))
    return first, last


@lru_cache(maxsize=1)
def _common_words() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS) | {
        "i",
        "ok",
        "okay",
        "yes",
        "no",
        "hi",
        "hello",
        "thanks",
        "honestly",
        "sometimes",
        "maybe",
        "sorry",
        "god",
        "mom",
        "dad",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
        "english",
        "american",
        "christmas",
        "thanksgiving",
        "easter",
        "er",
        "icu",
        "cbt",
        "dbt",
        "emdr",
        "adhd",
        "ptsd",
        "ocd",
        "doctor",
        "nurse",
        "therapist",
        "session",
        "group",
    }


def find_names(text: str) -> list[tuple[int, int]]:
    """Spans of person names: census first names (and the capitalised word after them) plus context rules."""
    first, last = _name_lists()
    common = _common_words()
    spans: list[tuple[int, int]] = []
    for pattern in _NAME_CONTEXT:
        for match in pattern.finditer(text):
            start, end = match.span(1)
            words = match.group(1).split()
            # "I'm Tired" is not a name: after "I'm"/"this is"/"called" the word must be a known name.
            if pattern is _NAME_CONTEXT[1] and words[0].lower() not in first | last:
                continue
            if words[-1].lower() in common:  # "my sister Keisha Said" -> keep only the name part
                end = start + len(words[0])
            if words[0].lower() not in common:
                spans.append((start, end))
    tokens = list(_TOKEN.finditer(text))
    for index, token in enumerate(tokens):
        word = token.group()
        lower = word.lower()
        if not word[0].isupper() or word.isupper() or lower not in first or lower in common:
            continue
        if text[max(0, token.start() - 1) : token.start()] == "[":
            continue  # a placeholder
        sentence_start = not text[: token.start()].strip() or text[: token.start()].rstrip()[-1] in ".!?\"'"
        nxt = tokens[index + 1] if index + 1 < len(tokens) else None
        adjacent = nxt is not None and text[token.end() : nxt.start()] in (" ",)
        surname = (
            adjacent and nxt.group()[0].isupper() and not nxt.group().isupper() and nxt.group().lower() not in common
        )
        if surname and nxt.group().lower() in _NOT_SURNAMES:
            surname = False
            if not sentence_start:
                continue  # "the Trevor Project": an organisation, not a person
        if lower in _MONTHS and not surname:
            continue  # "May", "June": dates are the date recogniser's job
        if lower in _AMBIGUOUS_FIRST and sentence_start and not surname:
            continue
        if sentence_start and not surname and lower in last and lower not in first:
            continue
        end = nxt.end() if surname else token.end()
        spans.append((token.start(), end))
    return spans


# ---- the Presidio engine --------------------------------------------------------------------------------------
_ENGINE_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _engines() -> Any:
    from presidio_analyzer import AnalyzerEngine, EntityRecognizer, RecognizerRegistry, RecognizerResult
    from presidio_analyzer.nlp_engine import NoOpNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
    )

    class RegexRecognizer(EntityRecognizer):
        """Our Safe Harbor patterns; a pattern's value group is the span replaced, its label stays."""

        def __init__(self):
            self.compiled = [
                (kind, score, re.compile(rx, re.IGNORECASE), group) for kind, score, rx, group in _PATTERNS
            ]
            super().__init__(supported_entities=list(KINDS), name="pixtrain_safe_harbor", supported_language="en")

        def load(self) -> None:
            pass

        def analyze(self, text, entities, nlp_artifacts=None):
            results = []
            for kind, score, pattern, group in self.compiled:
                for match in pattern.finditer(text):
                    start, end = match.span(group)
                    if end > start:
                        results.append(RecognizerResult(kind, start, end, score))
            return results

    class NameRecognizer(EntityRecognizer):
        def __init__(self):
            super().__init__(supported_entities=["NAME"], name="pixtrain_names", supported_language="en")

        def load(self) -> None:
            _name_lists()

        def analyze(self, text, entities, nlp_artifacts=None):
            return [RecognizerResult("NAME", start, end, 0.85) for start, end in find_names(text)]

    nlp = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    nlp.load()
    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in (
        CreditCardRecognizer(),
        IbanRecognizer(),
        IpRecognizer(),
        PhoneRecognizer(supported_regions=("US", "GB", "CA", "MX", "AU", "IN", "DE", "FR", "ES")),
        RegexRecognizer(),
        NameRecognizer(),
    ):
        registry.add_recognizer(recognizer)
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=["en"])
    return analyzer


def detect(text: str) -> list[Finding]:
    """Every identifier found in ``text`` (kind, start, end), overlaps not yet merged; allowlisted numbers removed."""
    analyzer = _engines()
    with _ENGINE_LOCK:
        results = analyzer.analyze(text=text, language="en", score_threshold=0.4)
    findings = []
    for result in results:
        kind = _FROM_PRESIDIO.get(result.entity_type, result.entity_type)
        span = text[result.start : result.end]
        if kind in ("PHONE", "ID", "ZIP", "ACCOUNT") and is_public_service_number(span):
            continue
        if _inside_placeholder(text, result.start, result.end):
            continue
        findings.append(Finding(kind, result.start, result.end, result.score))
    return findings


def _inside_placeholder(text: str, start: int, end: int) -> bool:
    return text[max(0, start - 1) : start] == "[" and text[end : end + 1] == "]" and text[start:end].isupper()


def scrub_text(text: str) -> ScrubResult:
    """Replace every identifier with ``[KIND]``; count replacements by kind."""
    findings = detect(text)
    if not findings:
        return ScrubResult(text=text, counts=Counter())
    # Merge overlapping findings: the union is replaced once, named after its strongest (then longest) finding.
    findings.sort(key=lambda f: (f.start, -f.end))
    merged: list[list[Any]] = []
    for finding in findings:
        if merged and finding.start < merged[-1][1]:
            current = merged[-1]
            current[1] = max(current[1], finding.end)
            if (finding.score, finding.end - finding.start) > current[3]:
                current[2], current[3] = finding.kind, (finding.score, finding.end - finding.start)
        else:
            merged.append([finding.start, finding.end, finding.kind, (finding.score, finding.end - finding.start)])
    counts: Counter[str] = Counter()
    pieces, cursor = [], 0
    for start, end, kind, _ in merged:
        pieces += [text[cursor:start], f"[{kind}]"]
        counts[kind] += 1
        cursor = end
    pieces.append(text[cursor:])
    return ScrubResult(text="".join(pieces), counts=counts)

"""De-identification accuracy on the evaluation set, the allowlist, Luhn, and the independent no_phi_left detector."""

import json

import pytest

from pixtrain_dagster.core import phi
from pixtrain_dagster.core.conversations import residual_phi
from pixtrain_dagster.core.phi import PUBLIC_SERVICE_NUMBERS, scrub_text
from pixtrain_dagster.core.phi_check import find_residual_phi
from pixtrain_dagster.core.phi_eval import NAME_KINDS, load_eval_set, score

from support import SAMPLE_DATASET


@pytest.fixture(scope="module")
def rows():
    return load_eval_set()


def test_eval_set_is_big_enough_and_covers_every_kind(rows):
    kinds = {item["kind"] for row in rows for item in row["phi"]}
    assert sum(bool(r["phi"]) for r in rows) >= 200 and sum(not r["phi"] for r in rows) >= 60
    assert kinds >= {
        "NAME",
        "ADDRESS",
        "CITY",
        "ZIP",
        "DATE",
        "AGE",
        "PHONE",
        "EMAIL",
        "SSN",
        "MRN",
        "HEALTH_PLAN",
        "ACCOUNT",
        "CARD",
        "LICENSE",
        "VEHICLE",
        "DEVICE",
        "URL",
        "IP",
        "ID",
    }


def test_scrubber_meets_the_recall_and_false_positive_targets(rows):
    result = score(lambda text: [(f.start, f.end) for f in phi.detect(text)], rows)
    below = {
        kind: round(result.recall(kind), 3)
        for kind in result.total
        if result.recall(kind) < (0.90 if kind in NAME_KINDS else 0.98)
    }
    assert not below, f"recall below target: {below}; misses at eval-set lines {result.misses}"
    assert result.false_positive_rate <= 0.03, result.false_positive_lines


def test_scrubbed_text_keeps_no_identifier_and_clean_text_is_unchanged(rows):
    for row in rows:
        scrubbed = scrub_text(row["text"]).text
        if not row["phi"]:
            assert scrubbed == row["text"]
        for item in row["phi"]:
            if item["kind"] not in NAME_KINDS:  # names: gated by recall above (a few are known misses)
                assert item["text"] not in scrubbed
    assert scrub_text("[NAME] called me on [DATE].").text == "[NAME] called me on [DATE]."  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "If it gets bad, call or text 988.",
        "Call 911 now.",
        "The lifeline is 1-800-273-8255.",
        "Text HOME to 741741.",
        "SAMHSA is 1-800-662-4357.",
        "The hotline: (800) 799-7233.",
    ],
)
def test_public_service_numbers_are_kept(text):
    assert scrub_text(text).text == text
    assert find_residual_phi(text) == []


def test_allowlist_is_digit_strings():
    assert all(number.isdigit() for number in PUBLIC_SERVICE_NUMBERS)


def test_cards_are_luhn_checked():
    assert scrub_text("my card is 4111 1111 1111 1111").text == "my card is [CARD]"
    not_a_card = "the code on the box was 4111 1111 1111 1112"  # fails the Luhn check
    assert "[CARD]" not in scrub_text(not_a_card).text
    assert [k for k, _, _ in find_residual_phi("4012888888881881")] == ["CARD"]


def test_typed_placeholders():
    result = scrub_text("I'm Jennifer Alvarez, born Jan 5, call 555-867-5309 or mail jen@example.com.")
    assert result.text == "I'm [NAME], born [DATE], call [PHONE] or mail [EMAIL]."
    assert result.counts == {"NAME": 1, "DATE": 1, "PHONE": 1, "EMAIL": 1}


def test_checker_is_independent_and_catches_what_the_scrubber_would_miss(rows):
    # On raw eval text the checker finds most identifiers with its own patterns...
    result = score(lambda text: [(s, e) for _, s, e in find_residual_phi(text)], rows)
    assert sum(result.found.values()) / sum(result.total.values()) >= 0.7
    assert result.false_positive_rate == 0
    # ...and it flags leaks that went past a scrubber, reporting kinds and counts only.
    leaked = [
        [
            {"role": "user", "content": "my SSN is 123-45-6789"},
            {"role": "assistant", "content": "call Dr. Feldman at 555-201-3344"},
        ]
    ]
    hits = residual_phi(leaked)
    assert hits["SSN"] == 1 and hits["NAME"] == 1 and hits["PHONE"] >= 1
    assert not any("123" in str(v) for v in hits.values())


def test_checker_passes_the_scrubbed_sample_data_and_eval_set(rows):
    texts = [row["text"] for row in rows]
    texts += [m["content"] for line in SAMPLE_DATASET.read_text().splitlines() for m in json.loads(line)["messages"]]
    flagged = [i for i, text in enumerate(texts) if find_residual_phi(scrub_text(text).text)]
    assert flagged == []

"""Reading chat JSONL, validation, PHI scrubbing, de-duplication and the deterministic split."""

import json

import pytest

from pixtrain_dagster.core.conversations import DatasetError, curate, read_jsonl, residual_phi, validation_problem
from pixtrain_dagster.core.phi import detect, scrub_text
from pixtrain_dagster.core.phi_check import find_residual_phi

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def curate_default(records, **overrides):
    options = dict(validation_fraction=0.2, max_message_chars=500, max_invalid_fraction=0.2, split_seed=1)
    options.update(overrides)
    return curate(records, **options)


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "chats.jsonl", [json.dumps(GOOD), "", '{"messages": [ oops'])
    with pytest.raises(DatasetError, match=r"chats\.jsonl line 3: malformed JSON"):
        read_jsonl(path)


def test_non_utf8_bytes_name_file_line_and_fix(tmp_path):
    path = write_lines(tmp_path / "latin1.jsonl", [json.dumps(GOOD), '{"messages": "caf\xe9"}'.encode("latin-1")])
    with pytest.raises(DatasetError, match=r"latin1\.jsonl line 2: not valid UTF-8 .*re-encode"):
        read_jsonl(path)


def test_record_without_messages_list_is_rejected(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", ['{"text": "hello"}'])
    with pytest.raises(DatasetError, match=r"x\.jsonl line 1: expected an object with a \"messages\" list"):
        read_jsonl(path)


def test_empty_dataset_is_a_clear_error(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DatasetError, match="dataset is empty"):
        curate_default(read_jsonl(path))


def test_wrong_roles_fail_with_reason_and_locations(tmp_path):
    bad = {"messages": [{"role": "doctor", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path = write_lines(tmp_path / "roles.jsonl", [json.dumps(bad)] * 3 + [json.dumps(GOOD)])
    with pytest.raises(DatasetError) as error:
        curate_default(read_jsonl(path))
    message = str(error.value)
    assert "3 of 4 records are invalid" in message and "unknown_role: 3" in message
    assert "roles.jsonl:1" in message and "not one of system, user, assistant" in message
    assert "doctor" not in message  # field values are never echoed: they may hold client text


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([], "empty_conversation"),
        ([{"role": "assistant", "content": "Hi"}], "wrong_order"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "wrong_order"),
        ([{"role": "user", "content": "a"}], "no_assistant_reply"),
        ([{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}], "empty_content"),
        ([{"role": "user", "content": "a" * 501}, {"role": "assistant", "content": "b"}], "too_long"),
        ([{"role": "user", "text": "a"}], "bad_message_shape"),
        (
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
            ],
            None,
        ),
    ],
)
def test_validation_reasons(messages, reason):
    problem = validation_problem(messages, max_message_chars=500)
    assert (problem.split(":")[0] if problem else None) == reason


@pytest.mark.parametrize(
    "text, kind",
    [
        ("write to dana.w@example.com please", "EMAIL"),
        ("call me at (555) 014-2233 tonight", "PHONE"),
        ("or 555-867-0142", "PHONE"),
        ("my SSN is 078-05-1120", "SSN"),
        ("I was born on 03/14/1989 in Ohio", "DATE"),
        ("my DOB, 1986-07-02, is on file", "DATE"),
        ("born March 3, 1965", "DATE"),
        ("the appointment on 2024-02-11", "DATE"),
        ("I live at 42 Maple Street, Apt 3 now", "ADDRESS"),
        ("see https://www.example.org/my-blog for it", "URL"),
        ("my MRN is MRN-0048213", "MRN"),
        ("patient ID: PX-77120", "MRN"),
        ("my SSN is 078051120, sorry", "SSN"),
        ("text me on 5558670142 after work", "PHONE"),
    ],
)
def test_each_phi_kind_is_replaced_by_its_placeholder(text, kind):
    result = scrub_text(text)
    assert f"[{kind}]" in result.text and result.counts[kind] == 1
    assert list(detect(result.text)) == [] and find_residual_phi(result.text) == []


def test_ordinary_therapy_text_is_left_alone():
    text = "I slept 6 hours, rated my anxiety 7 out of 10, and walked 3 miles on Tuesday."
    assert scrub_text(text).text == text
    numbers = "We saved 123456789 steps of data; my call with 12 people lasted 30 minutes."
    assert scrub_text(numbers).text == numbers  # unlabelled digit runs are not identifiers


def test_curation_scrubs_dedups_and_splits_deterministically(tmp_path):
    phi = {
        "messages": [
            {"role": "user", "content": "Email me at a.b@example.com"},
            {"role": "assistant", "content": "Sure, my number is 555-867-0142."},
        ]
    }
    lines = [json.dumps(phi), json.dumps(phi)]  # exact duplicate
    lines += [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}?"},
                    {"role": "assistant", "content": f"Answer {i}."},
                ]
            }
        )
        for i in range(20)
    ]
    path = write_lines(tmp_path / "d.jsonl", lines)
    first = curate_default(read_jsonl(path))
    report = first.report
    assert report.input_records == 22 and report.duplicates_dropped == 1 and report.kept_records == 21
    assert report.phi_replacements == {"EMAIL": 1, "PHONE": 1}
    assert residual_phi(first.train + first.validation) == {}
    assert 0 < len(first.validation) < 21 and len(first.train) == 21 - len(first.validation)
    # Same input, same split; adding records never moves an existing record to the other side.
    again = curate_default(read_jsonl(path))
    assert again.train == first.train and again.validation == first.validation
    extra = lines + [
        json.dumps({"messages": [{"role": "user", "content": f"New {i}?"}, {"role": "assistant", "content": "Ok."}]})
        for i in range(10)
    ]
    grown = curate_default(read_jsonl(write_lines(tmp_path / "e.jsonl", extra)), validation_fraction=0.2)
    validation_before = {json.dumps(m) for m in first.validation}
    train_after = {json.dumps(m) for m in grown.train}
    assert not validation_before & train_after


def test_report_never_contains_record_text(tmp_path):
    bad = {"messages": [{"role": "user", "content": "my SSN is 078-05-1120"}]}  # invalid: no assistant reply
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(bad)] + [json.dumps(GOOD)] * 9)
    report = json.dumps(curate_default(read_jsonl(path), max_invalid_fraction=0.5).report.to_dict())
    assert "078-05-1120" not in report and "d.jsonl:1" in report

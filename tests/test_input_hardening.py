"""Hostile or broken landing input gives the usual file-and-line error, never a crash or an unbounded read."""

import json
import os

import pytest

from pixtrain_dagster.core.artifacts import ArtifactStore
from pixtrain_dagster.core.conversations import DatasetError, iter_jsonl, read_jsonl
from pixtrain_dagster.core.landing import LandingPathError, landing_files, scan_landing

GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})


def write(path, *lines: bytes):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (b'{"messages": [], "n": ' + b"9" * 5000 + b"}", "line 2: refused an integer with 5000 digits"),
        (b'{"messages": [], "n": -' + b"1" * 200 + b"}", "line 2: refused an integer"),
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "line 2: JSON nested more than 64 levels"),
        (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "line 2: a string holds a lone UTF-16 surrogate"),
        (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "line 2: a string holds a lone UTF-16 surrogate"),
        (b'{"messages": [{"role": "user", "\\ud83d": "x"}]}', "line 2: a string holds a lone UTF-16 surrogate"),
        (b"\xff\xfe", "line 2: not valid UTF-8"),
    ],
)
def test_hostile_lines_name_file_and_line(tmp_path, bad_line, message):
    path = write(tmp_path / "batch.jsonl", GOOD.encode(), bad_line, GOOD.encode())
    with pytest.raises(DatasetError, match=f"batch.jsonl {message}"):
        read_jsonl(path)


def test_a_valid_surrogate_pair_is_text(tmp_path):
    line = json.dumps({"messages": [{"role": "user", "content": "\U0001f600"}]})  # escaped as \ud83d\ude00
    assert "\\ud83d\\ude00" in line
    [record] = read_jsonl(write(tmp_path / "ok.jsonl", line.encode()))
    assert record.messages[0]["content"] == "\U0001f600"


def test_line_over_the_byte_limit_stops_reading_there(tmp_path):
    huge = b'{"messages": [{"role": "user", "content": "' + b"a" * 5000 + b'"}]}'
    path = write(tmp_path / "big.jsonl", GOOD.encode(), huge)
    records = iter_jsonl(path, max_line_bytes=1000)
    assert next(records).line == 1  # streamed: the first record arrives before the bad line is read
    with pytest.raises(DatasetError, match="big.jsonl line 2: longer than 1000 bytes"):
        next(records)
    no_newline = tmp_path / "one-line.jsonl"
    no_newline.write_bytes(b"x" * 3000)  # no line break at all: still bounded
    with pytest.raises(DatasetError, match="line 1: longer than 1000 bytes"):
        list(iter_jsonl(no_newline, max_line_bytes=1000))
    exact = write(tmp_path / "exact.jsonl", GOOD.encode())
    assert len(list(iter_jsonl(exact, max_line_bytes=len(GOOD) + 1))) == 1  # the limit counts the newline


def test_symlink_out_of_the_landing_location_is_refused(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    write(landing / "ok.jsonl", GOOD.encode())
    outside = write(tmp_path / "secret.jsonl", GOOD.encode())
    os.symlink(outside, landing / "stolen.jsonl")
    store = ArtifactStore(landing)
    with pytest.raises(LandingPathError, match="stolen.jsonl is a symlink .* resolving outside the landing location"):
        landing_files(store)
    with pytest.raises(LandingPathError):
        scan_landing(store, {})  # the sensor does not read it either


def test_symlink_out_through_a_linked_folder_is_refused(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write(elsewhere / "x.jsonl", GOOD.encode())
    os.symlink(elsewhere, landing / "linked")
    store = ArtifactStore(landing)
    try:
        names = landing_files(store)
    except LandingPathError:
        return
    assert all(not n.startswith("linked/") for n in names)  # either refused or not followed at all


def test_symlink_inside_the_landing_location_is_accepted(tmp_path):
    landing = tmp_path / "landing"
    (landing / "batches").mkdir(parents=True)
    write(landing / "batches" / "a.jsonl", GOOD.encode())
    os.symlink(landing / "batches" / "a.jsonl", landing / "latest.jsonl")
    assert landing_files(ArtifactStore(landing)) == ["batches/a.jsonl", "latest.jsonl"]


def test_raw_snapshot_step_refuses_an_escaping_symlink(pipeline_env, tiny_model_dir, tmp_path):
    from test_pipeline import _keys, run_job

    from support import tiny_run_config

    outside = write(tmp_path / "other-tenant.jsonl", GOOD.encode())
    os.symlink(outside, pipeline_env["landing"] / "link.jsonl")
    result = run_job(tiny_run_config(tiny_model_dir), selection=_keys("raw_conversations"), raise_on_error=False)
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "link.jsonl is a symlink" in failure.event_specific_data.error.to_string()
    assert not (pipeline_env["artifact_root"] / "datasets").exists()

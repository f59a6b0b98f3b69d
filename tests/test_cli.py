"""Operator commands behind `make demo`: seeding the landing location and the results summary."""

from pixtrain_dagster import cli


def test_seed_copies_the_sample_once_and_summary_needs_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIXTRAIN_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.delenv("PIXTRAIN_TRAINING_DATA_DIR", raising=False)
    assert cli.main(["seed"]) == 0
    seeded = tmp_path / "artifacts" / "landing" / cli.SAMPLE_DATASET.name
    assert seeded.read_bytes() == cli.SAMPLE_DATASET.read_bytes()
    assert [p.name for p in seeded.parent.iterdir()] == [seeded.name]  # no temporary file left behind
    seeded.write_text("")  # an operator's edit is not overwritten by a second seed
    assert cli.main(["seed"]) == 0 and seeded.read_text() == ""
    assert "not seeding" in capsys.readouterr().out
    assert cli.main(["summary"]) == 1
    assert "nothing materialised yet" in capsys.readouterr().err

"""Client text stays in the artifact store: the event log, W&B files and the metadata database hold none of it."""

import json
import re

from dagster import DagsterInstance
from dagster._serdes import serialize_value
from test_pipeline import _keys, run_job

from pixtrain_dagster.core.artifacts import ArtifactStore

from support import tiny_run_config


def _sentences(conversations):
    """Every sentence of every validation message long enough not to occur by chance (>= 25 characters)."""
    found = set()
    for messages in conversations:
        for message in messages:
            for sentence in re.split(r"(?<=[.!?])\s+", message["content"]):
                if len(sentence.strip()) >= 25:
                    found.add(sentence.strip())
    return sorted(found)


def _forms(sentence):
    """The sentence as plain UTF-8 and as JSON escapes it (event logs store serialised JSON)."""
    return {
        sentence.encode(),
        json.dumps(sentence)[1:-1].encode(),
        json.dumps(sentence, ensure_ascii=False)[1:-1].encode(),
    }


def test_validation_text_only_in_the_evaluation_artifact(pipeline_env, tiny_model_dir):
    config = tiny_run_config(tiny_model_dir)
    config["ops"]["adapter_evaluation"]["config"]["sample_replies"] = 3
    # Every step up to the one that handles validation text (the bias report and promotion read none of it).
    result = run_job(
        config,
        selection=_keys(
            "base_model",
            "raw_conversations",
            "training_dataset",
            "lora_adapter",
            "training_checkpoints",
            "adapter_evaluation",
        ),
    )
    assert result.success
    store = ArtifactStore(pipeline_env["artifact_root"])
    dataset = store.get_json("dagster/assets/training_dataset.json")
    validation = [
        json.loads(line)["messages"]
        for line in (store.local_path(dataset["key"]) / "validation.jsonl").read_text().splitlines()
    ]
    sentences = _sentences(validation)
    assert len(sentences) >= 10

    # The scan can fail: the evaluation artifact does hold sample prompts and references from validation.
    evaluation = store.get_json("dagster/assets/adapter_evaluation.json")
    report = (store.local_path(evaluation["key"]) / "evaluation.md").read_text()
    assert "### Sample 3" in report and any(s.replace("|", "\\|") in report for s in sentences)
    assert "samples" not in evaluation and evaluation["sample_count"] == 3  # the step's value: numbers only

    events = "\n".join(serialize_value(e) for e in DagsterInstance.get().all_logs(result.run_id)).encode()
    places = {"Dagster event log": events}
    for folder in ("dagster_home", "wandb_dir"):  # event/run storage, compute logs, metadata DB; W&B run files
        for path in pipeline_env[folder].rglob("*"):
            if path.is_file():
                places[str(path)] = path.read_bytes()
    assert any(p.endswith("pixtrain_metadata.sqlite") for p in places)
    assert any(p.startswith(str(pipeline_env["wandb_dir"])) for p in places)
    leaks = [
        (place, index)
        for place, data in places.items()
        for index, sentence in enumerate(sentences)
        if any(form in data for form in _forms(sentence))
    ]
    assert leaks == [], f"validation sentences (by index) found in {sorted({p for p, _ in leaks})}"

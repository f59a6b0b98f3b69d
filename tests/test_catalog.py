"""What the Dagster UI shows about each asset, read from the code location's asset specs: kinds, owners,
governance tags, described config, source links, and code versions that follow the code (catalog.py)."""

import inspect
import json
import os
import shutil
import subprocess
import sys

import pytest
from dagster import Config, ConfigurableResource

from pixtrain_dagster.catalog import DEFAULT_OWNERS, PHI_LEVELS
from pixtrain_dagster.recovery import GPU_POOL

from support import REPO_ROOT

# The webserver has icons for these; an asset shows up to three.
KNOWN_KINDS = {
    "huggingface",
    "pytorch",
    "pytorchlightning",
    "wandb",
    "json",
    "postgres",
    "kubernetes",
    "safetensors",
    "fsspec",
}


@pytest.fixture(scope="module")
def defs():
    from pixtrain_dagster.definitions import build_definitions

    return build_definitions()


def _specs(defs):
    graph = defs.resolve_asset_graph()
    return {key.to_user_string(): graph.get(key) for key in graph.get_all_asset_keys()}


def _assets_defs(defs):
    from pixtrain_dagster.assets import ALL_ASSET_CHECKS, ALL_ASSETS, OPERATIONS_ASSETS

    return [*ALL_ASSETS, *OPERATIONS_ASSETS, *ALL_ASSET_CHECKS]


def test_every_asset_has_kinds_owners_governance_tags_and_a_description(defs):
    specs = _specs(defs)
    assert len(specs) == 9
    for name, node in specs.items():
        assert 1 <= len(node.kinds) <= 3 and node.kinds <= KNOWN_KINDS, name
        assert list(node.owners) == list(DEFAULT_OWNERS), name
        assert node.tags["phi"] in PHI_LEVELS, name
        assert node.description, name
    assert specs["raw_conversations"].tags["phi"] == "raw" and specs["training_dataset"].tags["phi"] == "scrubbed"
    assert specs["base_model"].tags["phi"] == "none"
    assert {"pytorchlightning", "wandb"} <= specs["lora_adapter"].kinds


def test_the_compute_tag_matches_where_the_step_runs(defs):
    for assets_def in _assets_defs(defs)[:8]:  # the assets (checks carry no tags)
        on_gpu = assets_def.op.pool == GPU_POOL
        for spec in assets_def.specs:
            assert spec.tags["compute"] == ("gpu" if on_gpu else "cpu"), spec.key


def test_owners_come_from_the_deployment():
    code = (
        "from pixtrain_dagster.definitions import defs; "
        "print(sorted({o for k in defs.resolve_asset_graph().get_all_asset_keys() "
        "for o in defs.resolve_asset_graph().get(k).owners}))"
    )
    env = {**os.environ, "PIXTRAIN_ASSET_OWNERS": "team:clinical-ml, lead@example.org"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['lead@example.org', 'team:clinical-ml']"


def test_every_config_field_is_described(defs):
    classes = {type(resource) for resource in defs.resources.values()}
    for assets_def in _assets_defs(defs):
        for parameter in inspect.signature(assets_def.op.compute_fn.decorated_fn).parameters.values():
            if inspect.isclass(parameter.annotation) and issubclass(parameter.annotation, Config):
                classes.add(parameter.annotation)
    assert len([c for c in classes if issubclass(c, Config) and not issubclass(c, ConfigurableResource)]) >= 6
    undescribed = [
        f"{c.__name__}.{name}" for c in classes for name, field in c.model_fields.items() if not field.description
    ]
    assert undescribed == []


def test_standard_dataset_metadata_is_declared(defs):
    schema = _specs(defs)["training_dataset"].metadata["dagster/column_schema"]
    assert [column.name for column in schema.columns] == ["messages"]


def test_assets_link_to_their_source_and_to_git_when_configured(defs):
    references = _specs(defs)["lora_adapter"].metadata["dagster/code_references"].code_references
    [local] = references
    assert local.file_path == str(REPO_ROOT / "pixtrain_dagster" / "assets" / "training.py")
    lines = (REPO_ROOT / local.file_path).read_text().splitlines()
    first_def = next(line for line in lines[local.line_number - 1 :] if line.startswith("def "))
    assert first_def.startswith("def lora_training(")  # the reference points at the asset's decorator

    code = (
        "import json; from pixtrain_dagster.definitions import defs; g = defs.resolve_asset_graph(); "
        "print(json.dumps({k.to_user_string(): [r.url for r in g.get(k).metadata['dagster/code_references']"
        ".code_references] for k in g.get_all_asset_keys()}))"
    )
    env = {
        **os.environ,
        "PIXTRAIN_GIT_URL": "https://github.com/pixtrain/pixtrain-dagster",
        "PIXTRAIN_GIT_COMMIT": "0123abc",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    urls = json.loads(out.stdout)
    assert urls["lora_adapter"][0].startswith(
        "https://github.com/pixtrain/pixtrain-dagster/tree/0123abc/pixtrain_dagster/assets/training.py#L"
    )
    assert urls["bias_report"][0].split("#")[0].endswith("/pixtrain_dagster/assets/bias.py")


# ---- code versions ---------------------------------------------------------------------------------------------

_PRINT_VERSIONS = (
    "import json; from pixtrain_dagster.definitions import defs; g = defs.resolve_asset_graph(); "
    "print(json.dumps({k.to_user_string(): g.get(k).code_version for k in g.get_all_asset_keys()}))"
)


def _versions(package_parent) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PRINT_VERSIONS],
        cwd=package_parent,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(package_parent)},
    )
    return json.loads(out.stdout)


def test_code_versions_follow_the_code_each_asset_runs(tmp_path):
    shutil.copytree(
        REPO_ROOT / "pixtrain_dagster", tmp_path / "pixtrain_dagster", ignore=shutil.ignore_patterns("__pycache__")
    )
    before = _versions(tmp_path)
    assert all(len(v) == 16 and int(v, 16) >= 0 for v in before.values())
    assert len(set(before.values())) == 8  # lora_adapter and training_checkpoints share one step
    assert _versions(tmp_path) == before  # deterministic across processes

    core_evaluation = tmp_path / "pixtrain_dagster" / "core" / "evaluation.py"
    original = core_evaluation.read_text()
    core_evaluation.write_text(original + "\n# a comment and blank lines change nothing\n\n")
    assert _versions(tmp_path) == before

    # A behaviour change in core/evaluation.py (called lazily inside adapter_evaluation only).
    core_evaluation.write_text(
        original.replace("perplexity=math.exp(min(loss, 50.0))", "perplexity=math.exp(min(loss, 40.0))")
    )
    after = _versions(tmp_path)
    changed = {key for key in before if before[key] != after[key]}
    assert "adapter_evaluation" in changed
    assert not changed & {"raw_conversations", "training_dataset", "base_model"}
    core_evaluation.write_text(original)

    # The curation code (core/conversations.py): the unit is the module, so raw_conversations, which reads JSONL
    # through the same module, moves too; the base model snapshot does not.
    conversations = tmp_path / "pixtrain_dagster" / "core" / "conversations.py"
    conversations.write_text(conversations.read_text().replace('return "empty_conversation"', 'return "no_messages"'))
    changed = {key for key, value in _versions(tmp_path).items() if before[key] != value}
    assert "training_dataset" in changed and "base_model" not in changed

    # Data that is behaviour: a changed bias probe set moves bias_report (and what reaches its modules) only.
    before = _versions(tmp_path)
    probes = tmp_path / "pixtrain_dagster" / "core" / "bias" / "bias_probes.json"
    probes.write_text(probes.read_text().replace("hopeful", "hopeful and", 1))
    changed = {key for key, value in _versions(tmp_path).items() if before[key] != value}
    assert "bias_report" in changed and not changed & {"raw_conversations", "training_dataset", "base_model"}

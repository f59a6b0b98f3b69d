"""Rules of the code base: a fast code location, a Dagster-free ML core, one source of setting defaults."""

import ast
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from support import REPO_ROOT

HEAVY = ("torch", "transformers", "peft", "lightning", "wandb")


def imported_modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_loading_the_code_location_imports_no_heavy_ml_library():
    loaded = imported_modules_after("import pixtrain_dagster.definitions")
    assert "dagster" in loaded  # the import really happened
    assert [m for m in HEAVY if m in loaded] == []


def test_the_ml_core_never_imports_dagster():
    core = REPO_ROOT / "pixtrain_dagster" / "core"
    offenders = []
    for path in core.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0].startswith("dagster")]
    assert offenders == []
    # Packages too (bias/, phi_eval/): their __init__ and every module in them.
    names = sorted(
        ".".join(p.relative_to(core).with_suffix("").parts).removesuffix(".__init__")
        for p in core.rglob("*.py")
        if p != core / "__init__.py"
    )
    modules = "; ".join(f"import pixtrain_dagster.core.{name}" for name in names)
    assert not {m for m in imported_modules_after(modules) if m.startswith("dagster")}


def test_launchpad_config_mirrors_the_core_training_settings():
    from pixtrain_dagster.assets.training import LoraTrainingConfig
    from pixtrain_dagster.core.settings import LoraTrainingSettings

    core = {f.name: f.default for f in fields(LoraTrainingSettings)}
    config = LoraTrainingConfig()
    assert set(core) <= set(LoraTrainingConfig.model_fields)
    assert config.to_settings() == LoraTrainingSettings()
    assert {name: getattr(config.to_settings(), name) for name in core} == core


def test_definitions_validate_with_the_dagster_cli(tmp_path):
    dagster = Path(sys.executable).parent / "dagster"
    out = subprocess.run(
        [str(dagster), "definitions", "validate", "-m", "pixtrain_dagster.definitions"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_sensor_started_runs_train_the_base_model_named_by_the_environment():
    code = "from pixtrain_dagster.assets.models import BaseModelConfig; print(BaseModelConfig().model_ref)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PIXTRAIN_BASE_MODEL": "/models/client-sim-base"},
    )
    assert out.stdout.strip() == "/models/client-sim-base"

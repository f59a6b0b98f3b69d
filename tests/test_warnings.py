"""Warnings a user should not see: deprecations, beta notices and tips from libraries that nobody running this
pipeline can act on. Ours were fixed where they arose; the rest are silenced one by one
(pixtrain_dagster/warning_filters.py, pixtrain_dagster/core/warning_filters.py, the Makefile's
DAGSTER_CLI_WARNINGS). Each pattern below is a line the pipeline used to print (the demo, `devices: 2`, or
`gradient_checkpointing: true`); removing any fix or filter brings its line back and fails a test here.
Everything else, such as a NaN loss, must stay visible.
"""

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import yaml

from support import REPO_ROOT, SAMPLE_DATASET, materialize_with_cli, tiny_run_config

NOISE = {
    # Dagster
    "Output(data_version=...) is beta": r"Parameter `data_version` of initializer `Output\.__init__`",
    "--select '*' uses a beta parameter": r"Parameter `include_sources` of function `AssetSelection\.all`",
    "the CLI is superseded by dg": r"Function `asset_materialize_command` is superseded",
    "Dagster calls its own deprecated method": r"InitResourceContext\.dagster_run is deprecated",
    "our context.run_id (fixed)": r"AssetExecutionContext\.run_id is deprecated",
    "our context.op_handle (fixed)": r"AssetExecutionContext\.op_handle is deprecated",
    # ML libraries
    "transformers, through PEFT": r"`is_gradient_checkpointing` is deprecated",
    "torch, through Lightning": r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    "Lightning's litlogger tip": r"💡 Tip: ",
    "Lightning's device lines": r"GPU available: \w+, used: |TPU available: \w+, using: ",
    "our gradient_checkpointing_enable (fixed)": r"`gradient_checkpointing_enable` is deprecated",
    "our save_checkpoint without weights_only (fixed)": r"`weights_only` was not set",
    "our self.log without sync_dist (fixed)": r"It is recommended to use `self\.log\('val/loss', \.\.\.",
    "PEFT's hub lookup of a local base (fixed)": r"Unable to fetch remote file|Could not find a config file in",
    "wandb.init(anonymous=None) from Lightning (fixed)": r"The anonymous setting has no effect",
    "torchrun choosing OMP_NUM_THREADS (fixed)": r"Setting OMP_NUM_THREADS environment variable",
    "our unclosed torchrun pipe (fixed)": r"ResourceWarning: unclosed file",
}


def noise_in(lines: list[str]) -> dict[str, list[str]]:
    found = {name: [line for line in lines if re.search(pattern, line)] for name, pattern in NOISE.items()}
    return {name: hits for name, hits in found.items() if hits}


def makefile_cli_warnings() -> str:
    [value] = re.findall(r"^DAGSTER_CLI_WARNINGS := (.+)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    return value


def test_a_cli_run_through_step_subprocesses_and_torchrun_workers_prints_none_of_them(
    pipeline_env, tiny_model_dir, tmp_path
):
    """The demo's command, selection and executor (a subprocess per step), with the training step running two
    torchrun workers, W&B offline and not silenced, and Python showing every warning category once per location."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, max_steps=2, devices=2, lora_dropout=0.0)))
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "PIXTRAIN_EXECUTOR", "OMP_NUM_THREADS")}
    # "default" shows DeprecationWarning and ResourceWarning too; the Makefile's CLI entries come after, so win.
    env.update(WANDB_MODE="offline", PYTHONWARNINGS=f"default,{makefile_cli_warnings()}")
    completed = materialize_with_cli("*", config_file, env)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    # The run really went through the places that used to warn: workers, W&B, checkpoints, the adapter.
    assert "[rank 1]" in output and "wandb: " in output and "checkpoint step 2" in output
    assert "RUN_SUCCESS" in output and "Asset check 'bias_gate' on 'bias_report' passed" in output
    assert noise_in(output.splitlines()) == {}
    # Log lines once each: the worker's root handler does not repeat what a library's own handler prints. The
    # process group is started before Lightning (core/training.py rank_zero_decides), which then reuses it.
    assert output.count("process group (gloo) started: global rank 1 of 2") == 1
    assert output.count("Initializing distributed") == 0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.levelname}: {record.getMessage()}")


def _everything_shown_by(work) -> list[str]:
    """Warnings and log records emitted while ``work()`` runs, starting as a fresh process does: no filter of ours
    installed (earlier calls and tests added some), every warning recorded whatever filters pytest set."""
    from pixtrain_dagster.core import warning_filters

    logging.getLogger(warning_filters.LIGHTNING_INFO_LOGGER).removeFilter(warning_filters._LIGHTNING_FILTER)
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("", "lightning.pytorch", "transformers", "peft", "wandb")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            warnings.simplefilter("always")
            work()
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    return [f"{w.category.__name__}: {w.message}" for w in caught] + records.lines


def test_training_evaluation_and_bias_report_in_process_warn_about_none_of_them(tmp_path, tiny_model_dir):
    """Each core entry point installs the filters itself (no Dagster here): in the warnings module and on
    Lightning's logger."""
    from pixtrain_dagster.core.artifacts import ArtifactStore
    from pixtrain_dagster.core.bias import BiasSettings, run_bias_report
    from pixtrain_dagster.core.conversations import load_conversations
    from pixtrain_dagster.core.evaluation import evaluate_adapter
    from pixtrain_dagster.core.settings import EvaluationSettings, LoraTrainingSettings, RuntimeSettings
    from pixtrain_dagster.core.training import train_lora_adapter

    rows = load_conversations(SAMPLE_DATASET)
    results = []
    training = _everything_shown_by(
        lambda: results.append(
            train_lora_adapter(
                store=ArtifactStore(tmp_path / "artifacts"),
                base_snapshot_dir=tiny_model_dir,
                base_model_sha256="base",
                dataset_sha256="data",
                base_model_name="models/tiny-llama",
                train_conversations=rows[:24],
                validation_conversations=rows[40:44],
                runtime=RuntimeSettings(device="cpu", wandb_mode="disabled"),
                settings=LoraTrainingSettings(
                    max_steps=2,
                    micro_batch_size=2,
                    max_seq_len=192,
                    checkpoint_every_n_steps=2,
                    warmup_steps=1,
                    gradient_checkpointing=True,
                ),
            )
        )
    )
    adapter_dir = Path(results[0].adapter.uri)
    evaluation = _everything_shown_by(
        lambda: evaluate_adapter(
            tiny_model_dir, adapter_dir, rows[40:42], EvaluationSettings(sample_replies=1, max_new_tokens=4), "cpu"
        )
    )
    bias = _everything_shown_by(
        lambda: run_bias_report(
            tiny_model_dir, adapter_dir, BiasSettings(max_templates=1, max_new_tokens=4, bootstrap_resamples=20), "cpu"
        )
    )
    # The recorder saw Lightning's own INFO lines, so a tip that got through would have been seen too.
    assert any("`Trainer.fit` stopped: `max_steps=2` reached." in line for line in training), training
    assert noise_in(training) == {}
    assert noise_in(evaluation) == {}
    assert noise_in(bias) == {}


def test_the_filters_are_narrow_other_warnings_still_reach_the_user():
    """Same text from another module, another message from the same module, Lightning's real warnings and
    its other INFO lines: all still shown."""
    import lightning.pytorch  # noqa: F401  (sets Lightning's loggers to INFO, as during training)
    from dagster import BetaWarning

    from pixtrain_dagster import warning_filters
    from pixtrain_dagster.core.warning_filters import LIGHTNING_INFO_LOGGER

    def shown(message, category, module):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warning_filters.install()
            warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
        return [str(w.message) for w in caught]

    silenced = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    assert shown(silenced, FutureWarning, "transformers.modeling_utils") == []  # the filter works at all
    assert shown(silenced, FutureWarning, "pixtrain_dagster.core.training") == [silenced]  # only from there
    assert shown("`foo` is deprecated", FutureWarning, "transformers.modeling_utils") == ["`foo` is deprecated"]
    nan = "The loss is NaN at step 3: check the learning rate"
    assert shown(nan, UserWarning, "lightning.pytorch.utilities._pytree") == [nan]
    assert shown(nan, UserWarning, "peft.utils.other") == [nan]
    beta = "Parameter `tags` of initializer `Output.__init__` is currently in beta"
    assert shown(beta, BetaWarning, "pixtrain_dagster.assets.data") == [beta]

    records = _Records()
    logger = logging.getLogger(LIGHTNING_INFO_LOGGER)
    logger.addHandler(records)
    try:
        warning_filters.install()
        for message in (
            "💡 Tip: try installing litlogger",
            "GPU available: False, used: False",
            "GPU available but not used. You can set it by doing `Trainer(accelerator='gpu')`.",
            "`Trainer.fit` stopped: `max_steps=2` reached.",
        ):
            logger.info(message)
    finally:
        logger.removeHandler(records)
    assert [line.split(": ", 1)[1] for line in records.lines] == [
        "GPU available but not used. You can set it by doing `Trainer(accelerator='gpu')`.",
        "`Trainer.fit` stopped: `max_steps=2` reached.",
    ]


def test_the_makefile_silences_only_the_supersession_of_the_commands_it_runs():
    """Python parses DAGSTER_CLI_WARNINGS here as it does for `make demo` (-W syntax: the message is a literal
    prefix, so a typo would silence nothing); Dagster's other supersession warnings stay."""
    code = (
        "from dagster._annotations import superseded\n"
        "@superseded(additional_warn_text='Use dg.', emit_runtime_warning=True)\n"
        "def asset_materialize_command(): pass\n"
        "@superseded(additional_warn_text='Use dg.', emit_runtime_warning=True)\n"
        "def job_execute_command(): pass\n"
        "asset_materialize_command(); job_execute_command()\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": makefile_cli_warnings()},
    )
    assert completed.returncode == 0, completed.stderr
    assert "Invalid -W option" not in completed.stderr
    assert "`asset_materialize_command` is superseded" not in completed.stderr
    assert "`job_execute_command` is superseded" in completed.stderr

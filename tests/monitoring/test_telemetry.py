"""The step metrics without a cluster: NVML present (a fake pynvml module: the real library needs a driver) and
absent, /healthz going unhealthy when training stalls, the server never failing a step, and the step pods'
metrics port and label."""

from __future__ import annotations

import sys
import time
import types

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pixtrain_dagster.core import telemetry as tm

from .prom_support import free_port, http_get


def _samples(registry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _fake_pynvml(fail_init: bool = False, power_fails: bool = False) -> types.ModuleType:
    """The subset of the nvidia-ml-py API the collector calls, with fixed readings for two GPUs."""
    module = types.ModuleType("pynvml")
    module.NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def init():
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    def power(handle):
        if power_fails:
            raise NVMLError("Not Supported")
        return 250_000 + handle * 1000  # milliwatts

    module.NVMLError = NVMLError
    module.nvmlInit = init
    module.nvmlDeviceGetCount = lambda: 2
    module.nvmlDeviceGetHandleByIndex = lambda i: i
    module.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=87 if h == 0 else 3, memory=40)
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=70 * 2**30, total=80 * 2**30, free=10 * 2**30)
    module.nvmlDeviceGetPowerUsage = power
    module.nvmlDeviceGetTemperature = lambda h, sensor: 61 + h
    return module


def test_gpu_series_come_from_nvml_with_base_units(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    samples = _samples(StepTelemetryFor("lora_training").registry)
    gpu0 = (("asset", "lora_training"), ("gpu", "0"), ("model", "m"))
    assert samples[("pixtrain_gpu_utilization_ratio", gpu0)] == pytest.approx(0.87)
    assert samples[("pixtrain_gpu_memory_used_bytes", gpu0)] == 70 * 2**30
    assert samples[("pixtrain_gpu_memory_total_bytes", gpu0)] == 80 * 2**30
    assert samples[("pixtrain_gpu_power_watts", gpu0)] == 250.0
    assert samples[("pixtrain_gpu_temperature_celsius", gpu0)] == 61
    assert samples[
        ("pixtrain_gpu_utilization_ratio", (("asset", "lora_training"), ("gpu", "1"), ("model", "m")))
    ] == pytest.approx(0.03)


def test_a_gpu_without_power_readings_loses_only_that_series(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(power_fails=True))
    names = {name for name, _ in _samples(StepTelemetryFor("bias_report").registry)}
    assert "pixtrain_gpu_power_watts" not in names and "pixtrain_gpu_memory_used_bytes" in names


@pytest.mark.parametrize("nvml", ["missing", "no-driver"])
def test_without_nvml_gpu_series_are_absent_and_nothing_fails(monkeypatch, nvml):
    if nvml == "missing":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    else:
        monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_init=True))
    samples = _samples(StepTelemetryFor("adapter_evaluation").registry)
    names = {name for name, _ in samples}
    assert not any(name.startswith("pixtrain_gpu_") for name in names)
    labels = (("asset", "adapter_evaluation"), ("model", "m"))
    assert samples[("pixtrain_process_resident_memory_bytes", labels)] > 10e6
    assert samples[("pixtrain_process_cpu_seconds_total", labels)] > 0
    assert ("pixtrain_process_read_bytes_total", labels) in samples


def StepTelemetryFor(asset: str) -> tm.StepTelemetry:
    return tm.StepTelemetry(asset, "m")


def test_healthz_turns_503_when_training_makes_no_progress(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    telemetry = StepTelemetryFor("lora_training")
    with tm.MetricsServer(telemetry, port=0, host="127.0.0.1", max_idle_seconds=60) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert http_get(f"{base}/healthz")[0] == 200
        telemetry.last_progress = time.time() - 61  # no step for just over the limit
        status, body = http_get(f"{base}/healthz")
        assert status == 503 and "stalled" in body
        telemetry.mark_progress()
        assert http_get(f"{base}/healthz")[0] == 200
        status, body = http_get(f"{base}/metrics")
        assert status == 200 and "pixtrain_process_resident_memory_bytes" in body
        assert http_get(f"{base}/nothing-here")[0] == 404


def test_server_is_started_only_when_the_port_is_set_and_a_busy_port_is_not_an_error(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    telemetry = StepTelemetryFor("bias_report")
    with tm.serve_step_metrics(telemetry, {}) as server:
        assert server.port is None  # local runs: several steps share the machine, no port
    port = free_port()
    with tm.serve_step_metrics(telemetry, {tm.METRICS_PORT_ENV: str(port), tm.METRICS_HOST_ENV: "127.0.0.1"}) as server:
        assert server.port == port
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200  # not a training step: always live
        with tm.serve_step_metrics(
            telemetry, {tm.METRICS_PORT_ENV: str(port), tm.METRICS_HOST_ENV: "127.0.0.1"}
        ) as clash:
            assert clash.port is None
    assert "could not listen" in caplog.text


def test_step_pods_name_the_metrics_port_and_carry_the_scrape_label():
    from pixtrain_dagster.execution import (
        K8S_CONFIG_TAG,
        METRICS_POD_LABELS,
        METRICS_PORT,
        ExecutionSettings,
        step_pod_tags,
    )

    for kind in ("gpu", "cpu"):
        config = step_pod_tags(kind, ExecutionSettings.from_env({}))[K8S_CONFIG_TAG]
        assert {"name": "metrics", "container_port": METRICS_PORT, "protocol": "TCP"} in config["container_config"][
            "ports"
        ]
        env = {e["name"]: e.get("value") for e in config["container_config"]["env"]}
        assert env[tm.METRICS_PORT_ENV] == str(METRICS_PORT)
        labels = config["pod_template_spec_metadata"]["labels"]
        assert METRICS_POD_LABELS.items() <= labels.items() and labels["pixtrain/step-kind"] == kind


def test_callback_prefers_what_the_training_module_reports(monkeypatch):
    """Fields the training core may add (grad_norm, padding_efficiency, mfu, epochs_completed) are used as given;
    checkpoint saves are timed and left out of the step time."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    telemetry = tm.StepTelemetry("lora_training", "m")
    callback = tm.training_metrics_callback(telemetry, "fp")
    optimizer = types.SimpleNamespace(param_groups=[{"lr": 1e-4}])
    trainer = types.SimpleNamespace(global_step=0, max_steps=10, accumulate_grad_batches=2, optimizers=[optimizer])

    def save_checkpoint(path):
        time.sleep(0.05)

    trainer.save_checkpoint = save_checkpoint
    module = types.SimpleNamespace(
        train_losses=[],
        input_tokens=0,
        trained_tokens=0,
        grad_norm=1.5,
        padding_efficiency=0.9,
        mfu=0.4,
        epochs_completed=2.5,
        last_validation_loss=None,
    )
    callback.setup(trainer, module, "fit")
    callback.on_train_start(trainer, module)
    for micro in range(2):
        callback.on_train_batch_start(
            trainer, module, {"real_tokens": 6, "input_ids": types.SimpleNamespace(numel=lambda: 8)}, micro
        )
        if micro == 1:  # LoraFineTuning reports one loss per optimizer step (normalised over the whole step)
            module.train_losses.append(3.0)
        module.input_tokens += 6
        module.trained_tokens += 2
        if micro == 1:
            callback.on_before_optimizer_step(trainer, module, optimizer)
            trainer.global_step = 1
            trainer.save_checkpoint("/nonexistent/step-1.ckpt")  # as the checkpoint callback does
        callback.on_train_batch_end(trainer, module, None, None, micro)
    module.last_validation_loss = 2.5
    callback.on_validation_epoch_end(trainer, module)
    labels = (("asset", "lora_training"), ("fingerprint", "fp"), ("model", "m"))
    samples = _samples(telemetry.registry)
    assert samples[("pixtrain_training_step", labels)] == 1
    assert samples[("pixtrain_training_loss", labels)] == 3.0  # the step's loss, as the module reports it
    assert samples[("pixtrain_training_grad_norm", labels)] == 1.5
    assert samples[("pixtrain_training_padding_efficiency", labels)] == 0.9
    assert samples[("pixtrain_training_mfu_ratio", labels)] == 0.4
    assert samples[("pixtrain_training_epochs", labels)] == 2.5
    assert samples[("pixtrain_training_learning_rate", labels)] == 1e-4
    assert samples[("pixtrain_training_tokens_total", labels)] == 12
    assert samples[("pixtrain_training_assistant_tokens_total", labels)] == 4
    assert samples[("pixtrain_training_validation_perplexity", labels)] == pytest.approx(2.718281828**2.5)
    assert samples[("pixtrain_training_checkpoint_save_seconds_count", labels)] == 1
    assert samples[("pixtrain_training_checkpoint_save_seconds_sum", labels)] >= 0.05
    assert samples[("pixtrain_training_optimizer_step_seconds_sum", labels)] < 0.05  # the save is not step time


def test_callback_computes_padding_efficiency_and_grad_norm_when_the_module_does_not(monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "pynvml", None)
    telemetry = tm.StepTelemetry("lora_training", "m")
    callback = tm.training_metrics_callback(telemetry)
    layer = torch.nn.Linear(2, 1, bias=False)
    layer.weight.grad = torch.tensor([[3.0, 4.0]])
    trainer = types.SimpleNamespace(global_step=0, max_steps=5, accumulate_grad_batches=1, optimizers=[])
    callback.on_train_start(trainer, layer)
    callback.on_train_batch_start(trainer, layer, {"real_tokens": 3, "input_ids": torch.zeros(2, 2)}, 0)
    callback.on_before_optimizer_step(trainer, layer, torch.optim.SGD(layer.parameters(), lr=0.5))
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, layer, None, None, 0)
    labels = (("asset", "lora_training"), ("fingerprint", "unknown"), ("model", "m"))
    samples = _samples(telemetry.registry)
    assert samples[("pixtrain_training_grad_norm", labels)] == pytest.approx(5.0)
    assert samples[("pixtrain_training_padding_efficiency", labels)] == 0.75
    assert samples[("pixtrain_training_learning_rate", labels)] == 0.5
    assert not any(name == "pixtrain_training_mfu_ratio" for name, _ in samples)  # not reported: absent

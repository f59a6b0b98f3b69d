"""Prometheus metrics from inside a running step: training progress, throughput, timings and resources.

Plain Python (no Dagster). Three pieces:

* ``StepTelemetry``: a private ``CollectorRegistry`` holding the process/GPU resource gauges (psutil, NVML) of
  the step, with constant low-cardinality labels (``asset``, ``model``); the training, evaluation and bias steps
  each create one.
* ``TrainingMetricsCallback``: a Lightning callback that records the training series into a ``StepTelemetry``
  (step, passes over the data, losses, perplexity, learning rate, gradient norm, tokens, timings,
  checkpoint saves, padding efficiency and ``pixtrain_training_last_step_timestamp_seconds``).
* ``MetricsServer``: a small threaded HTTP server with ``/metrics`` (Prometheus text format) and ``/healthz``
  (200 while the training loop made progress in the last ``max_idle_seconds``, 503 after that).

Names follow Prometheus conventions: ``pixtrain_`` prefix, base units (seconds, bytes, ratios 0..1), ``_total``
on counters. Labels never carry run ids or file names. NVML is optional: without the library or a driver the
GPU series are simply absent; no metric ever fails the step (errors are logged once and skipped).

What the callback reads from Lightning, all defensively (``getattr`` with defaults), so the training core can
grow without breaking this module:

* ``trainer.global_step``, ``trainer.max_steps``, ``trainer.optimizers[0].param_groups[0]["lr"]``,
  ``trainer.save_checkpoint`` (wrapped to time checkpoint saves).
* ``pl_module.train_losses`` (one loss per optimizer step), ``pl_module.grad_norms`` (pre-clipping, one per
  step), ``pl_module.input_tokens`` (all real tokens),
  ``pl_module.trained_tokens`` (assistant tokens), ``pl_module.last_validation_loss``,
  ``pl_module.next_micro_step`` and ``pl_module.train_batches.batches_per_pass`` (passes over the data).
* Optional, used when present: ``pl_module.grad_norm`` (without ``grad_norms`` either, computed from the
  trainable parameters' gradients in ``on_before_optimizer_step``), ``pl_module.padding_efficiency`` (else real
  tokens / batch positions of the micro-batches, from ``batch["real_tokens"]`` and ``batch["input_ids"]``),
  ``pl_module.mfu`` (model FLOPs utilisation, 0..1; the series is absent when the module does not report it),
  ``pl_module.epochs_completed``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

log = logging.getLogger(__name__)

METRICS_PORT_ENV = "PIXTRAIN_METRICS_PORT"  # unset: no server (local runs); "0": any free port (tests)
METRICS_HOST_ENV = "PIXTRAIN_METRICS_HOST"
HEALTH_MAX_IDLE_ENV = "PIXTRAIN_HEALTH_MAX_IDLE_SECONDS"
DEFAULT_MAX_IDLE_SECONDS = 900.0

# Optimizer steps take from milliseconds (tiny CPU model) to minutes (large model, long sequences).
STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DATA_WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CHECKPOINT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


# ---- resources ---------------------------------------------------------------------------------------------


def _load_nvml():
    """The initialised ``pynvml`` module (nvidia-ml-py), or None when the library or a driver is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as error:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPU series, never a failure
        log.info("NVML unavailable (%s): GPU metrics are not exported", error)
        return None
    return pynvml


class ResourceCollector:
    """Process CPU, RSS and I/O (psutil) and per-GPU utilisation, memory, power and temperature (NVML).

    A custom collector: values are read when Prometheus scrapes, so they cost nothing between scrapes.
    """

    def __init__(self, labels: Mapping[str, str], nvml: Any = "auto"):
        import psutil

        self.labels = dict(labels)
        self.process = psutil.Process()
        self.nvml = _load_nvml() if nvml == "auto" else nvml
        self._warned: set[str] = set()

    def _warn_once(self, what: str, error: Exception) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("metrics: cannot read %s (%s); the series is skipped", what, error)

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        names, values = list(self.labels), list(self.labels.values())
        try:
            cpu = self.process.cpu_times()
            family = CounterMetricFamily(
                "pixtrain_process_cpu_seconds", "CPU time of the step process (user+system).", labels=names
            )
            family.add_metric(values, cpu.user + cpu.system)
            yield family
            family = GaugeMetricFamily(
                "pixtrain_process_resident_memory_bytes", "Resident memory of the step process.", labels=names
            )
            family.add_metric(values, self.process.memory_info().rss)
            yield family
        except Exception as error:
            self._warn_once("process CPU/memory", error)
        try:
            io = self.process.io_counters()
            for name, value, text in (
                ("read", io.read_bytes, "read from storage"),
                ("written", io.write_bytes, "written to storage"),
            ):
                family = CounterMetricFamily(
                    f"pixtrain_process_{name}_bytes", f"Bytes the step process {text}.", labels=names
                )
                family.add_metric(values, value)
                yield family
        except Exception as error:  # not on every platform / container runtime
            self._warn_once("process I/O counters", error)
        if self.nvml is not None:
            yield from self._gpu_families(names, values)

    def _gpu_families(self, names: list[str], values: list[str]) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        nvml = self.nvml
        gpu_names = [*names, "gpu"]
        families = {
            "util": GaugeMetricFamily(
                "pixtrain_gpu_utilization_ratio",
                "Fraction of the last sample period a kernel ran on the GPU (0..1).",
                labels=gpu_names,
            ),
            "used": GaugeMetricFamily("pixtrain_gpu_memory_used_bytes", "GPU memory in use.", labels=gpu_names),
            "total": GaugeMetricFamily("pixtrain_gpu_memory_total_bytes", "GPU memory installed.", labels=gpu_names),
            "power": GaugeMetricFamily("pixtrain_gpu_power_watts", "GPU power draw.", labels=gpu_names),
            "temp": GaugeMetricFamily("pixtrain_gpu_temperature_celsius", "GPU core temperature.", labels=gpu_names),
        }
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as error:
            self._warn_once("NVML device count", error)
            return
        for index in range(count):
            label_values = [*values, str(index)]
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                families["util"].add_metric(label_values, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                families["used"].add_metric(label_values, memory.used)
                families["total"].add_metric(label_values, memory.total)
            except Exception as error:
                self._warn_once(f"NVML utilisation/memory of GPU {index}", error)
                continue
            try:  # not every board reports power
                families["power"].add_metric(label_values, nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
            except Exception as error:
                self._warn_once(f"NVML power of GPU {index}", error)
            try:
                families["temp"].add_metric(
                    label_values, nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                )
            except Exception as error:
                self._warn_once(f"NVML temperature of GPU {index}", error)
        for family in families.values():
            if family.samples:
                yield family


class StepTelemetry:
    """The metrics of one step process: a private registry with resource gauges and a progress clock."""

    def __init__(self, asset: str, model: str = "", *, nvml: Any = "auto", resources: bool = True):
        from prometheus_client import CollectorRegistry

        self.labels = {"asset": asset, "model": model or "unknown"}
        self.registry = CollectorRegistry(auto_describe=True)
        self.started = time.time()
        self.last_progress = self.started  # a fresh step counts as alive; the training callback moves this on
        if resources:
            self.registry.register(ResourceCollector(self.labels, nvml=nvml))

    def mark_progress(self) -> None:
        self.last_progress = time.time()

    def healthy(self, max_idle_seconds: float | None) -> tuple[bool, str]:
        idle = time.time() - self.last_progress
        if max_idle_seconds is None or idle <= max_idle_seconds:
            return True, f"ok: last progress {idle:.0f}s ago\n"
        return False, f"stalled: no progress for {idle:.0f}s (limit {max_idle_seconds:.0f}s)\n"

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---- the training callback ---------------------------------------------------------------------------------


def _lightning_callback_base():
    import lightning as L

    return L.Callback


def _grad_norm(pl_module: Any) -> float | None:
    import torch

    norms = [p.grad.detach().float().norm(2) for p in pl_module.parameters() if p.requires_grad and p.grad is not None]
    if not norms:
        return None
    return float(torch.linalg.vector_norm(torch.stack(norms), 2))


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def training_metrics_callback(telemetry: StepTelemetry, fingerprint: str = ""):
    """A Lightning callback recording training metrics into ``telemetry``'s registry (see the module doc)."""
    return _make_callback_class()(telemetry, fingerprint)


@functools.cache
def _make_callback_class():
    base = _lightning_callback_base()

    class TrainingMetricsCallback(base):
        def __init__(self, telemetry: StepTelemetry, fingerprint: str = ""):
            from prometheus_client import Counter, Gauge, Histogram

            self.telemetry = telemetry
            labels = {**telemetry.labels, "fingerprint": fingerprint or "unknown"}
            names = list(labels)
            registry = telemetry.registry

            def gauge(name: str, text: str):
                return Gauge(name, text, names, registry=registry).labels(**labels)

            def counter(name: str, text: str):
                return Counter(name, text, names, registry=registry).labels(**labels)

            def histogram(name: str, text: str, buckets):
                return Histogram(name, text, names, registry=registry, buckets=buckets).labels(**labels)

            self.step = gauge("pixtrain_training_step", "Optimizer steps completed (global step).")
            self.max_steps = gauge("pixtrain_training_max_steps", "Optimizer steps the run is configured for.")
            self.epochs = gauge("pixtrain_training_epochs", "Passes over the training data so far (fractional).")
            self.loss = gauge(
                "pixtrain_training_loss", "Training loss of the last optimizer step (mean over its micro-batches)."
            )
            self.validation_loss = gauge("pixtrain_training_validation_loss", "Held-out loss at the last validation.")
            self.perplexity = gauge("pixtrain_training_perplexity", "exp(training loss) of the last optimizer step.")
            self.validation_perplexity = gauge("pixtrain_training_validation_perplexity", "exp(validation loss).")
            self.learning_rate = gauge("pixtrain_training_learning_rate", "Learning rate of the last optimizer step.")
            self.grad_norm = gauge("pixtrain_training_grad_norm", "L2 norm of the gradients before clipping.")
            self.tokens = counter("pixtrain_training_tokens", "Non-padding tokens processed.")
            self.assistant_tokens = counter("pixtrain_training_assistant_tokens", "Assistant tokens that carried loss.")
            self.tokens_per_second = gauge(
                "pixtrain_training_tokens_per_second", "Non-padding tokens per second over the last optimizer step."
            )
            self.assistant_tokens_per_second = gauge(
                "pixtrain_training_assistant_tokens_per_second",
                "Assistant (trained) tokens per second over the last optimizer step.",
            )
            self.padding_efficiency = gauge(
                "pixtrain_training_padding_efficiency",
                "Real tokens / batch positions of the last optimizer step (1 = no padding).",
            )
            self.step_seconds = histogram(
                "pixtrain_training_optimizer_step_seconds",
                "Wall time of one optimizer step, data loading included.",
                STEP_SECONDS_BUCKETS,
            )
            self.data_wait_seconds = histogram(
                "pixtrain_training_data_wait_seconds",
                "Time one optimizer step waited for its batches.",
                DATA_WAIT_BUCKETS,
            )
            self.checkpoint_seconds = histogram(
                "pixtrain_training_checkpoint_save_seconds", "Time to write one checkpoint.", CHECKPOINT_BUCKETS
            )
            self.checkpoint_bytes = gauge("pixtrain_training_checkpoint_size_bytes", "Size of the last checkpoint.")
            self.checkpoint_written = counter("pixtrain_training_checkpoint_written_bytes", "Checkpoint bytes written.")
            self.last_step_time = gauge(
                "pixtrain_training_last_step_timestamp_seconds",
                "Unix time of the last completed optimizer step (stall detection).",
            )
            self.started_time = gauge(
                "pixtrain_training_start_timestamp_seconds", "Unix time the training loop started."
            )
            self._mfu_gauge = lambda: Gauge(
                "pixtrain_training_mfu_ratio", "Model FLOPs utilisation (0..1).", names, registry=registry
            ).labels(**labels)
            self.mfu = None
            self._wrapped_save = False
            self._reset_step_window(time.perf_counter())
            self._last_batch_end = None
            self._last_step = None
            self._tokens_seen = self._assistant_seen = None
            self._pending_grad_norm: float | None = None
            self._pending_lr: float | None = None
            self.last_step_time.set(time.time())  # the step started: loading the model counts as progress

        # -- helpers --
        def _reset_step_window(self, now: float) -> None:
            self._window_start = now
            self._window_excluded = 0.0  # checkpoint saves and validation inside the window: not step time
            self._window_data_wait = 0.0
            self._window_real = 0
            self._window_positions = 0

        def _sync_counters(self, pl_module) -> tuple[int, int]:
            tokens = int(getattr(pl_module, "input_tokens", 0) or 0)
            assistant = int(getattr(pl_module, "trained_tokens", 0) or 0)
            if self._tokens_seen is None:  # first look (or a resumed run): counters start from here
                self._tokens_seen, self._assistant_seen = tokens, assistant
            new_tokens, new_assistant = max(0, tokens - self._tokens_seen), max(0, assistant - self._assistant_seen)
            self.tokens.inc(new_tokens)
            self.assistant_tokens.inc(new_assistant)
            self._tokens_seen, self._assistant_seen = tokens, assistant
            return new_tokens, new_assistant

        def _wrap_checkpoint_saves(self, trainer) -> None:
            if self._wrapped_save or not callable(getattr(trainer, "save_checkpoint", None)):
                return
            original = trainer.save_checkpoint
            callback = self

            def timed_save_checkpoint(filepath, *args, **kwargs):
                started = time.perf_counter()
                result = original(filepath, *args, **kwargs)
                callback.record_checkpoint(time.perf_counter() - started, _size_of(filepath))
                return result

            trainer.save_checkpoint = timed_save_checkpoint
            self._wrapped_save = True

        def record_checkpoint(self, seconds: float, size_bytes: int | None) -> None:
            """Also callable by the training core, e.g. to time the whole save + publish."""
            self.checkpoint_seconds.observe(max(0.0, seconds))
            self._window_excluded += max(0.0, seconds)
            if size_bytes is not None:
                self.checkpoint_bytes.set(size_bytes)
                self.checkpoint_written.inc(size_bytes)

        # -- Lightning hooks --
        def setup(self, trainer, pl_module, stage: str) -> None:
            self._wrap_checkpoint_saves(trainer)

        def on_train_start(self, trainer, pl_module) -> None:
            self._wrap_checkpoint_saves(trainer)
            self.started_time.set(time.time())
            self.max_steps.set(max(0, int(getattr(trainer, "max_steps", 0) or 0)))
            self.step.set(int(getattr(trainer, "global_step", 0) or 0))
            self._last_step = int(getattr(trainer, "global_step", 0) or 0)
            self._tokens_seen = None
            self._sync_counters(pl_module)
            now = time.perf_counter()
            self._reset_step_window(now)
            self._last_batch_end = now
            self.telemetry.mark_progress()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            now = time.perf_counter()
            if self._last_batch_end is not None:
                self._window_data_wait += max(0.0, now - self._last_batch_end)
            try:
                self._window_real += int(batch["real_tokens"])
                self._window_positions += int(batch["input_ids"].numel())
            except (KeyError, TypeError, AttributeError):
                pass

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            try:  # the rate this step uses (the scheduler moves it on right after the step)
                self._pending_lr = float(optimizer.param_groups[0]["lr"])
            except (AttributeError, IndexError, KeyError, TypeError, ValueError):
                self._pending_lr = None
            if getattr(pl_module, "grad_norm", None) is None and not hasattr(pl_module, "grad_norms"):
                try:
                    self._pending_grad_norm = _grad_norm(pl_module)
                except Exception as error:
                    log.debug("metrics: gradient norm unavailable (%s)", error)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            self._last_batch_end = now
            step = int(getattr(trainer, "global_step", 0) or 0)
            if step == self._last_step:
                return  # still accumulating gradients for this optimizer step
            self._last_step = step
            elapsed = max(0.0, now - self._window_start - self._window_excluded)
            self.step_seconds.observe(elapsed)
            self.data_wait_seconds.observe(self._window_data_wait)
            self.step.set(step)
            self.last_step_time.set(time.time())
            self.telemetry.mark_progress()

            new_tokens, new_assistant = self._sync_counters(pl_module)
            if elapsed > 0:
                self.tokens_per_second.set(new_tokens / elapsed)
                self.assistant_tokens_per_second.set(new_assistant / elapsed)
            # One loss per optimizer step (LoraFineTuning reads them from the device at its log interval).
            losses = list(getattr(pl_module, "train_losses", []) or [])
            loss = _finite(losses[-1]) if losses else None
            if loss is not None:
                self.loss.set(loss)
                self.perplexity.set(math.exp(min(loss, 700.0)))
            self._record_lr(trainer)
            norms = getattr(pl_module, "grad_norms", None)  # pre-clipping norms, one per step, already on the host
            grad_norm = _finite(norms[-1] if norms else getattr(pl_module, "grad_norm", None))
            if grad_norm is None:
                grad_norm = _finite(self._pending_grad_norm)
            if grad_norm is not None:
                self.grad_norm.set(grad_norm)
            efficiency = _finite(getattr(pl_module, "padding_efficiency", None))
            if efficiency is None and self._window_positions:
                efficiency = self._window_real / self._window_positions
            if efficiency is not None:
                self.padding_efficiency.set(efficiency)
            self._record_epochs(pl_module)
            mfu = _finite(getattr(pl_module, "mfu", None))
            if mfu is not None:
                if self.mfu is None:
                    self.mfu = self._mfu_gauge()
                self.mfu.set(mfu)
            self._reset_step_window(now)

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            loss = _finite(getattr(pl_module, "last_validation_loss", None))
            if loss is not None:
                self.validation_loss.set(loss)
                self.validation_perplexity.set(math.exp(min(loss, 700.0)))
            self.telemetry.mark_progress()

        def on_validation_start(self, trainer, pl_module) -> None:
            self._validation_started = time.perf_counter()

        def on_validation_end(self, trainer, pl_module) -> None:
            # Validation is neither step time nor data waiting.
            now = time.perf_counter()
            if getattr(self, "_validation_started", None) is not None:
                self._window_excluded += now - self._validation_started
                self._validation_started = None
            self._last_batch_end = now

        def _record_lr(self, trainer) -> None:
            if self._pending_lr is not None:
                self.learning_rate.set(self._pending_lr)
                return
            try:
                self.learning_rate.set(float(trainer.optimizers[0].param_groups[0]["lr"]))
            except (AttributeError, IndexError, KeyError, TypeError, ValueError):
                pass

        def _record_epochs(self, pl_module) -> None:
            epochs = _finite(getattr(pl_module, "epochs_completed", None))
            if epochs is None:
                per_pass = getattr(getattr(pl_module, "train_batches", None), "batches_per_pass", None)
                micro = getattr(pl_module, "next_micro_step", None)
                if per_pass and micro is not None:
                    epochs = micro / per_pass
            if epochs is not None:
                self.epochs.set(epochs)

    return TrainingMetricsCallback


def _size_of(filepath: Any) -> int | None:
    try:
        return os.path.getsize(filepath)
    except (OSError, TypeError):
        return None


# ---- the HTTP server ---------------------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: no access log
        pass


def _threading_server_class():
    from socketserver import ThreadingMixIn

    class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        allow_reuse_address = True

    return ThreadingWSGIServer


class MetricsServer:
    """``/metrics`` and ``/healthz`` for one step, on a background thread. Use as a context manager."""

    def __init__(
        self,
        telemetry: StepTelemetry,
        port: int,
        host: str = "0.0.0.0",
        max_idle_seconds: float | None = DEFAULT_MAX_IDLE_SECONDS,
    ):
        self.telemetry = telemetry
        self.host, self.requested_port = host, port
        self.max_idle_seconds = max_idle_seconds
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_port if self._server else self.requested_port

    def app(self, environ: dict[str, Any], start_response: Callable) -> list[bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST

        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            ok, text = self.telemetry.healthy(self.max_idle_seconds)
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [text.encode()]
        if path in ("/metrics", "/"):
            body = self.telemetry.exposition()
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"try /metrics or /healthz\n"]

    def start(self) -> MetricsServer:
        self._server = make_server(
            self.host,
            self.requested_port,
            self.app,
            server_class=_threading_server_class(),
            handler_class=_QuietHandler,
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="pixtrain-metrics", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics (health: /healthz)", self.host, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> MetricsServer:
        return self if self._server is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _NoServer:
    port = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def serve_step_metrics(telemetry: StepTelemetry, environ: Mapping[str, str] | None = None, training: bool = False):
    """A context manager serving ``telemetry`` when ``PIXTRAIN_METRICS_PORT`` is set (the step pods set it).

    Unset (local runs, where several steps share one machine) means no server. A port that cannot be bound is
    logged, never raised: metrics must not fail a training step. ``/healthz`` applies the stall limit
    (``PIXTRAIN_HEALTH_MAX_IDLE_SECONDS``, default 900) only to training steps.
    """
    env = os.environ if environ is None else environ
    raw = (env.get(METRICS_PORT_ENV) or "").strip()
    if not raw:
        return _NoServer()
    try:
        port = int(raw)
        max_idle = float(env.get(HEALTH_MAX_IDLE_ENV) or DEFAULT_MAX_IDLE_SECONDS)
    except ValueError:
        log.warning("%s=%r or %s is not a number; metrics are not served", METRICS_PORT_ENV, raw, HEALTH_MAX_IDLE_ENV)
        return _NoServer()
    server = MetricsServer(
        telemetry, port, env.get(METRICS_HOST_ENV) or "0.0.0.0", max_idle_seconds=max_idle if training else None
    )
    try:
        return server.start()
    except OSError as error:
        log.warning("metrics server could not listen on port %s (%s); continuing without it", raw, error)
        return _NoServer()

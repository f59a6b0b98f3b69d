"""What FSDP changes for LoRA training: how the model is cut into FSDP units, the names its parameters are saved
under, and how gradients are clipped. Plain PyTorch; core/training.py and core/lightning_module.py use it."""

from __future__ import annotations

from typing import Any

# Wrappers FSDP (and its activation checkpointing) put between a module and its children. They show in
# named_parameters() of a wrapped model, not in its full state dict.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def fsdp_wrap_policy(layer_class: type | None) -> Any:
    """Each decoder layer its own FSDP unit, and each trainable leaf inside it (LoRA's A and B) its own too.

    FSDP flattens a unit's parameters into one tensor of one dtype. Under bf16-mixed the frozen base is bf16 and
    PEFT keeps the LoRA weights in fp32, so a decoder layer holding both cannot be flattened ("Must flatten
    tensors with uniform dtype"). This is PEFT's own FSDP recipe (peft.utils.other.fsdp_auto_wrap_policy), written
    with PyTorch's public CustomPolicy instead of importing accelerate."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    def own_unit(module: Any) -> bool:
        if layer_class is not None and isinstance(module, layer_class):
            return True
        weight = getattr(module, "weight", None)
        return next(module.children(), None) is None and weight is not None and weight.requires_grad

    return CustomPolicy(own_unit)


def clean_parameter_name(name: str) -> str:
    """A parameter's name as a full state dict spells it: FSDP's wrapper modules removed."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trainable_parameter_names(module: Any) -> set[str]:
    """Names of the parameters that train (the LoRA weights), as the module's full state dict spells them."""
    return {clean_parameter_name(name) for name, p in module.named_parameters() if p.requires_grad}


def trainable_full_state_dict(root: Any) -> dict[str, Any]:
    """The trainable (LoRA) weights of an FSDP-wrapped model as a full state dict on the CPU, on every rank (a
    collective: every rank calls it; LoRA weights are megabytes). A plain full state dict would first gather every
    frozen base weight into rank 0's host memory (a 70B base: ~140 GB) at each checkpoint, only for the LoRA ones
    to be kept. Gathered on the device and copied here: torch 2.13's cpu_offload option with ignore_frozen_params
    fails (a KeyError for a frozen weight on one rank, a crash on the other)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    return {name: tensor.cpu() for name, tensor in get_model_state_dict(root, options=options).items()}


def clip_gradients(root: Any, trainable: list[Any], max_norm: float) -> Any:
    """Clip the gradients of the whole model to ``max_norm``; returns their total norm (a device tensor).

    Under FSDP each rank holds a shard of every gradient, so a norm over the local tensors is each rank's own and
    each would clip by a different factor; FSDP's own clip_grad_norm_ reduces the norm over the ranks first (and
    must be called on every rank)."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(root, FullyShardedDataParallel):
        return root.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(trainable, max_norm, foreach=True)

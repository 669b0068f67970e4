"""Hugging Face transformers: export a registered model as a folder from_pretrained loads."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ._checkpoint import save_plain
from ._tree import unwrap

__all__ = ["save_pretrained"]


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``config.json`` (and ``generation_config.json``) plus the fused ``model.safetensors``.

    ``AutoModelForCausalLM.from_pretrained(folder)`` (or the model's own class)
    then loads it without mdparam. The folder is created if needed; an
    existing ``model.safetensors`` in it is refused unless ``overwrite``.

    Example (transformers installed):
        >>> import tempfile, torch, mdparam
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> model = LlamaForCausalLM(config)
        >>> _ = mdparam.register(model)
        >>> folder = tempfile.mkdtemp()
        >>> _ = mdparam.save_pretrained(model, folder)
        >>> plain = LlamaForCausalLM.from_pretrained(folder)  # a plain model, no mdparam
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)
        True
    """
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError(
            f"mdparam.save_pretrained needs a transformers model (with .config); {type(inner).__name__} "
            "has none. Use mdparam.save_plain for other models"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.safetensors"
    save_plain(
        model, target, dtype=dtype, overwrite=overwrite
    )  # checks and writes first: nothing half-done
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return folder  # the weights needed every rank's gathers; rank 0 writes the rest
    config.save_pretrained(folder)
    generation = getattr(inner, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(folder)
    return folder

"""Training checkpoints (tensors and plain values only, loaded with ``weights_only=True``: never unpickles code)
and the exported backbone (``backbone.safetensors``: timm parameter names, architecture in the metadata)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import Config
from .model import LOCA, timm_kwargs, timm_model_name

CHECKPOINT_FORMAT = "loca-checkpoint-v1"
BACKBONE_FORMAT = "loca-backbone-v1"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # the previous checkpoint stays intact until the new one is complete


def save_checkpoint(path: Path, student: LOCA, teacher: LOCA, optimizer: Optional[torch.optim.Optimizer],
                    step: int, cfg: Config, num_images: Optional[int] = None,
                    extra: Optional[Dict[str, Any]] = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": cfg.to_dict(),
        "num_images": num_images,
        "extra": extra or {},  # world size, the small-batch queue, the fp16 gradient scaler
    }
    _atomic_torch_save(state, path)


def load_checkpoint(path: Path, map_location="cpu") -> Dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a crafted or foreign pickle is refused, never executed
        raise RuntimeError(f"{path}: not a loadable LOCA checkpoint ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"{path}: not a LOCA checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def encoder_state(model: LOCA) -> Dict[str, torch.Tensor]:
    """The encoder's parameters under timm's names (``blocks.0.attn.qkv.weight``, ``pos_embed``, ...)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.encoder.vit.state_dict().items()}


def export_backbone(path: Path, model: LOCA, cfg: Config, which: str = "teacher", step: int = 0) -> None:
    meta = {
        "format": BACKBONE_FORMAT,
        "timm_model": timm_model_name(cfg),
        "timm_kwargs": json.dumps(timm_kwargs(cfg)),
        "which": which,
        "step": str(step),
        "config": json.dumps(cfg.to_dict()),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(encoder_state(model), str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_backbone_metadata(path: os.PathLike) -> Dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != BACKBONE_FORMAT:
        raise RuntimeError(f"{path}: not a LOCA backbone file (no {BACKBONE_FORMAT} metadata)")
    return meta


def load_backbone(path: os.PathLike, **overrides):
    """Rebuild the timm ``VisionTransformer`` that ``backbone.safetensors`` holds, from its metadata alone."""
    import timm
    from safetensors.torch import load_file

    meta = read_backbone_metadata(path)
    kwargs = json.loads(meta["timm_kwargs"])
    kwargs.update(overrides)
    model = timm.create_model(meta["timm_model"], pretrained=False, **kwargs)
    model.load_state_dict(load_file(str(path)))
    return model

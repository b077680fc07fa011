"""Training checkpoints (tensors and plain values only, loaded with ``weights_only=True``: never unpickles code)
and the exported backbone (``backbone.safetensors``: timm parameter names, architecture in the metadata)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import Config
from .model import LOCA, timm_kwargs, timm_model_name

CHECKPOINT_FORMAT = "loca-checkpoint-v1"
BACKBONE_FORMAT = "loca-backbone-v1"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous one is untouched."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def output_folder(out: Path):
    """Create ``out`` for a command; if the command fails before writing anything there (a start-up check),
    remove the folder again, so a mistyped flag leaves no empty run folder behind."""
    out = Path(out)
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if not existed:
            try:
                out.rmdir()  # only succeeds while it is empty
            except OSError:
                pass
        raise


def _default_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` into a temporary file beside it, fsync it, rename it over
    ``path``, fsync the folder: a crash at any moment leaves either the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.chmod(tmp, _default_file_mode())  # safetensors creates its files 0600; every output reads like the rest
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports ENOSPC as a RuntimeError
        try:
            tmp.unlink()
        except OSError:
            pass
        text = str(exc).lower()
        # torch's zip writer turns a short write into "unexpected pos ..." (the errno is lost on the way)
        full = (exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) if isinstance(exc, OSError) else
                "unexpected pos" in text or "write" in text)
        reason = ("writing stopped part-way: the disk is full or a quota / file-size limit was hit" if full
                  else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
        raise CheckpointError(f"could not write {path} ({reason}){kept}. Free space or choose another --out, "
                              f"then run the same command again to resume") from None


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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


# ---- the run's checkpoint folder: step_XXXXXXXX.pt history + last.pt (a hard link to the newest) ---------
_STEP_FILE = re.compile(r"^step_(\d{8,})\.pt$")


def checkpoint_history(directory: Path) -> List[Tuple[int, Path]]:
    """(step, path) of the step_XXXXXXXX.pt files in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), directory / name) for name in os.listdir(directory)
             if (m := _STEP_FILE.match(name))]
    return sorted(found)


def save_run_checkpoint(directory: Path, step: int, keep: int, **state) -> Path:
    """Write ``directory/step_XXXXXXXX.pt`` atomically, point ``last.pt`` at it (hard link, atomic rename;
    a copy where the file system has no hard links), and delete all but the ``keep`` newest step files."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"step_{int(step):08d}.pt"
    save_checkpoint(target, step=step, **state)
    last = directory / "last.pt"

    def link(tmp: Path) -> None:
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
    atomic_write(last, link)
    for _, old in checkpoint_history(directory)[:-max(1, keep)]:
        try:
            old.unlink()
        except OSError:
            pass
    return target


def remove_partial_files(directory: Path) -> List[Path]:
    """Delete the ``*.tmp`` files a killed writer left behind (never a complete checkpoint)."""
    removed = []
    if directory.is_dir():
        for tmp in directory.glob("*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def load_latest_checkpoint(directory: Path, map_location="cpu") -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest checkpoint in ``directory`` that loads: the step files newest first, then ``last.pt`` (which
    lags the newest step file only when a kill fell between the two writes; a converted official checkpoint
    is a lone ``last.pt``). A file that does not load is reported and passed over. None when there is none."""
    candidates = [p for _, p in reversed(checkpoint_history(directory))] + [directory / "last.pt"]
    failures = []
    for path in candidates:
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path, map_location)
        except RuntimeError as exc:
            failures.append(str(exc))
            continue
        for message in failures:
            warnings.warn(f"passing over a checkpoint that does not load: {message}", stacklevel=2)
        return path, state
    if failures:
        raise RuntimeError(f"{directory}: no checkpoint there loads ({'; '.join(failures)}); move the folder "
                           f"away to start again")
    return None


def load_checkpoint(path: Path, map_location="cpu") -> Dict[str, Any]:
    try:
        with warnings.catch_warnings():  # torch's "pickle protocol" notice for a foreign file: ours says it all
            warnings.simplefilter("ignore")
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
    write_backbone(path, encoder_state(model), cfg, which, step)


def write_backbone(path: Path, tensors: Dict[str, torch.Tensor], cfg: Config, which: str, step: int = 0) -> None:
    """timm-named encoder tensors -> ``backbone.safetensors`` with the metadata that rebuilds the ViT."""
    meta = {
        "format": BACKBONE_FORMAT,
        "timm_model": timm_model_name(cfg),
        "timm_kwargs": json.dumps(timm_kwargs(cfg)),
        "which": which,
        "step": str(step),
        "config": json.dumps(cfg.to_dict()),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


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

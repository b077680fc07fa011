"""Official Flax LOCA checkpoints -> PyTorch: a full LOCA run folder that ``loca pretrain`` continues from,
plus ``backbone.safetensors``. Reads Flax's single-file msgpack format with ``msgpack`` and NumPy only."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from .config import Config, dump_config, validate
from .model import LOCA

# Released checkpoints name the projection head "output_projection" (scenic issue #1104); both are accepted.


def read_flax_msgpack(path: Path) -> Dict:
    import msgpack

    def ext_hook(code, data):
        if code in (1, 3):  # numpy array / numpy scalar: [shape, dtype, raw C-order bytes]
            shape, dtype, buf = msgpack.unpackb(data)
            arr = np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)
            return arr if code == 1 else arr[()]
        return msgpack.ExtType(code, data)

    path = Path(path)
    if not path.exists():
        raise RuntimeError(f"{path}: no such checkpoint file or folder")
    if path.is_dir():  # a Flax workdir: take the latest checkpoint_<step>
        found = sorted(path.glob("checkpoint_*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
        found = [p for p in found if p.is_file()]
        if not found:
            raise RuntimeError(f"{path}: no Flax checkpoint_<step> file inside (Orbax folders are not supported)")
        path = found[-1]
    try:
        return msgpack.unpackb(path.read_bytes(), ext_hook=ext_hook, strict_map_key=False, raw=False)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"{path}: not a Flax msgpack checkpoint ({type(exc).__name__}: {exc})") from None


def flatten(tree, prefix: str = "") -> Dict[str, np.ndarray]:
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}/"))
    elif tree is not None:
        out[prefix[:-1]] = np.asarray(tree)
    return out


def _normalise_names(flat: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    out = {}
    for key, value in flat.items():
        key = key.replace("output_projection/", "projection_head_for_clustering_prediction/")
        key = re.sub(r"^(params/)?(Transformer/)?", "", key)
        out[key.replace("Transformer/", "")] = value
    return out


def infer_config(params: Dict[str, np.ndarray]) -> Config:
    """The architecture, read off the parameter shapes; everything else is the official recipe."""
    cfg = Config()
    kernel = params["ToTokenSequence_0/embedding/kernel"]
    patch, width = kernel.shape[0], kernel.shape[3]
    grid = params["ToTokenSequence_0/posembed_input"].shape[1]
    depth = len({k.split("/")[0] for k in params if k.startswith("encoderblock_")})
    heads = params["encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"].shape[1]
    mlp = params["encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]
    m = cfg.model
    m.patch_size, m.width, m.depth, m.heads, m.mlp_ratio = int(patch), int(width), depth, int(heads), mlp / width
    head = "projection_head_for_clustering_prediction"
    if f"{head}/Dense_0/kernel" in params:
        m.head_hidden = int(params[f"{head}/Dense_0/kernel"].shape[1])
        m.head_bottleneck = int(params[f"{head}/prototypes/kernel"].shape[0])
        m.num_prototypes = int(params[f"{head}/prototypes/kernel"].shape[1])
    cfg.views.reference_size = int(grid * patch)
    cfg.views.random_query_size = int(grid * patch)
    validate(cfg)
    return cfg


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _dense(params, prefix) -> Dict[str, torch.Tensor]:
    return {"weight": _t(params[f"{prefix}/kernel"]).t().contiguous(), "bias": _t(params[f"{prefix}/bias"])}


def _norm(params, prefix) -> Dict[str, torch.Tensor]:
    return {"weight": _t(params[f"{prefix}/scale"]), "bias": _t(params[f"{prefix}/bias"])}


def _proj(params, name, width) -> torch.Tensor:
    return _t(params[name]).reshape(width, width).t()


def flax_to_state_dict(params: Dict[str, np.ndarray], cfg: Config, reference: Dict[str, torch.Tensor]):
    """Flax parameter dict ('/'-joined paths) -> LOCA state dict. ``reference`` (a freshly initialised
    model's state) fills in modules the checkpoint lacks; their names are returned as ``missing``."""
    c = cfg.model.width
    sd: Dict[str, torch.Tensor] = {}

    def put(prefix, tensors):
        for k, v in tensors.items():
            sd[f"{prefix}.{k}"] = v

    kernel = _t(params["ToTokenSequence_0/embedding/kernel"])
    sd["encoder.vit.patch_embed.proj.weight"] = kernel.permute(3, 2, 0, 1).contiguous()
    sd["encoder.vit.patch_embed.proj.bias"] = _t(params["ToTokenSequence_0/embedding/bias"])
    sd["encoder.vit.pos_embed"] = _t(params["ToTokenSequence_0/posembed_input"]).reshape(1, -1, c)

    def attention(flax_prefix):
        qkv = [_proj(params, f"{flax_prefix}/{n}/kernel", c) for n in ("query", "key", "value")]
        bias = [_t(params[f"{flax_prefix}/{n}/bias"]).reshape(c) for n in ("query", "key", "value")]
        out_w = _t(params[f"{flax_prefix}/out/kernel"]).reshape(c, c).t().contiguous()
        return qkv, bias, out_w, _t(params[f"{flax_prefix}/out/bias"])

    for layer in range(cfg.model.depth):
        f, t = f"encoderblock_{layer}", f"encoder.vit.blocks.{layer}"
        put(f"{t}.norm1", _norm(params, f"{f}/LayerNorm_0"))
        qkv, bias, out_w, out_b = attention(f"{f}/MultiHeadDotProductAttention_0")
        sd[f"{t}.attn.qkv.weight"] = torch.cat(qkv, 0).contiguous()
        sd[f"{t}.attn.qkv.bias"] = torch.cat(bias, 0)
        sd[f"{t}.attn.proj.weight"], sd[f"{t}.attn.proj.bias"] = out_w, out_b
        put(f"{t}.norm2", _norm(params, f"{f}/LayerNorm_1"))
        put(f"{t}.mlp.fc1", _dense(params, f"{f}/MlpBlock_0/Dense_0"))
        put(f"{t}.mlp.fc2", _dense(params, f"{f}/MlpBlock_0/Dense_1"))
    put("encoder.vit.norm", _norm(params, "encoder_norm"))

    head = "projection_head_for_clustering_prediction"
    if f"{head}/Dense_0/kernel" in params:
        for i in range(3):
            put(f"proj_head.mlp.{2 * i}", _dense(params, f"{head}/Dense_{i}"))
        sd["proj_head.prototypes"] = _t(params[f"{head}/prototypes/kernel"]).t().contiguous()
    g = "cross_attention_block"
    if f"{g}/LayerNorm_0/scale" in params:
        put("cross_block.norm_q", _norm(params, f"{g}/LayerNorm_0"))
        put("cross_block.norm_kv", _norm(params, f"{g}/LayerNorm_1"))
        qkv, bias, out_w, out_b = attention(f"{g}/MultiHeadDotProductAttention_0")
        sd["cross_block.q.weight"], sd["cross_block.q.bias"] = qkv[0].contiguous(), bias[0]
        sd["cross_block.kv.weight"] = torch.cat(qkv[1:], 0).contiguous()
        sd["cross_block.kv.bias"] = torch.cat(bias[1:], 0)
        sd["cross_block.proj.weight"], sd["cross_block.proj.bias"] = out_w, out_b
        put("cross_block.norm2", _norm(params, f"{g}/LayerNorm_2"))
        put("cross_block.mlp.fc1", _dense(params, f"{g}/MlpBlock_0/Dense_0"))
        put("cross_block.mlp.fc2", _dense(params, f"{g}/MlpBlock_0/Dense_1"))
    if "final_norm/scale" in params:
        put("final_norm", _norm(params, "final_norm"))
    if "position_predictor/kernel" in params:
        put("position_head", _dense(params, "position_predictor"))
    missing = sorted(k for k in reference if k not in sd)
    for k in missing:
        sd[k] = reference[k].clone()
    for k, v in sd.items():
        if k in reference and tuple(v.shape) != tuple(reference[k].shape):
            raise RuntimeError(f"converted {k} has shape {tuple(v.shape)}, expected {tuple(reference[k].shape)}")
    return sd, missing


def convert_official(checkpoint: Path, out: Path, which: str = "teacher", log=print,
                     reset_step: bool = False) -> Dict:
    """Writes ``out/config.yaml``, ``out/checkpoints/last.pt`` (student = ``params``, teacher = ``ema_params``,
    AdamW moments from ``opt_state`` when present) and ``out/backbone.safetensors`` (``which`` encoder)."""
    from .checkpoint import export_backbone, save_checkpoint
    from .train import build_optimizer

    if which not in ("teacher", "student"):
        raise ValueError(f"--which {which!r}: allowed teacher or student")
    state = read_flax_msgpack(Path(checkpoint))
    if not isinstance(state, dict) or ("params" not in state and "ema_params" not in state):
        raise RuntimeError(f"{checkpoint}: no 'params' or 'ema_params' in this checkpoint")
    student_params = _normalise_names(flatten(state.get("params") or state.get("ema_params")))
    teacher_params = _normalise_names(flatten(state.get("ema_params") or state.get("params")))
    try:
        cfg = infer_config(student_params)
        student, teacher = LOCA(cfg), LOCA(cfg)
        ref_sd = student.state_dict()
        sd_s, missing = flax_to_state_dict(student_params, cfg, ref_sd)
        sd_t, _ = flax_to_state_dict(teacher_params, cfg, ref_sd)
    except KeyError as exc:
        raise RuntimeError(f"{checkpoint}: not a LOCA ViT checkpoint (no parameter {exc.args[0]})") from None
    student.load_state_dict(sd_s)
    teacher.load_state_dict(sd_t)
    if missing:
        log(f"note: the checkpoint has no {', '.join(sorted({k.split('.')[0] for k in missing}))}: "
            f"those modules are freshly initialised")
    step = 0 if reset_step else int(np.asarray(state.get("global_step", 0)))
    optimizer = build_optimizer(student, cfg)
    _load_adam_moments(optimizer, student, state.get("opt_state"), cfg, ref_sd)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    save_checkpoint(out / "checkpoints" / "last.pt", student, teacher, optimizer, step, cfg)
    export_backbone(out / "backbone.safetensors", teacher if which == "teacher" else student, cfg, which, step)
    return {"config": cfg, "step": step, "missing": missing}


def _load_adam_moments(optimizer, model: LOCA, opt_state, cfg: Config, ref_sd) -> None:
    """optax adamw state (inner_state/0/{count, mu, nu}) -> torch AdamW state, when the count is > 0."""
    if not isinstance(opt_state, dict):
        return
    inner = opt_state.get("inner_state", opt_state)
    adam = inner.get("0", inner.get(0)) if isinstance(inner, dict) else None
    if not isinstance(adam, dict) or "mu" not in adam:
        return
    count = int(np.asarray(adam.get("count", 0)))
    if count == 0:
        return
    mu, absent = flax_to_state_dict(_normalise_names(flatten(adam["mu"])), cfg, ref_sd)
    nu, _ = flax_to_state_dict(_normalise_names(flatten(adam["nu"])), cfg, ref_sd)
    for k in absent:  # modules the checkpoint lacks start with empty moments
        mu[k].zero_()
        nu[k].zero_()
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            optimizer.state[p] = {"step": torch.tensor(float(count)), "exp_avg": mu[n].clone(),
                                  "exp_avg_sq": nu[n].clone()}

import copy

import pytest
import torch

from loca.checkpoint import export_backbone, load_backbone, read_backbone_metadata
from loca.config import load_config
from loca.method import loca_forward, reference_keep
from loca.model import LOCA
from loca.train import build_optimizer, ema_update


def _batch(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, s, f = cfg.views.reference_size, cfg.views.random_query_size, cfg.views.focal_query_size
    n_ref = cfg.num_reference_positions
    return {
        "reference": torch.randn(b, 3, r, r, generator=g),
        "random_query": torch.randn(b, cfg.views.num_random_queries, 3, s, s, generator=g),
        "random_labels": torch.randint(-1, n_ref, (b, cfg.views.num_random_queries, cfg.random_query_grid ** 2),
                                       generator=g),
        "focal_query": torch.randn(b, cfg.views.num_focal_queries, 3, f, f, generator=g),
        "focal_labels": torch.randint(-1, n_ref, (b, cfg.views.num_focal_queries, cfg.focal_query_grid ** 2),
                                      generator=g),
    }


def test_encoder_options(tiny_cfg):
    model = LOCA(tiny_cfg)
    vit = model.encoder.vit
    assert vit.cls_token is None and vit.pos_embed.shape == (1, 16, 64)
    assert vit.blocks[0].norm1.eps == 1e-6 and "Tanh" in type(vit.blocks[0].mlp.act).__name__
    drop = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in vit.blocks]
    assert drop[0] == 0.0 and drop[-1] == pytest.approx(0.1)
    x = torch.randn(2, 3, 16, 16)                                          # a 2x2-grid focal query
    assert model.encoder(x).shape == (2, 4, 64)
    keep = torch.tensor([3, 0, 7])
    assert model.encoder(torch.randn(2, 3, 32, 32), keep=keep).shape == (2, 3, 64)


def test_reference_masking_modes():
    torch.manual_seed(0)
    idx = reference_keep(196, 39, structured=True, device="cpu")
    assert torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + 39)) and int(idx[-1]) < 196
    idx = reference_keep(196, 39, structured=False, device="cpu")
    assert len(set(idx.tolist())) == 39
    assert reference_keep(64, 0, True, "cpu").numel() == 0


def test_step_changes_parameters_and_teacher_is_a_copy(tiny_cfg):
    torch.manual_seed(0)
    student = LOCA(tiny_cfg)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(student.parameters(), teacher.parameters()))
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = build_optimizer(student, tiny_cfg)
    for g in opt.param_groups:
        g["lr"] = 1e-3
    loss, stats = loca_forward(student, teacher, _batch(tiny_cfg), tiny_cfg)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())                 # no gradient to the teacher
    opt.step()
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before_s[k])]
    assert len(changed) == len(before_s)                                      # every parameter trained
    assert all(torch.equal(v, before_t[k]) for k, v in teacher.state_dict().items())  # not an alias
    m = 0.9
    ema_update(teacher, student, m)
    for (k, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        torch.testing.assert_close(t, m * before_t[k] + (1 - m) * s)
    assert set(stats) >= {"loss_position", "loss_cluster", "loss_memax", "cluster_entropy"}


def test_weight_decay_groups(tiny_cfg):
    opt = build_optimizer(LOCA(tiny_cfg), tiny_cfg)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim != 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])


def test_eta_one_means_no_reference_token(tiny_cfg):
    cfg = load_config("cpu_tiny", ["loss.reference_mask_ratio=1.0"])
    torch.manual_seed(0)
    student = LOCA(cfg)
    x = torch.randn(2, 5, 64)
    empty = torch.zeros(2, 0, 64)
    g = student.cross_block
    torch.testing.assert_close(g(x, empty), x + g.mlp(g.norm2(x)))           # attention term is zero
    loss, _ = loca_forward(student, copy.deepcopy(student), _batch(cfg), cfg)
    assert torch.isfinite(loss)


def test_backbone_loads_into_timm(tmp_path, tiny_cfg):
    import timm
    from safetensors.torch import load_file

    model = LOCA(tiny_cfg).eval()
    path = tmp_path / "backbone.safetensors"
    export_backbone(path, model, tiny_cfg, "teacher", step=3)
    meta = read_backbone_metadata(path)
    assert meta["which"] == "teacher" and meta["step"] == "3"
    # As the README states: create the architecture with these arguments, then load the file.
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, global_pool="avg",
                            class_token=False, fc_norm=False, act_layer="gelu_tanh", dynamic_img_size=True,
                            img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0)
    vit.load_state_dict(load_file(str(path)))
    vit.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.encoder(x)
        # the same timm blocks on the same shapes (only the position embedding is added by loca's own code):
        # torch's default fp32 tolerance (1e-5 + 1.3e-6 relative) is ample
        torch.testing.assert_close(vit.forward_features(x), ours)
        torch.testing.assert_close(vit(x), ours.mean(1))
        rebuilt = load_backbone(path).eval()
        torch.testing.assert_close(rebuilt.forward_features(x), ours)
        assert rebuilt.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 36, 64)


def test_every_parameter_is_initialised_from_the_seed():
    """Two models built from the same seed are equal and finite: no parameter is left as uninitialised memory
    (timm's weight_init="skip" leaves the position embedding empty; LOCA's official init must cover it)."""
    cfg = load_config("cpu_tiny")
    torch.manual_seed(0)
    a = LOCA(cfg)
    torch.manual_seed(0)
    b = LOCA(cfg)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.isfinite(p).all() and torch.equal(p, q), name

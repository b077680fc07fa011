"""The paper's ablation switches: which loss trains (Sec. 4.1), the localization loss (Tab. 1), Sinkhorn and
me-max off (Tab. 2a). Each switch changes what it says and nothing else."""
import numpy as np
import pytest
import torch

from loca.config import load_config
from loca.data import BuiltinPhotos, LOCADataset, collate
from loca.geometry import relative_box
from loca.losses import box_corners, box_iou_giou, box_loss, teacher_targets
from loca.method import loca_forward
from loca.model import LOCA


def _batch(cfg, n=4):
    dataset = LOCADataset(BuiltinPhotos(n, 48), cfg, seed=0)
    batch = collate([dataset[i] for i in range(n)])
    batch.pop("skipped")
    return batch


def _step(cfg):
    torch.manual_seed(0)
    student = LOCA(cfg)
    teacher = LOCA(cfg)
    teacher.load_state_dict(student.state_dict())
    loss, stats = loca_forward(student, teacher, _batch(cfg), cfg, torch.Generator().manual_seed(0))
    loss.backward()
    grads = {name: p.grad for name, p in student.named_parameters()}
    return loss, stats, grads


def _has_grad(grads, prefix):
    return any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if name.startswith(prefix))


def test_position_only_is_the_official_localization_path():
    cfg = load_config("cpu_tiny", ["loss.objective=position"])
    loss, stats, grads = _step(cfg)
    assert stats["loss_cluster"] == 0 and stats["loss_memax"] == 0
    assert torch.isfinite(loss) and loss == stats["loss_position"] > 0
    assert not _has_grad(grads, "proj_head")                          # no projection head in this path
    assert _has_grad(grads, "encoder") and _has_grad(grads, "position_head") and _has_grad(grads, "cross_block")


def test_queries_without_position_embedding_ignore_it():
    cfg = load_config("cpu_tiny")
    torch.manual_seed(0)
    enc = LOCA(cfg).encoder.eval()  # an Encoder alone is not initialised (LOCA applies the official init)
    images = torch.randn(2, 3, 16, 16)
    before_no_pe, before_pe = enc(images, use_pe=False), enc(images)
    with torch.no_grad():
        enc.vit.pos_embed.add_(torch.randn_like(enc.vit.pos_embed))
    assert torch.equal(enc(images, use_pe=False), before_no_pe)
    assert not torch.allclose(enc(images), before_pe)


def test_cluster_only_trains_no_position_head():
    loss, stats, grads = _step(load_config("cpu_tiny", ["loss.objective=cluster"]))
    assert stats["loss_position"] == 0 and stats["valid"] == 0
    assert float(loss) == pytest.approx(float(stats["loss_cluster"] + stats["loss_memax"]), rel=1e-6)
    assert not _has_grad(grads, "position_head") and not _has_grad(grads, "cross_block")
    assert _has_grad(grads, "proj_head") and _has_grad(grads, "encoder")


def test_both_is_the_sum_of_the_terms():
    loss, stats, _ = _step(load_config("cpu_tiny"))
    assert float(loss) == pytest.approx(float(stats["loss_position"] + stats["loss_cluster"] + stats["loss_memax"]),
                                 rel=1e-6)
    assert stats["loss_position"] > 0 and stats["loss_cluster"] > 0


def test_center_patch_predicts_one_position_per_query():
    cfg = load_config("cpu_tiny", ["loss.localization=center"])
    batch = _batch(cfg)
    g, gf = cfg.random_query_grid, cfg.focal_query_grid
    centers = torch.cat([batch["random_labels"][:, :, (g // 2) * g + g // 2],
                         batch["focal_labels"][:, :, (gf // 2) * gf + gf // 2]], 1)
    _, stats, grads = _step(cfg)
    assert stats["valid"] == (centers >= 0).sum()                    # one label per query, not per token
    assert stats["loss_position"] > 0 and _has_grad(grads, "position_head")


def test_box_regression_trains_the_box_head():
    cfg = load_config("cpu_tiny", ["loss.localization=box"])
    batch = _batch(cfg)
    _, stats, grads = _step(cfg)
    valid = torch.cat([batch["random_query_target"][..., 0], batch["focal_query_target"][..., 0]], 1)
    assert stats["valid"] == valid.sum() and stats["loss_position"] > 0
    assert _has_grad(grads, "box_head") and not _has_grad(grads, "position_head")
    assert "box_head.weight" not in LOCA(load_config("cpu_tiny")).state_dict()


@pytest.mark.parametrize("level", ["cls", "gap"])
def test_image_level_clustering_predicts_one_assignment_per_view(level):
    cfg = load_config("cpu_tiny", [f"loss.cluster_level={level}"])
    torch.manual_seed(0)
    model = LOCA(cfg)
    batch = _batch(cfg)
    keep = torch.arange(cfg.random_query_kept)
    clusters, positions = model(batch["random_query"][:, 0], keep, batch["focal_query"], torch.randn(4, 3, 64))
    queries = cfg.views.num_random_queries + cfg.views.num_focal_queries
    assert clusters.shape == (4, queries, cfg.model.num_prototypes)   # per view, not per token
    assert positions.shape[1] == cfg.random_query_kept + cfg.views.num_focal_queries * cfg.focal_query_grid ** 2
    assert (model.encoder.vit.cls_token is not None) == (level == "cls")
    _, stats, grads = _step(cfg)
    assert stats["loss_cluster"] > 0 and stats["loss_position"] > 0 and _has_grad(grads, "proj_head")
    if level == "cls":
        assert _has_grad(grads, "encoder.vit.cls_token")


def test_single_view_predicts_each_tokens_own_position():
    cfg = load_config("cpu_tiny", ["loss.framework=single_view", "loss.objective=position"])
    loss, stats, grads = _step(cfg)
    assert stats["valid"] == 4 * cfg.num_reference_positions and stats["loss_cluster"] == 0
    assert torch.isfinite(loss) and _has_grad(grads, "encoder") and _has_grad(grads, "position_head")
    assert not _has_grad(grads, "cross_block") and not _has_grad(grads, "proj_head")
    with pytest.raises(Exception, match="single_view predicts positions only"):
        load_config("cpu_tiny", ["loss.framework=single_view"])


@pytest.mark.parametrize("framework", ["single_view", "query_reference"])
def test_position_prediction_can_memorise_a_fixed_batch(framework):
    """The position path learns: on one fixed batch (same views every step) both frameworks go from chance
    to near-perfect patch classification. A wiring bug (labels not matching token order, no gradient reaching
    the encoder) keeps the loss at ln(number of positions)."""
    cfg = load_config("cpu_tiny", [f"loss.framework={framework}", "loss.objective=position",
                                   "loss.reference_mask_ratio=0.0"])
    torch.manual_seed(0)
    student, teacher = LOCA(cfg), LOCA(cfg)
    teacher.load_state_dict(student.state_dict())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    batch = _batch(cfg)
    for _ in range(80):
        loss, stats = loca_forward(student, teacher, batch, cfg, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = float(stats["correct"] / stats["valid"])
    loss = float(loss.detach())
    assert loss < 0.5 * np.log(cfg.num_reference_positions) and accuracy > 0.8, (loss, accuracy)


def test_single_view_masked_tokens_are_never_attended_to():
    """Changing a masked patch changes only that token's output; changing an unmasked one changes others."""
    from loca.model import single_view_mask
    cfg = load_config("cpu_tiny")
    torch.manual_seed(0)
    enc = LOCA(cfg).encoder.eval()  # an Encoder alone is not initialised (LOCA applies the official init)
    keep = torch.tensor([0, 1, 2, 3, 4, 5])                     # 6 of the 16 tokens unmasked
    mask = single_view_mask(16, keep)
    images = torch.randn(1, 3, 32, 32)
    base = enc(images, use_pe=False, attn_mask=mask)
    masked = images.clone()
    masked[..., 24:32, 24:32] += 1.0                             # token 15 (masked)
    out = enc(masked, use_pe=False, attn_mask=mask)
    changed = (out - base).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [False] * 15 + [True]
    visible = images.clone()
    visible[..., 0:8, 0:8] += 1.0                                # token 0 (unmasked)
    assert ((enc(visible, use_pe=False, attn_mask=mask) - base).abs().amax(-1)[0] > 1e-6).all()
    assert single_view_mask(4, torch.tensor([], dtype=torch.long)).equal(torch.eye(4, dtype=torch.bool))


def test_relative_box_by_hand():
    # reference at (10, 20) of 100 x 200; a query at (60, 170) of 80 x 60 overlaps 50 x 50 of it
    np.testing.assert_allclose(relative_box((10, 20, 100, 200), (60, 170, 80, 60)),
                               [1.0, 0.5, 0.75, 0.5, 0.25])
    # a sliver: 5 of 100 rows overlap -> invalid (relative overlap <= 0.1)
    assert relative_box((0, 0, 100, 100), (95, 0, 50, 50))[0] == 0.0


def test_iou_giou_and_box_loss_by_hand():
    a = box_corners(torch.tensor([0.5, 0.5, 0.2, 0.2]))
    iou, giou = box_iou_giou(a, a)
    assert iou == pytest.approx(1.0) and giou == pytest.approx(1.0)
    # two 0.2 x 0.2 boxes side by side with a 0.2 gap: IoU 0, hull 0.2 x 0.6, GIoU = 0 - (0.12 - 0.08) / 0.12
    b = box_corners(torch.tensor([0.5, 0.9, 0.2, 0.2]))
    iou, giou = box_iou_giou(a, b)
    assert iou == pytest.approx(0.0) and giou == pytest.approx(-1 / 3)
    target = torch.tensor([[1.0, 0.4, 0.4, 0.2, 0.2], [0.0, 0.0, 0.0, 1.0, 1.0]])  # the second one invalid
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]])
    loss, ious = box_loss(pred, target, 5.0, 2.0)
    assert loss == pytest.approx(0.0, abs=1e-6) and ious[0] == pytest.approx(1.0)
    loss, _ = box_loss(torch.tensor([[0.5, 0.9, 0.2, 0.2]]), torch.tensor([[1.0, 0.4, 0.4, 0.2, 0.2]]), 5.0, 2.0)
    assert loss == pytest.approx(5.0 * 0.4 + 2.0 * (1 + 1 / 3), rel=1e-5)


def test_sinkhorn_off_is_the_plain_softmax_and_memax_off_drops_the_term():
    logits = torch.randn(50, 8)
    assert torch.allclose(teacher_targets(logits, 0.05, 0), torch.softmax(logits / 0.05, -1))
    assert not torch.allclose(teacher_targets(logits, 0.05, 3), torch.softmax(logits / 0.05, -1))
    loss, stats, _ = _step(load_config("cpu_tiny", ["loss.weight_memax=0"]))
    assert float(loss) == pytest.approx(float(stats["loss_position"] + stats["loss_cluster"]), rel=1e-6)


@pytest.mark.parametrize("override", ["loss.objective=position", "loss.objective=cluster",
                                      "loss.localization=center", "loss.localization=box",
                                      "loss.cluster_level=cls", "loss.cluster_level=gap",
                                      "loss.framework=single_view loss.objective=position"])
def test_each_ablation_trains_end_to_end(tmp_path, override):
    from loca.train import pretrain
    cfg = load_config("cpu_tiny", override.split() + ["run.builtin_images=16", "run.max_steps=3",
                                                      "run.log_every=1"])
    result = pretrain(cfg, None, tmp_path, log=lambda *a: None)
    assert result["step"] == 3 and (tmp_path / "backbone.safetensors").exists()
    from loca.checkpoint import load_backbone
    from loca.segment import patch_tokens
    vit = load_backbone(tmp_path / "backbone.safetensors")          # loads into timm, class token or not
    assert patch_tokens(vit, torch.randn(1, 3, 32, 32)).shape == (1, 4, 4, 64)


def test_unknown_ablation_values_are_one_line_errors():
    from loca.config import ConfigError
    for override, fragment in (("loss.objective=positions", "loss.objective='positions'"),
                               ("loss.localization=boxes", "loss.localization='boxes'")):
        with pytest.raises(ConfigError, match=fragment):
            load_config("cpu_tiny", [override])


def test_visualize_draws_positions_and_clusters(tmp_path):
    import numpy as np
    from PIL import Image

    from loca.cli import main
    from loca.train import pretrain
    pretrain(load_config("cpu_tiny", ["run.builtin_images=16", "run.max_steps=2"]), None, tmp_path / "run",
             log=lambda *a: None)
    assert main(["visualize", str(tmp_path / "run"), "--out", str(tmp_path / "pics"), "--images", "3",
                 "--mask-ratios", "0,1", "--device", "cpu"]) == 0
    positions = np.array(Image.open(tmp_path / "pics" / "positions.png"))
    cell, g, gf = 48, 4, 2                                        # 192 // 4 px per reference patch
    assert positions.shape == (18 + 3 * (g * cell + 6) + 6, 6 + cell * gf + 6 + 2 * (g * cell + 6), 3)
    top, left0 = 18, 6 + cell * gf + 6

    def panel(c):
        x = left0 + c * (g * cell + 6)
        return positions[top:top + g * cell, x:x + g * cell]
    seen, blind = panel(0), panel(1)
    shade = np.all(blind == (40, 40, 40), -1).mean()             # eta = 1: no reference patch is shown
    assert shade > np.all(seen == (40, 40, 40), -1).mean() and shade > 0.3
    clusters = Image.open(tmp_path / "pics" / "clusters.png")
    assert clusters.size == (6 + 2 * (g * cell + 6), 6 + 3 * (g * cell + 6))

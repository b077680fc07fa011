"""Numerical parity with the official JAX implementation (golden fixtures, fp32, atol 2e-5 + rtol 1e-5)."""
import json

import numpy as np
import pytest
import torch

from conftest import fixture_path
from loca.convert import flatten, flax_to_state_dict, infer_config, read_flax_msgpack
from loca.geometry import correspondence
from loca.losses import (cluster_loss, gather_targets, localization_loss, mean_prediction, memax_loss,
                         sinkhorn, student_log_probs)
from loca.model import LOCA
from loca.schedules import ema_momentum, learning_rate

# XLA (on the machine that wrote the fixtures) and ATen (on this one) order their fp32 sums differently: the
# tiny model's outputs, O(1), differ by ~sqrt(K) u per chained sum (K <= 256): at most ~1e-5 after its two
# blocks and heads, so 2e-5 + 1e-5 relative (passes on every kernel path of tests/kernel_paths.sh).
ATOL, RTOL = 2e-5, 1e-5


def close(actual, expected, atol=ATOL, rtol=RTOL):
    actual = actual.detach().cpu().numpy() if torch.is_tensor(actual) else np.asarray(actual)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def test_correspondence_matches_all_official_cases():
    d = np.load(fixture_path("correspondence.npz"))
    n = len(d["flip"])
    assert n == 1854
    mismatches = []
    for i in range(n):
        g = int(d["query_grid"][i])
        args = (tuple(d["ref_box"][i]), int(d["ref_grid"][i]), tuple(d["query_box"][i]),
                int(d["query_size"][i]), g)
        if not np.array_equal(correspondence(*args, flip=bool(d["flip"][i])), d["labels"][i, :g, :g]):
            mismatches.append(i)
        if not np.array_equal(correspondence(*args, flip=False), d["labels_before_flip"][i, :g, :g]):
            mismatches.append(i)
    assert mismatches == []


@pytest.fixture(scope="module")
def official_model():
    state = read_flax_msgpack(fixture_path("tiny_checkpoint_0"))
    params = flatten(state["params"])
    cfg = infer_config(params)
    model = LOCA(cfg)
    sd, missing = flax_to_state_dict(params, cfg, model.state_dict())
    assert missing == []
    model.load_state_dict(sd)
    return model.eval(), params, state


def test_checkpoint_reader_matches_npz(official_model):
    _, params, state = official_model
    npz = np.load(fixture_path("tiny_params.npz"))
    assert set(params) == set(npz.files)
    for k in npz.files:
        np.testing.assert_array_equal(params[k], npz[k])
    assert sum(v.size for v in params.values()) == 206_308
    ema = flatten(state["ema_params"])
    assert all(np.array_equal(ema[k], params[k]) for k in params)


def test_architecture_inferred(official_model):
    model, _, _ = official_model
    cfg_model = model.encoder.vit
    assert cfg_model.embed_dim == 64 and len(cfg_model.blocks) == 2
    assert sum(p.numel() for p in model.parameters()) == 206_308


def _nchw(a):
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def test_forward_reference_mode(official_model):
    model, _, _ = official_model
    f = np.load(fixture_path("forward.npz"))
    with torch.no_grad():
        tokens = model.encoder(_nchw(f["a_reference_input"]))
        close(tokens, f["a_encoder_norm_out"])
        close(model.proj_head.mlp(tokens), f["a_proj_bottleneck_prenorm"])
        close(model.proj_head(tokens).flatten(0, 1), f["a_cluster_logits"])
        kv = tokens[:, torch.from_numpy(f["a_idx_kept"]).long()]
        close(kv, f["a_patches_repr"])
        close(model.position_logits(tokens, kv), f["a_position_logits"])


def test_forward_focal_mode(official_model):
    model, _, _ = official_model
    f = np.load(fixture_path("forward.npz"))
    with torch.no_grad():
        pe = model.encoder.position_embedding((6, 6))
        close(pe.reshape(1, 6, 6, -1), f["b_posembed_resized_6x6"])
        x = _nchw(f["b_focal_input"])
        embedded = model.encoder.vit.patch_embed(x).flatten(1, 2) + pe
        close(embedded, f["b_tokens_embedded"])
        h = embedded
        for i, blk in enumerate(model.encoder.vit.blocks):
            h = blk(h)
            close(h, f[f"b_encoderblock_{i}_out"])
        tokens = model.encoder(x)
        close(tokens, f["b_patches_repr"])
        mlp = model.proj_head.mlp
        close(mlp[1](mlp[0](tokens)), f["b_proj_hidden_0_out"])
        close(mlp[3](mlp[2](mlp[1](mlp[0](tokens)))), f["b_proj_hidden_1_out"])
        close(model.proj_head(tokens).flatten(0, 1), f["b_cluster_logits"])
        kv = torch.from_numpy(f["b_inputs_kv"])
        g = model.cross_block(tokens, kv)
        close(g, f["b_cross_attention_block_out"])
        close(model.final_norm(g), f["b_final_norm_out"])
        close(model.position_logits(tokens, kv), f["b_position_logits"])
        protos = model.proj_head.prototypes
        close((protos / (protos.norm(dim=-1, keepdim=True) + 1e-10)).t(), f["prototypes_kernel_normalized"])


def test_forward_random_query_mode(official_model):
    model, _, _ = official_model
    f = np.load(fixture_path("forward.npz"))
    keep = torch.from_numpy(f["c_idx_kept"]).long()
    with torch.no_grad():
        tokens = model.encoder(_nchw(f["c_query0_input"]), keep=keep)
        close(tokens, f["c_patches_repr"])
        close(model.proj_head(tokens).flatten(0, 1), f["c_cluster_logits"])
        close(model.position_logits(tokens, torch.from_numpy(f["c_inputs_kv"])), f["c_position_logits"])


def test_losses_sinkhorn_and_gradients():
    d = np.load(fixture_path("losses.npz"))
    tau_s, tau_t = float(d["tau_student"]), float(d["tau_teacher"])
    teacher = torch.from_numpy(d["teacher_cluster_logits"])
    probs = torch.softmax(teacher / tau_t, dim=-1)
    close(probs, d["teacher_softmax"])
    targets = sinkhorn(probs, int(d["sinkhorn_iters"]))
    close(targets, d["sinkhorn_output"])

    b, n_q0, g2, n_focal = 2, 70, 36, int(d["n_focal_queries"])
    s_q0 = torch.from_numpy(d["student_q0_cluster_logits"]).requires_grad_(True)
    s_focal = torch.from_numpy(d["student_focal_cluster_logits"]).requires_grad_(True)
    student = torch.cat([s_q0, s_focal])
    position = torch.cat([torch.from_numpy(d["student_q0_position_logits"]).reshape(-1, 196),
                          torch.from_numpy(d["student_focal_position_logits"]).reshape(-1, 196)])
    q0_labels = torch.from_numpy(d["query0_mask"]).reshape(b, -1)[:, torch.from_numpy(d["q0_idx_kept"]).long()]
    close(q0_labels, d["q0_targets_after_drop"])
    focal_labels = torch.from_numpy(d["focal_masks"]).reshape(n_focal, b, g2)
    labels = torch.cat([q0_labels.reshape(-1), focal_labels.reshape(-1)]).long()
    close(labels, d["all_targets"])

    # Each row's image: query0 rows are image-major; focal rows are [query][image][token].
    image = torch.cat([torch.arange(b).repeat_interleave(n_q0),
                       torch.arange(b).repeat_interleave(g2).repeat(n_focal)])
    per_image = [labels[image == i] for i in range(b)]
    gathered_per_image = gather_targets(targets.reshape(b, 196, -1), torch.stack(per_image))
    gathered = torch.empty(len(labels), targets.shape[-1])
    for i in range(b):
        gathered[image == i] = gathered_per_image[i]
    valid = torch.from_numpy(d["valid_mask"])
    close(gathered[valid], d["cluster_targets_gathered"][valid.numpy()])

    l_loc = localization_loss(position, labels)
    log_probs = student_log_probs(student, tau_s)
    l_clu = cluster_loss(log_probs, gathered, labels)
    pbar = mean_prediction(log_probs)
    l_mm = memax_loss(pbar)
    close(pbar, d["avg_prediction"])
    close(l_loc, d["localization_loss"])
    close(l_clu, d["cluster_loss"])
    close(l_mm, d["memax_loss"])
    total = l_loc + l_clu + l_mm
    close(total, d["total_loss"])
    total.backward()
    close(s_q0.grad, d["grad_total_wrt_student_q0_cluster_logits"], atol=1e-7, rtol=1e-5)
    close(s_focal.grad, d["grad_total_wrt_student_focal_cluster_logits"], atol=1e-7, rtol=1e-5)
    correct = ((position.argmax(-1) == labels) & (labels >= 0)).sum()
    assert int(correct) == int(d["trainer_metric_accuracy_sum"])
    assert int((labels >= 0).sum()) == int(d["trainer_metric_accuracy_count"])


def test_schedules_match_official():
    data = json.loads(fixture_path("schedules.json").read_text())
    c = data["config"]
    for row in data["values"]:
        t = row["step"]
        if t >= c["total_steps"]:
            continue  # scenic's cosine is cyclic: its value at T is never used
        lr = learning_rate(t, c["base_learning_rate"], c["total_steps"], c["warmup_steps"], c["alpha"])
        m = ema_momentum(t, c["momentum_steps_per_cycle"], c["momentum_base"])
        np.testing.assert_allclose(lr, row["lr"], rtol=2e-6, atol=1e-12)
        np.testing.assert_allclose(lr, row["lr_closed_form_f64"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(m, row["momentum"], atol=2e-7)
        np.testing.assert_allclose(m, row["momentum_closed_form_f64"], atol=1e-12)


def test_released_head_name_output_projection_is_accepted(official_model):
    from loca.convert import _normalise_names
    model, params, _ = official_model
    renamed = {k.replace("projection_head_for_clustering_prediction", "output_projection"): v
               for k, v in params.items()}
    renamed = {f"Transformer/{k}" if k.startswith("encoderblock_") else k: v for k, v in renamed.items()}
    sd, missing = flax_to_state_dict(_normalise_names(renamed), infer_config(_normalise_names(renamed)),
                                     model.state_dict())
    assert missing == []
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_a_missing_official_fixture_skips_in_a_clone_and_fails_under_ci(tmp_path, monkeypatch):
    import conftest
    monkeypatch.setattr(conftest, "FIXTURES", tmp_path)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="absent"):
        conftest.fixture_path("tiny_checkpoint_0")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="under CI it must be there"):
        conftest.fixture_path("tiny_checkpoint_0")
    (tmp_path / "tiny_checkpoint_0").write_bytes(b"")
    assert conftest.fixture_path("tiny_checkpoint_0") == tmp_path / "tiny_checkpoint_0"

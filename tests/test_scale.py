"""Big models and small machines: activation checkpointing, gradient accumulation, fp16 with a gradient scaler,
and the small-batch Sinkhorn queue."""
import copy
import json

import pytest
import torch

from loca.checkpoint import load_checkpoint
from loca.config import ConfigError, load_config
from loca.losses import EmbeddingQueue, sinkhorn, teacher_targets
from loca.method import loca_forward
from loca.model import LOCA
from loca.train import pretrain
from test_model import _batch


def _quiet(*_a, **_k):
    pass


def _grads(cfg, batch, seed=0):
    torch.manual_seed(seed)
    student = LOCA(cfg)
    teacher = copy.deepcopy(student).requires_grad_(False)
    torch.manual_seed(1)
    loss, _ = loca_forward(student, teacher, batch, cfg, torch.Generator().manual_seed(2))
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in student.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients():
    plain = load_config("cpu_tiny")
    ckpt = load_config("cpu_tiny", ["model.grad_checkpointing=true"])
    batch = _batch(plain)
    loss_a, ga = _grads(plain, batch)
    loss_b, gb = _grads(ckpt, batch)   # stochastic depth on: the recomputation replays the same RNG draws
    # The recomputation runs the same kernels on the same shapes; only the order in which autograd adds the
    # recomputed branch's gradient may differ (one rounding per element): far inside these bounds.
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-6, rtol=1e-5), k
    assert load_config("vit_large_16").model.grad_checkpointing and load_config("vit_huge_16").model.grad_checkpointing


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_gradient_accumulation_and_fp16_runs(tmp_path):
    base = ["run.builtin_images=32", "run.max_steps=3"]
    pretrain(load_config("cpu_tiny", base + ["optim.accumulation_steps=2"]), None, tmp_path / "acc", log=_quiet)
    rows = _metrics(tmp_path / "acc")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)
    # fp16 autocast with a gradient scaler (CPU autocast stands in for a V100/T4 here).
    pretrain(load_config("cpu_tiny", base + ["run.precision=fp16"]), None, tmp_path / "fp16", log=_quiet)
    rows = _metrics(tmp_path / "fp16")
    assert len(rows) == 3 and all("grad_scale" in r for r in rows)
    state = load_checkpoint(tmp_path / "fp16" / "checkpoints" / "last.pt")
    assert state["extra"]["scaler"]["scale"] > 0
    with pytest.raises(ConfigError, match="optim.accumulation_steps=3: must divide optim.batch_size=8"):
        load_config("cpu_tiny", ["optim.accumulation_steps=3"])


def test_accumulation_with_one_micro_batch_per_sample_set_matches_summed_gradients():
    """Two micro-batches of 2 give the mean of their two gradients (each with its own Sinkhorn/me-max)."""
    cfg = load_config("cpu_tiny", ["model.drop_path=0"])
    batch = _batch(cfg, b=4)
    halves = [{k: v[i * 2:(i + 1) * 2] for k, v in batch.items()} for i in range(2)]
    _, g1 = _grads(cfg, halves[0])
    _, g2 = _grads(cfg, halves[1])
    torch.manual_seed(0)
    student = LOCA(cfg)
    teacher = copy.deepcopy(student).requires_grad_(False)
    for part in halves:
        loss, _ = loca_forward(student, teacher, part, cfg, torch.Generator().manual_seed(2))
        (loss / 2).backward()
    for k, p in student.named_parameters():  # the same two backward passes; g1/2 + g2/2 rounds once more
        assert torch.allclose(p.grad, (g1[k] + g2[k]) / 2, atol=1e-7, rtol=1e-5), k


def test_queue_ring_buffer_and_sinkhorn_over_queue():
    q = EmbeddingQueue(5, 2, "cpu")
    assert q.contents().shape == (0, 2)
    q.push(torch.arange(6.0).reshape(3, 2))
    assert q.contents().tolist() == [[0, 1], [2, 3], [4, 5]]
    q.push(torch.arange(6.0, 12.0).reshape(3, 2))              # 6 items in a queue of 5: the oldest goes
    assert sorted(map(tuple, q.contents().tolist())) == [(2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]
    fresh = EmbeddingQueue(5, 2, "cpu")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.contents(), q.contents()) and fresh.pos == q.pos

    g = torch.Generator().manual_seed(0)
    current, queued = torch.randn(6, 4, generator=g), torch.randn(10, 4, generator=g)
    with_queue = teacher_targets(current, 0.1, 3, queued)
    alone = teacher_targets(current, 0.1, 3)
    joint = sinkhorn(torch.softmax(torch.cat([current, queued]) / 0.1, -1), 3)[:6]
    assert torch.allclose(with_queue, joint) and not torch.allclose(with_queue, alone)
    assert torch.allclose(with_queue.sum(-1), torch.ones(6))


def test_queue_run_resumes_exactly(tmp_path):
    over = ["run.builtin_images=16", "optim.epochs=3", "loss.queue_size=96", "run.checkpoint_every=100"]
    pretrain(load_config("cpu_tiny", over), None, tmp_path / "a", log=_quiet)
    pretrain(load_config("cpu_tiny", over + ["run.max_steps=3"]), None, tmp_path / "b", log=_quiet)
    state = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert state["extra"]["queue"]["filled"] == 96       # 3 steps x 8 images x 16 reference tokens, capped
    pretrain(load_config("cpu_tiny", over), None, tmp_path / "b", log=_quiet)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "images_per_second"} for r in rows]  # noqa: E731
    assert drop(_metrics(tmp_path / "a")) == drop(_metrics(tmp_path / "b"))


def test_pretraining_with_device_views_matches_the_worker_path(tmp_path):
    """views.device_views inside the training loop: the same losses as the DataLoader-worker views (the pixels
    differ by float rounding only)."""
    base = ["run.builtin_images=16", "run.max_steps=3", "model.drop_path=0"]
    pretrain(load_config("cpu_tiny", base), None, tmp_path / "worker", log=_quiet)
    pretrain(load_config("cpu_tiny", base + ["views.device_views=true"]), None, tmp_path / "device", log=_quiet)
    for a, b in zip(_metrics(tmp_path / "worker"), _metrics(tmp_path / "device")):
        for key in ("loss", "loss_position", "loss_cluster", "position_accuracy"):
            # pixels within 1e-4 (tests/test_views.py), through 3 steps of training: 1e-4 of each statistic
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)

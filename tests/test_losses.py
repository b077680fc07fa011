import math

import torch

from loca.losses import (cluster_loss, gather_targets, localization_loss, mean_prediction, memax_loss,
                         sinkhorn, student_log_probs, teacher_targets)


def test_sinkhorn_marginals():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(512, 32) * 3, dim=-1)
    out = sinkhorn(probs, iters=50)
    torch.testing.assert_close(out.sum(1), torch.ones(512))                      # each row a distribution
    cols = out.sum(0)
    assert (cols.max() - cols.min()) / cols.mean() < 1e-3                        # prototypes used equally
    few = sinkhorn(probs, iters=3).sum(0)
    raw = probs.sum(0)
    assert few.std() < raw.std() / 3                                             # 3 iterations already balance


def test_sinkhorn_zero_iterations_is_identity():
    probs = torch.softmax(torch.randn(8, 4), -1)
    torch.testing.assert_close(sinkhorn(probs, 0), probs)


def test_teacher_targets_shape_and_rows():
    t = teacher_targets(torch.randn(2, 16, 8), tau=0.05, iters=3)
    assert t.shape == (2, 16, 8)
    torch.testing.assert_close(t.sum(-1), torch.ones(2, 16))


def test_memax_uniform_and_collapsed():
    k = 64
    uniform = mean_prediction(student_log_probs(torch.zeros(100, k), tau=0.1))
    assert math.isclose(float(memax_loss(uniform)), -math.log(k), rel_tol=1e-6)
    collapsed = torch.full((100, k), -1.0)
    collapsed[:, 3] = 1.0                                                         # every token on prototype 3
    value = float(memax_loss(mean_prediction(student_log_probs(collapsed, tau=0.01))))
    assert -1e-3 < value <= 0.0


def test_losses_ignore_tokens_outside_omega():
    torch.manual_seed(0)
    logits = torch.randn(6, 10)
    labels = torch.tensor([1, -1, 3, -1, 9, 0])
    expected = torch.nn.functional.cross_entropy(logits[labels >= 0], labels[labels >= 0])
    torch.testing.assert_close(localization_loss(logits, labels), expected)
    garbage = logits.clone()
    garbage[labels < 0] = 1e4                                                     # rows outside Omega
    torch.testing.assert_close(localization_loss(garbage, labels), expected)
    targets = torch.softmax(torch.randn(6, 10), -1)
    c1 = cluster_loss(student_log_probs(logits, 0.1), targets, labels)
    targets2 = targets.clone()
    targets2[labels < 0] = 0.0
    torch.testing.assert_close(c1, cluster_loss(student_log_probs(logits, 0.1), targets2, labels))


def test_all_outside_omega_gives_zero_not_nan():
    logits = torch.randn(4, 5, requires_grad=True)
    labels = torch.full((4,), -1)
    loss = localization_loss(logits, labels) + cluster_loss(student_log_probs(logits, 0.1), torch.rand(4, 5), labels)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(logits.grad).all()


def test_gather_targets_reads_the_matching_reference_patch():
    targets = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    labels = torch.tensor([[3, 0, -1], [1, 1, 2]])
    out = gather_targets(targets, labels)
    torch.testing.assert_close(out[0, 0], targets[0, 3])
    torch.testing.assert_close(out[1, 2], targets[1, 2])
    torch.testing.assert_close(out[0, 2], targets[0, 0])                         # -1 reads row 0, weight 0

"""Error bounds for comparing two fp32 training runs that differ only in summation order (one process against
DDP's two half-batch sums; one CPU's kernels against another's). Bounds come from how the error enters, not
from what one machine happened to produce:

- A gradient is a sum over the batch's tokens, pushed through the backward pass. Reordering such a sum of N
  fp32 terms changes it by about sqrt(N) * u of the terms' size (u = 2^-24 = 6e-8; worst case N * u), and a
  2-block backward chains about 6 such sums: with N ~ 10^3 that is ~1e-5 of a tensor's gradient scale at
  worst. GRAD_REL = 2e-5. Measured: 1.9e-6 to 3.7e-6 on four kernel paths (docs/reliability.md).
- Adam divides each first moment by the root of its second moment, so an element with a small gradient
  magnifies its gradient's error: for m_hat / (sqrt(v_hat) + eps), with every gradient entering both moments
  off by at most E, the first moment is off by at most E (bias-corrected weights sum to 1) and sqrt(v_hat) by at
  most E (a weighted RMS is 1-Lipschitz), so the ratio r moves by at most E (1 + |r|) / (sqrt(v_hat) - E + eps).
  It can never move by more than 2 max|r| (Cauchy-Schwarz bounds |r| by ``adam_ratio_cap``): an element whose
  exact gradient is 0 (a key bias: softmax ignores a shift shared by all keys) gets only that cap.
- The update itself rounds a few times: 8 u |w|.
- A forward pass computed in another order (another batch split, GEMM blocking, fused or unfused kernel): the
  tiny test ViTs chain ~12 sums of at most 256 terms per output, each reordering moving it by ~sqrt(256) u =
  1e-6 of the tensor's scale: FORWARD_REL = 2e-5 of the largest |value|. Entry-wise relative tolerances are
  not used, because an entry near zero after cancellation carries the error of the terms it cancelled.
"""
import math

import torch

U = 2.0 ** -24
GRAD_REL = 2e-5
FORWARD_REL = 2e-5


def adam_ratio_cap(betas, t: int) -> float:
    """The largest |m_hat / sqrt(v_hat)| Adam can produce after t steps: with m_hat = sum a_i g_i and
    v_hat = sum b_i g_i^2 (bias-corrected, each summing to 1), Cauchy-Schwarz gives sqrt(sum a_i^2 / b_i)."""
    b1, b2 = betas
    a = [(1 - b1) * b1 ** (t - i) / (1 - b1 ** t) for i in range(1, t + 1)]
    b = [(1 - b2) * b2 ** (t - i) / (1 - b2 ** t) for i in range(1, t + 1)]
    return math.sqrt(sum(x * x / y for x, y in zip(a, b)))


def second_moment_floor(betas, t0: int, t: int) -> float:
    """A lower bound of sqrt(v_hat) at step t >= t0 as a fraction of its value at t0 (v only decays by beta2
    per step, while the bias correction grows)."""
    b2 = betas[1]
    return math.sqrt(b2 ** (t - t0) * (1 - b2 ** t0) / (1 - b2 ** t))


def optimizer_names(optimizer_state, student_names):
    """Optimizer-state index -> parameter name: loca's AdamW groups the decayed (not 1-D) parameters first, then
    the others, each in the model's order (train.build_optimizer)."""
    order = [n for n, nd in student_names if nd != 1] + [n for n, nd in student_names if nd == 1]
    indices = [i for group in optimizer_state["param_groups"] for i in group["params"]]
    assert len(indices) == len(order)
    return dict(zip(indices, order))


def moments(checkpoint, names):
    """name -> (m_hat, sqrt(v_hat)), bias-corrected, from a loca checkpoint's AdamW state."""
    group = checkpoint["optimizer"]["param_groups"][0]
    b1, b2 = group["betas"]
    out = {}
    for index, state in checkpoint["optimizer"]["state"].items():
        t = int(state["step"])
        out[names[index]] = (state["exp_avg"] / (1 - b1 ** t), (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt())
    return out


def gradient_error(root_v_hat: torch.Tensor, rel: float) -> float:
    """E for one tensor: ``rel`` of its gradient scale (the largest RMS gradient of its elements)."""
    return rel * float(root_v_hat.max()) + 1e-30


def adam_step_bound(root_v_hat, error: float, lr: float, eps: float, cap: float, ratio=None, floor: float = 1.0):
    """Per element, how far one AdamW step can move a weight when every gradient it has seen is off by at most
    ``error``. ``ratio``: the measured |m_hat| / (sqrt(v_hat) + eps) of that step (else the cap); ``floor``
    scales sqrt(v_hat) down when it was measured at an earlier step than the update's."""
    denominator = (floor * root_v_hat - error).clamp_min(0) + eps
    r = torch.full_like(root_v_hat, cap) if ratio is None else ratio.clamp(max=cap)
    return lr * torch.minimum(error * (1 + r) / denominator, torch.full_like(root_v_hat, 2 * cap))


def rounding(weights: torch.Tensor) -> torch.Tensor:
    return 8 * U * weights.abs() + 1e-12


def assert_reordered(actual: torch.Tensor, expected: torch.Tensor, rel: float = FORWARD_REL, what: str = ""):
    """``actual`` equals ``expected`` up to the summation order of a forward pass: every entry within ``rel``
    of the tensor's scale (its largest |value|)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(expected.abs().max())
    diff = float((actual.float() - expected.float()).abs().max())
    assert diff <= rel * scale + 1e-30, f"{what}: max difference {diff:.3g} > {rel:g} x scale {scale:.3g}"

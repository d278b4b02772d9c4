"""Tests for raydpo.losses: hand-derived values, properties, parity with TRL 1.16's formulas, combined_loss.

The hand-derived tests share one batch of two pairs, β = 0.5, in float64:

    pair A: policy chosen −1, policy rejected −3, ref chosen −2, ref rejected −2
            r_c = −1 − (−2) = 1,  r_l = −3 − (−2) = −1,  Δ = r_c − r_l = 2,  βΔ = 1,  βr_c = 0.5,  βr_l = −0.5
    pair B: all four log-probs −2:  r_c = r_l = Δ = 0

Constants used below (10 decimals):
    σ(1) = 0.7310585786    σ(−1) = 0.2689414214    logσ(1) = −0.3132616875    logσ(−1) = −1.3132616875
    σ(0.5) = 0.6224593312  σ(−0.5) = 0.3775406688  logσ(0.5) = −0.4740769842  logσ(−0.5) = −0.9740769842
    logσ(0) = −ln 2 = −0.6931471806
Identity: logσ(x) − logσ(−x) = x.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from raydpo.losses import LOSSES, LossOutput, combined_loss, loss_params, register

BETA = 0.5
LN2 = math.log(2)
REF_BASED = sorted(n for n, fn in LOSSES.items() if not fn.reference_free)


def pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs A and B of the module docstring: (policy chosen, policy rejected, ref chosen, ref rejected)."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    return t(-1.0, -2.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.0)


def run(name: str, **params: float) -> LossOutput:
    return LOSSES[name](*pairs(), beta=BETA, **params)


def expect(
    out: LossOutput, losses: list[float], rewards: tuple[list[float], list[float]] | None = None
) -> None:
    """Compare the losses, and the rewards (default: β·r_c = [0.5, 0], β·r_l = [−0.5, 0])."""
    chosen, rejected = rewards or ([0.5, 0.0], [-0.5, 0.0])
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)
    assert_close(out.losses, f64(losses))
    assert_close(out.chosen_rewards, f64(chosen))
    assert_close(out.rejected_rewards, f64(rejected))


def random_logps(seed: int, n: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(-torch.rand(n, generator=g, dtype=torch.float64) * 20 for _ in range(4))


# --------------------------------------------------------------------------------- hand-derived values


def test_sigmoid_value():
    """−logσ(βΔ).  A: −logσ(1) = 0.3132616875.  B: −logσ(0) = ln 2 = 0.6931471806."""
    expect(run("sigmoid"), [0.3132616875, 0.6931471806])


def test_sigmoid_label_smoothing_value():
    """ε = 0.1: −0.9·logσ(βΔ) − 0.1·logσ(−βΔ).
    A: 0.9·0.3132616875 + 0.1·1.3132616875 = 0.2819355188 + 0.1313261688 = 0.4132616875.
    B: 0.9·ln 2 + 0.1·ln 2 = 0.6931471806."""
    expect(run("sigmoid", label_smoothing=0.1), [0.4132616875, 0.6931471806])


def test_ipo_value():
    """(Δ − 1/(2β))², 1/(2β) = 1.  A: (2 − 1)² = 1.  B: (0 − 1)² = 1.
    A third pair with Δ = 4 gives (4 − 1)² = 9."""
    expect(run("ipo"), [1.0, 1.0])
    one = torch.tensor([0.0], dtype=torch.float64)
    out = LOSSES["ipo"](one + 4, one, one, one, beta=BETA)
    assert_close(out.losses, torch.tensor([9.0], dtype=torch.float64))


def test_hinge_value():
    """relu(1 − βΔ).  A: relu(1 − 1) = 0.  B: relu(1 − 0) = 1."""
    expect(run("hinge"), [0.0, 1.0])


def test_robust_value():
    """ε = 0.1: (−0.9·logσ(βΔ) + 0.1·logσ(−βΔ)) / 0.8.
    A: (0.9·0.3132616875 − 0.1·1.3132616875) / 0.8 = (0.2819355188 − 0.1313261688) / 0.8 = 0.1506093500 / 0.8
       = 0.1882616875.
    B: (0.9·ln 2 − 0.1·ln 2) / 0.8 = ln 2 = 0.6931471806.
    ε = 0 reduces to sigmoid: A 0.3132616875."""
    expect(run("robust", label_smoothing=0.1), [0.1882616875, 0.6931471806])
    expect(run("robust"), [0.3132616875, 0.6931471806])


def test_bco_pair_value():
    """−logσ(βr_c) − logσ(−βr_l).  A: −logσ(0.5) − logσ(0.5) = 2·0.4740769842 = 0.9481539684.
    B: −2·logσ(0) = 2 ln 2 = 1.3862943611."""
    expect(run("bco_pair"), [0.9481539684, 1.3862943611])


def test_nca_pair_value():
    """−logσ(βr_c) − ½logσ(−βr_c) − ½logσ(−βr_l).
    A: −logσ(0.5) − ½logσ(−0.5) − ½logσ(0.5) = 0.4740769842 + 0.4870384921 + 0.2370384921 = 1.1981539684.
    B: (1 + ½ + ½)·ln 2 = 1.3862943611."""
    expect(run("nca_pair"), [1.1981539684, 1.3862943611])


def test_sppo_hard_value():
    """(r_c − 1/(2β))² + (r_l + 1/(2β))², 1/(2β) = 1.
    A: (1 − 1)² + (−1 + 1)² = 0.  B: (0 − 1)² + (0 + 1)² = 2."""
    expect(run("sppo_hard"), [0.0, 2.0])


def test_apo_zero_value():
    """(1 − σ(βr_c)) + σ(βr_l).  A: (1 − 0.6224593312) + σ(−0.5) = 0.3775406688 + 0.3775406688 = 0.7550813376.
    B: (1 − 0.5) + 0.5 = 1."""
    expect(run("apo_zero"), [0.7550813376, 1.0])


def test_apo_down_value():
    """σ(βr_c) + (1 − σ(β(r_c − r_l))).  A: σ(0.5) + (1 − σ(1)) = 0.6224593312 + 0.2689414214 = 0.8914007526.
    B: 0.5 + (1 − 0.5) = 1."""
    expect(run("apo_down"), [0.8914007526, 1.0])


def test_exo_pair_value():
    """ε = 1e-3: q_w·(logσ(βΔ) − log(1−ε)) + q_l·(logσ(−βΔ) − log ε),  log(1−ε) = −0.0010005003,
    log ε = −6.9077552790.
    A: q_w = σ(1) = 0.7310585786, q_l = σ(−1) = 0.2689414214:
       0.7310585786·(−0.3132616875 + 0.0010005003) + 0.2689414214·(−1.3132616875 + 6.9077552790)
       = 0.7310585786·(−0.3122611872) + 0.2689414214·5.5944935915
       = −0.2282812197 + 1.5045910583 = 1.2763098387.
    B: q_w = q_l = ½, logσ(0) = −ln 2: ½(−0.6931471806 + 0.0010005003) + ½(−0.6931471806 + 6.9077552790)
       = −0.3460733401 + 3.1073040492 = 2.7612307091."""
    expect(run("exo_pair"), [1.2763098387, 2.7612307091])


def test_simpo_value():
    """−logσ(β(π_c − π_r) − γ), γ = 0.5, reference ignored, rewards β·π.
    A: π_c = −1, π_r = −3: 0.5·2 − 0.5 = 0.5, −logσ(0.5) = 0.4740769842; rewards −0.5, −1.5.
    B: π_c = π_r = −2: 0 − 0.5, −logσ(−0.5) = 0.9740769842; rewards −1, −1.
    γ = 0 in A: −logσ(1) = 0.3132616875."""
    out = run("simpo")
    expect(out, [0.4740769842, 0.9740769842], ([-0.5, -1.0], [-1.5, -1.0]))
    assert_close(run("simpo", gamma=0.0).losses[0], torch.tensor(0.3132616875, dtype=torch.float64))
    pc, pr, _, _ = pairs()
    assert_close(LOSSES["simpo"](pc, pr, pc * 7, pr * 3, beta=BETA).losses, out.losses)  # ref ignored


# ------------------------------------------------------------------------------------------ properties


def test_registry_contents():
    """Every loss from the brief, with its reduction and reference-freeness."""
    assert set(LOSSES) == {
        "sigmoid", "ipo", "hinge", "robust", "bco_pair", "nca_pair",
        "sppo_hard", "apo_zero", "apo_down", "exo_pair", "simpo",
    }  # fmt: skip
    assert {n for n, fn in LOSSES.items() if fn.reduction == "mean"} == {"ipo", "simpo"}
    assert {n for n, fn in LOSSES.items() if fn.reference_free} == {"simpo"}
    assert all(fn.loss_name == n for n, fn in LOSSES.items())


def test_sigmoid_is_ln2_when_policy_equals_reference():
    x = torch.randn(5, dtype=torch.float64)
    y = torch.randn(5, dtype=torch.float64)
    assert_close(LOSSES["sigmoid"](x, y, x, y, beta=0.1).losses, torch.full((5,), LN2, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_swap_mirrors_rewards(name):
    """Swapping chosen and rejected swaps the rewards, so the margin negates."""
    pc, pr, rc, rr = random_logps(0)
    out = LOSSES[name](pc, pr, rc, rr, beta=BETA)
    swapped = LOSSES[name](pr, pc, rr, rc, beta=BETA)
    assert_close(swapped.chosen_rewards, out.rejected_rewards)
    assert_close(swapped.rejected_rewards, out.chosen_rewards)
    assert_close(
        swapped.chosen_rewards - swapped.rejected_rewards, -(out.chosen_rewards - out.rejected_rewards)
    )


def test_sigmoid_swap_difference_is_minus_beta_delta():
    """−logσ(x) + logσ(−x) = −x, with x = βΔ."""
    pc, pr, rc, rr = random_logps(1)
    delta = (pc - rc) - (pr - rr)
    out, swapped = LOSSES["sigmoid"](pc, pr, rc, rr, beta=BETA), LOSSES["sigmoid"](pr, pc, rr, rc, beta=BETA)
    assert_close(out.losses - swapped.losses, -BETA * delta)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_rewards_detached_losses_carry_grad(name):
    pc, pr, rc, rr = (t.clone().requires_grad_(i < 2) for i, t in enumerate(random_logps(2)))
    out = LOSSES[name](pc, pr, rc, rr, beta=BETA)
    assert out.losses.requires_grad and out.losses.shape == pc.shape
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.chosen_rewards.shape == out.rejected_rewards.shape == pc.shape


def test_sigmoid_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr, rc, rr = random_logps(3)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    LOSSES["sigmoid"](pc, pr, rc, rr, beta=BETA).losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_sigmoid_label_smoothing_is_cdpo():
    """cDPO (Mitchell 2023) = binary cross-entropy of σ(βΔ) against the soft label 1 − ε."""
    pc, pr, rc, rr = random_logps(4)
    logits = BETA * ((pc - rc) - (pr - rr))
    expected = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.9), reduction="none")
    assert_close(LOSSES["sigmoid"](pc, pr, rc, rr, beta=BETA, label_smoothing=0.1).losses, expected)


def test_sigmoid_is_stable_for_large_margins():
    big = torch.tensor([1e4], dtype=torch.float32)
    zero = torch.zeros(1)
    assert torch.isfinite(LOSSES["sigmoid"](zero, big, zero, zero, beta=1.0).losses).all()


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_rejects_bad_label_smoothing(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        run("robust", label_smoothing=eps)


@pytest.mark.parametrize("eps", [0.0, 1.0])
def test_exo_pair_rejects_bad_label_smoothing(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        run("exo_pair", label_smoothing=eps)


# -------------------------------------------------------------------------- parity with TRL's formulas


def trl_dpo_loss(loss_type, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, ls):
    """Per-sequence losses of TRL 1.16 DPOTrainer._compute_loss (f_divergence_type="reverse_kl"), restated."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta_score = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta_score)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta_score)
    if loss_type == "ipo":  # chosen/rejected logps here are already divided by the token counts (see below)
        return (delta_score - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        epsilon = torch.tensor(ls)
        qw, log_qw = torch.sigmoid(beta * delta_score), F.logsigmoid(beta * delta_score)
        ql, log_ql = torch.sigmoid(-beta * delta_score), F.logsigmoid(-beta * delta_score)
        return qw * (log_qw - torch.log1p(-epsilon)) + ql * (log_ql - torch.log(epsilon))
    if loss_type == "nca_pair":
        cr, rr = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    if loss_type == "robust":
        clean = -(1 - ls) * F.logsigmoid(beta * delta_score)
        flipped = -ls * F.logsigmoid(-beta * delta_score)
        return (clean - flipped) / (1 - 2 * ls)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * delta_score)
    raise AssertionError(loss_type)


TRL_PARITY = [
    ("sigmoid", {}), ("hinge", {}), ("ipo", {}), ("robust", {"label_smoothing": 0.2}), ("robust", {}),
    ("bco_pair", {}), ("nca_pair", {}), ("sppo_hard", {}), ("apo_zero", {}), ("apo_down", {}),
    ("exo_pair", {"label_smoothing": 1e-3}), ("exo_pair", {"label_smoothing": 0.3}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "params"), TRL_PARITY)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_parity_with_trl(name, params, beta):
    pc, pr, rc, rr = (t / 10 for t in random_logps(5))  # keep |βΔ| moderate so no branch saturates
    ours = LOSSES[name](pc, pr, rc, rr, beta=beta, **params)
    trl = trl_dpo_loss(name, pc, pr, rc, rr, beta, params.get("label_smoothing", 0.0))
    assert_close(ours.losses, trl)
    assert_close(ours.chosen_rewards, beta * (pc - rc))  # TRL's rewards/chosen
    assert_close(ours.rejected_rewards, beta * (pr - rr))


def test_ipo_mean_reduction_matches_trl_token_normalization():
    """TRL's IPO divides the summed log-ratios by each response's token count; combined_loss feeds ipo the
    per-token-mean log-probs (sum / count), which is the same thing."""
    pc, pr, rc, rr = random_logps(6)
    n_c, n_r = torch.tensor([3.0, 7.0, 1.0, 12.0] * 4, dtype=torch.float64), torch.arange(1.0, 17.0).double()
    trl = (((pc - rc) / n_c - (pr - rr) / n_r) - 1 / (2 * BETA)) ** 2
    out = combined_loss(
        ["ipo"], None, beta=BETA, params={},
        policy_logps={"sum": (pc, pr), "mean": (pc / n_c, pr / n_r)},
        ref_logps={"sum": (rc, rr), "mean": (rc / n_c, rr / n_r)},
    )  # fmt: skip
    assert_close(out.losses, trl)


def test_simpo_parity_with_trl_cpo():
    """TRL 1.16 CPOTrainer.cpo_loss, loss_type="simpo", alpha 0, label_smoothing 0."""
    pc, pr, _, _ = random_logps(7)
    beta, simpo_gamma = 2.0, 0.7
    logits = (pc - pr) / 10 - simpo_gamma / beta
    trl = -F.logsigmoid(beta * logits)
    out = LOSSES["simpo"](pc / 10, pr / 10, pc, pr, beta=beta, gamma=simpo_gamma)
    assert_close(out.losses, trl)
    assert_close(out.chosen_rewards, beta * pc / 10)


# --------------------------------------------------------------------------------------- combined_loss


def logps(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Different tensors under "sum" and "mean", so a test sees which one a loss received."""
    a, b, c, d = random_logps(seed, n=4)
    return {"sum": (a, b), "mean": (c / 10, d / 10)}


def test_combined_weights_and_first_rewards():
    pol, ref = logps(10), logps(11)
    sig = LOSSES["sigmoid"](*pol["sum"], *ref["sum"], beta=BETA)
    hin = LOSSES["hinge"](*pol["sum"], *ref["sum"], beta=BETA)
    out = combined_loss(
        ["sigmoid", "hinge"], [2.0, 3.0], beta=BETA, params={}, policy_logps=pol, ref_logps=ref
    )
    assert_close(out.losses, 2 * sig.losses + 3 * hin.losses)
    assert_close(out.chosen_rewards, sig.chosen_rewards)
    assert_close(out.rejected_rewards, sig.rejected_rewards)
    unweighted = combined_loss(
        ["sigmoid", "hinge"], None, beta=BETA, params={}, policy_logps=pol, ref_logps=ref
    )
    assert_close(unweighted.losses, sig.losses + hin.losses)


def test_combined_passes_each_loss_only_its_params():
    """label_smoothing reaches sigmoid but not hinge (which would raise TypeError); gamma only simpo."""
    pol, ref = logps(12), logps(13)
    params = {"label_smoothing": 0.1, "gamma": 0.3}
    out = combined_loss(
        ["sigmoid", "hinge", "simpo"], None, beta=BETA, params=params, policy_logps=pol, ref_logps=ref
    )
    expected = (
        LOSSES["sigmoid"](*pol["sum"], *ref["sum"], beta=BETA, label_smoothing=0.1).losses
        + LOSSES["hinge"](*pol["sum"], *ref["sum"], beta=BETA).losses
        + LOSSES["simpo"](*pol["mean"], *ref["mean"], beta=BETA, gamma=0.3).losses
    )
    assert_close(out.losses, expected)


def test_combined_picks_each_losses_reduction_and_override():
    pol, ref = logps(14), logps(15)
    kw = dict(beta=BETA, params={}, policy_logps=pol, ref_logps=ref)
    ipo_mean = LOSSES["ipo"](*pol["mean"], *ref["mean"], beta=BETA)
    ipo_sum = LOSSES["ipo"](*pol["sum"], *ref["sum"], beta=BETA)
    sig_sum = LOSSES["sigmoid"](*pol["sum"], *ref["sum"], beta=BETA)
    sig_mean = LOSSES["sigmoid"](*pol["mean"], *ref["mean"], beta=BETA)
    assert not torch.allclose(ipo_mean.losses, ipo_sum.losses)
    out = combined_loss(["ipo", "sigmoid"], None, **kw)
    assert_close(out.losses, ipo_mean.losses + sig_sum.losses)
    assert_close(out.chosen_rewards, ipo_mean.chosen_rewards)  # rewards of the first loss, on "mean" logps
    assert_close(combined_loss(["ipo"], None, reduction="sum", **kw).losses, ipo_sum.losses)
    assert_close(combined_loss(["sigmoid"], None, reduction="mean", **kw).losses, sig_mean.losses)


def test_combined_reference_free_without_ref_logps():
    pol = logps(16)
    out = combined_loss(["simpo"], None, beta=BETA, params={}, policy_logps=pol, ref_logps=None)
    assert_close(out.losses, LOSSES["simpo"](*pol["mean"], *logps(17)["mean"], beta=BETA).losses)
    with pytest.raises(ValueError, match="reference"):
        combined_loss(["simpo", "sigmoid"], None, beta=BETA, params={}, policy_logps=pol, ref_logps=None)


def test_combined_errors():
    kw = dict(beta=BETA, params={}, policy_logps=logps(18), ref_logps=logps(19))
    with pytest.raises(KeyError, match="allowed: .*sigmoid"):
        combined_loss(["dpo_typo"], None, **kw)
    with pytest.raises(ValueError, match="weights"):
        combined_loss(["sigmoid", "hinge"], [1.0], **kw)
    with pytest.raises(ValueError):
        combined_loss([], None, **kw)


def test_loss_params():
    assert {n: loss_params(n) for n in LOSSES} == {
        "sigmoid": {"label_smoothing"}, "robust": {"label_smoothing"}, "exo_pair": {"label_smoothing"},
        "simpo": {"gamma"}, "ipo": set(), "hinge": set(), "bco_pair": set(), "nca_pair": set(),
        "sppo_hard": set(), "apo_zero": set(), "apo_down": set(),
    }  # fmt: skip
    with pytest.raises(KeyError, match="allowed"):
        loss_params("nope")


def test_register_sets_attributes_and_rejects_duplicates():
    try:

        @register("_test_tmp", reduction="mean", reference_free=True)
        def tmp(pc, pr, rc, rr, *, beta: float, alpha: float = 1.0) -> LossOutput:
            return LossOutput(alpha * (pc - pr), beta * pc.detach(), beta * pr.detach())

        assert LOSSES["_test_tmp"] is tmp
        assert (tmp.loss_name, tmp.reduction, tmp.reference_free) == ("_test_tmp", "mean", True)
        assert loss_params("_test_tmp") == {"alpha"}
        with pytest.raises(ValueError, match="already registered"):
            register("_test_tmp")(tmp)
    finally:
        LOSSES.pop("_test_tmp", None)
    with pytest.raises(ValueError, match="already registered"):
        register("sigmoid")(lambda *a, beta: None)
    with pytest.raises(ValueError, match="reduction"):
        register("_bad", reduction="max")
    assert "_bad" not in LOSSES

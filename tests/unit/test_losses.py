"""Policy losses against independent references: per-element float64 loops, hand-worked values, and the
gradient identities in docs/algorithms.md. Nothing here calls the code under test to make its expectation."""

from __future__ import annotations

import math

import pytest
import torch

from megarl.losses import LOSSES, LossInput, build_loss



@pytest.fixture(autouse=True)
def float64_default():
    """References here are float64 loops; restore the default afterwards so no other test inherits it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make_batch(seed=0, B=6, T=7, spread=0.3, groups=(0, 0, 0, 1, 1, 1)):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3 - 0.05
    lp = (old + spread * torch.randn(B, T, generator=g)).clamp(max=-1e-3).requires_grad_(True)
    ref = old + 0.2 * torch.randn(B, T, generator=g)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    adv = torch.randn(B, 1, generator=g).expand(B, T).clone()
    return LossInput(logprobs=lp, old_logprobs=old, ref_logprobs=ref, mask=mask, advantages=adv,
                     rewards=torch.rand(B, generator=g), group_ids=torch.tensor(groups),
                     levels=torch.tensor([1, 2, 4, 2, 2, 3][:B]), v_star=torch.rand(B, generator=g),
                     entropy=torch.rand(B, T, generator=g))


def grad_of(loss_name, inp, **hp):
    inp.logprobs.grad = None
    loss, _ = build_loss(loss_name, **hp)(inp)
    loss.backward()
    return loss.detach(), inp.logprobs.grad.clone()


# ---------------------------------------------------------------- brute-force references (scalar loops)

def ppo_token_loss(lp, old, a, el, eh, c):
    lp, old, a = float(lp), float(old), float(a)
    rho = math.exp(lp - old)
    l = max(-a * rho, -a * min(max(rho, 1 - el), 1 + eh))
    if a < 0 and c is not None:
        l = min(l, -a * c)
    return l


def k3(lp, ref):
    d = float(ref) - float(lp)
    return math.exp(d) - d - 1


def test_grpo_matches_scalar_loop_token_mean_with_k3_and_entropy():
    inp = make_batch(1, spread=0.5)
    loss, _ = build_loss("grpo", entropy_coef=0.01)(inp)
    lp, old, ref, m, a, h = (x.detach() for x in (inp.logprobs, inp.old_logprobs, inp.ref_logprobs, inp.mask,
                                                  inp.advantages, inp.entropy))
    pg = kl = ent = n = 0.0
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if m[b, t]:
                pg += ppo_token_loss(lp[b, t], old[b, t], a[b, t], 0.2, 0.2, 3.0)
                kl += k3(lp[b, t], ref[b, t])
                ent += float(h[b, t])
                n += 1
    assert loss.item() == pytest.approx(pg / n + 1e-3 * kl / n - 0.01 * ent / n, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregation_modes_match_scalar_loop(mode):
    inp = make_batch(2, spread=0.4)
    loss, _ = build_loss("dapo", agg_mode=mode, norm_len=11)(inp)
    lp, old, m, a = (x.detach() for x in (inp.logprobs, inp.old_logprobs, inp.mask, inp.advantages))
    per_seq = []
    for b in range(lp.shape[0]):
        s = sum(ppo_token_loss(lp[b, t], old[b, t], a[b, t], 0.2, 0.28, 10.0) for t in range(lp.shape[1]) if m[b, t])
        per_seq.append(s / m[b].sum().item() if mode == "seq-mean-token-mean" else s)
    expect = sum(per_seq) / len(per_seq) / (11 if mode.endswith("norm") else 1)
    assert loss.item() == pytest.approx(float(expect), rel=1e-12)


def test_dual_clip_hand_worked_values():
    # one token each: ratio e^0.5 ~ 1.6487 with A=+1 is clipped at 1.2; ratio e^2 ~ 7.39 with A=-1 is unclipped
    # (loss 7.39) for c=10 but dual-clipped to c=3 for GRPO's default.
    lp = torch.tensor([[0.5], [2.0]], requires_grad=True)
    inp = LossInput(logprobs=lp - 3.0, old_logprobs=torch.full((2, 1), -3.0), mask=torch.ones(2, 1),
                    advantages=torch.tensor([[1.0], [-1.0]]))
    loss, m = build_loss("grpo", kl_coef=0.0)(inp)
    assert loss.item() == pytest.approx((-1.2 + 3.0) / 2)
    assert m["clip_frac"] == 0.5 and m["clip_frac_dual"] == 0.5
    loss, _ = build_loss("dapo")(inp)
    assert loss.item() == pytest.approx((-1.28 + math.exp(2.0)) / 2)


def test_kl_estimators_expectations_are_the_reverse_kl():
    # Exact expectation over a 5-way categorical under pi_theta: k1 and k3 are unbiased for KL(pi || ref).
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    true_kl = float((p * (p / q).log()).sum())
    from megarl.losses import kl_estimate
    for kind in ("k1", "k3"):
        est = float((p * kl_estimate(p.log(), q.log(), kind)).sum())
        assert est == pytest.approx(true_kl, rel=1e-12)
    forward = float((q * (q / p).log()).sum())
    assert float((p * kl_estimate(q.log(), p.log(), "k3")).sum()) != pytest.approx(true_kl, rel=1e-3)
    assert forward != pytest.approx(true_kl, rel=1e-3)
    close = torch.tensor([0.21, 0.2, 0.2, 0.2, 0.19])
    k2 = float((close * kl_estimate(close.log(), q.log(), "k2")).sum())
    assert k2 == pytest.approx(float((close * (close / q).log()).sum()), rel=0.05)


# ---------------------------------------------------------------- gradient identities (docs/algorithms.md)

def test_trw_with_ppo_indicator_weight_has_the_dual_clip_ppo_gradient():
    inp = make_batch(3, spread=0.6)
    _, g_ppo = grad_of("grpo", inp, kl_coef=0.0)
    _, g_trw = grad_of("trw_indicator", inp)
    assert (g_ppo != 0).any() and (g_ppo == 0).any()  # the batch exercises clipped and unclipped tokens
    torch.testing.assert_close(g_trw, g_ppo, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("div", ["fkl", "rkl", "ufkl", "urkl"])
def test_rpg_style_clip_with_beta_zero_has_the_dapo_gradient(div):
    inp = make_batch(4, spread=0.6)
    _, g_dapo = grad_of("dapo", inp)
    _, g_rpg = grad_of(f"rpg_rf_{div}_clip", inp, beta=0.0)
    torch.testing.assert_close(g_rpg, g_dapo, rtol=1e-12, atol=1e-15)


TABLE2 = {  # paper Table 2: the stop-gradient coefficient multiplying log pi_theta, with R := A, Z_old dropped
    "fkl": lambda w, A, b: w * A + b,
    "rkl": lambda w, A, b: w * (A - b * w.log() - b),
    "ufkl": lambda w, A, b: w * A - b * (w - 1),
    "urkl": lambda w, A, b: w * (A - b * w.log()),
}


@pytest.mark.parametrize("div", list(TABLE2))
def test_rpg_reinforce_gradient_equals_table2(div):
    inp = make_batch(5, spread=0.05)  # w within [0.8, 1.28] so truncation is inactive, w != 1
    beta = 0.3  # large, so the KL part of the gradient is visible
    _, g = grad_of(f"rpg_rf_{div}", inp, beta=beta)
    lp = inp.logprobs.detach().clone().requires_grad_(True)
    w = torch.exp(lp - inp.old_logprobs)
    assert ((w > 0.8) & (w < 1.28)).all() and (w - 1).abs().max() > 1e-3
    coef = TABLE2[div](w, inp.advantages, beta).detach()
    ref = -(coef * lp * inp.mask).sum() / inp.mask.sum()
    ref.backward()
    torch.testing.assert_close(g, lp.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("div,fn", [
    ("fkl", lambda lw: -lw), ("rkl", lambda lw: lw.exp() * lw),
    ("ufkl", lambda lw: lw.exp() - lw - 1), ("urkl", lambda lw: lw.exp() * (lw - 1) + 1)])
def test_rpg_differentiable_is_dapo_plus_table1_kl(div, fn):
    inp = make_batch(6, spread=0.3)
    loss, _ = build_loss(f"rpg_{div}", beta=0.5)(inp)
    dapo, _ = build_loss("dapo")(inp)
    lw = inp.logprobs.detach() - inp.old_logprobs
    kl = (fn(lw) * inp.mask).sum() / inp.mask.sum()
    assert loss.item() == pytest.approx(dapo.item() + 0.5 * kl.item(), rel=1e-12)


# ---------------------------------------------------------------- TRW weights

def test_trw_triangular_weight_shape():
    from megarl.losses.trw import triangular_weight
    rho = torch.tensor([0.7, 0.8, 0.9, 1.0, 1.14, 1.28, 1.3])
    w = triangular_weight(rho, torch.ones(7), 0.2, 0.28, w0=0.5, w2=0.5)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.5, 0.75, 1.0, 0.75, 0.5, 0.0]))
    sa = triangular_weight(rho, -torch.ones(7), 0.2, 0.28, 0.5, 0.5, sign_aware=True)
    torch.testing.assert_close(sa, torch.tensor([0.0, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]))


def test_trw_logistic_value_and_stop_gradient():
    lp = torch.tensor([[math.log(1.1)]], requires_grad=True)
    inp = LossInput(logprobs=lp, old_logprobs=torch.zeros(1, 1), mask=torch.ones(1, 1),
                    advantages=torch.tensor([[2.0]]))
    loss, _ = build_loss("trw_logistic")(inp)
    w = 1 / (1 + math.exp(10 * math.log(1.1))) * 1 / (1 + math.exp(-2.0))
    assert loss.item() == pytest.approx(-w * 1.1 * 2.0)
    loss.backward()  # d/dlp of -w*rho*A with w held fixed = -w*rho*A
    assert lp.grad.item() == pytest.approx(-w * 1.1 * 2.0)


def test_trw_entropy_boost_only_for_positive_advantage():
    inp = make_batch(7, spread=0.05)
    base, _ = build_loss("trw_triangular")(inp)
    boosted, _ = build_loss("trw_entropy", lam=0.0)(inp)
    assert boosted.item() == pytest.approx(base.item(), rel=1e-12)
    lp = torch.tensor([[math.log(0.2)], [math.log(0.2)]], requires_grad=True)
    one = LossInput(logprobs=lp, old_logprobs=lp.detach().clone(), mask=torch.ones(2, 1),
                    advantages=torch.tensor([[1.0], [-1.0]]))
    loss, _ = build_loss("trw_entropy", lam=0.5)(one)
    # rho = 1 -> triangular weight 1; the A>0 token (pi_old = 0.2) gets 1 + 0.5 * 0.8 = 1.4, the A<0 token 1
    assert loss.item() == pytest.approx((-1.4 + 1.0) / 2, rel=1e-12)


# ---------------------------------------------------------------- TRPA

def test_trpa_matches_pairwise_loop():
    inp = make_batch(8)
    loss, m = build_loss("trpa")(inp)
    lp, ref, old, msk = (x.detach() for x in (inp.logprobs, inp.ref_logprobs, inp.old_logprobs, inp.mask))
    ell = [sum((lp[b, t] - ref[b, t]).item() for t in range(lp.shape[1]) if msk[b, t]) / msk[b].sum().item()
           for b in range(lp.shape[0])]
    lv, gid = inp.levels.tolist(), inp.group_ids.tolist()
    terms = []
    for grp in set(gid):
        idx = [i for i in range(len(gid)) if gid[i] == grp]
        pairs = [(i, j) for i in idx for j in idx if lv[i] < lv[j]]
        if pairs:
            for i, j in pairs:
                beta = 0.1 * 2.5 if lv[i] == 1 else 0.1
                terms.append(-math.log(1 / (1 + math.exp(-beta * (ell[i] - ell[j])))))
        else:
            for i in idx:
                s = 1.0 if lv[i] == 1 else -1.0
                terms.append(-math.log(1 / (1 + math.exp(-s * ell[i]))))
    tr = sum(k3(lp[b, t].item(), old[b, t].item()) for b in range(lp.shape[0]) for t in range(lp.shape[1])
             if msk[b, t]) / msk.sum().item()
    # group 0 has levels (1,2,4): 3 pairs; group 1 has (2,2,3): 2 pairs
    assert m["pairs"] == 5 and m["fallback_samples"] == 0
    assert loss.item() == pytest.approx(sum(terms) / len(terms) + 1e-3 * tr, rel=1e-12)


def test_trpa_fallback_for_a_group_without_pairs():
    inp = make_batch(9)
    inp.levels = torch.tensor([1, 1, 1, 2, 3, 2])
    loss, m = build_loss("trpa", tr_coef=0.0)(inp)
    ell = ((inp.logprobs.detach() - inp.ref_logprobs) * inp.mask).sum(-1) / inp.mask.sum(-1)
    terms = [-math.log(1 / (1 + math.exp(-ell[i].item()))) for i in range(3)]  # all level 1: push up, no beta
    for i, j in [(3, 4), (5, 4)]:
        terms.append(-math.log(1 / (1 + math.exp(-0.1 * (ell[i] - ell[j]).item()))))
    assert m["pairs"] == 2 and m["fallback_samples"] == 3
    assert loss.item() == pytest.approx(sum(terms) / 5, rel=1e-12)


def test_trpa_rejects_a_group_of_one():
    inp = make_batch(10, groups=(0, 0, 1, 1, 1, 2))
    with pytest.raises(ValueError, match="group 2 has a single response"):
        build_loss("trpa")(inp)


# ---------------------------------------------------------------- A*-PO

def test_astar_po_matches_loop():
    inp = make_batch(11)
    loss, _ = build_loss("astar_po")(inp)
    lp, ref, m, h = (x.detach() for x in (inp.logprobs, inp.ref_logprobs, inp.mask, inp.entropy))
    reg = 0.0
    for b in range(lp.shape[0]):
        s = sum((lp[b, t] - ref[b, t]).item() for t in range(lp.shape[1]) if m[b, t])
        reg += (1e-3 * s - (inp.rewards[b].item() - inp.v_star[b].item())) ** 2
    ent = (h * m).sum().item() / m.sum().item()
    assert loss.item() == pytest.approx(reg / lp.shape[0] - 1e-3 * ent, rel=1e-12)


# ---------------------------------------------------------------- micro-batch / data-parallel invariance

SPLITS = [[0, 1, 2], [3, 4, 5]], [[3, 4, 5], [0, 1, 2]]  # whole groups per micro-batch (TRPA needs that)
TOKEN_SPLITS = [[0], [1, 2, 3], [4, 5]]


def subset(inp: LossInput, idx) -> LossInput:
    idx = torch.tensor(idx)
    kw = {f: (getattr(inp, f)[idx] if getattr(inp, f) is not None else None)
          for f in ("old_logprobs", "ref_logprobs", "mask", "advantages", "rewards", "group_ids", "levels",
                    "v_star", "entropy", "rollout_logprobs", "selected")}
    return LossInput(logprobs=inp.logprobs[idx], **kw)


INVARIANCE_CASES = [(n, m) for n in sorted(LOSSES) for m in
                    (["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
                     if "agg_mode" in LOSSES[n].defaults else [None])]


@pytest.mark.parametrize("name,mode", INVARIANCE_CASES)
def test_micro_batches_and_ranks_reproduce_the_whole_batch_gradient_and_metrics(name, mode):
    """Loss, gradient and every metric of the micro-batches (summed counts) add up to the whole batch's."""
    loss_fn = build_loss(name, **({"agg_mode": mode, "norm_len": 9} if mode else {}))
    inp = make_batch(12, spread=0.5)
    if loss_fn.spec.select:  # Clip-Cov / KL-Cov: the trainer selects once over the whole step, then splits
        from megarl.losses.cov import covariance

        cov = covariance(inp.old_logprobs, inp.advantages, inp.mask)
        inp.selected = loss_fn.spec.select(cov, inp.mask, {**loss_fn.hparams, "select_ratio": 0.1, "cov_lb": -9.0},
                                           torch.Generator().manual_seed(0))
        assert inp.selected.sum() > 0
    full, full_metrics = loss_fn(inp)
    full.backward()
    g_full = inp.logprobs.grad.clone()
    splits = SPLITS[0] if name == "trpa" else TOKEN_SPLITS
    parts = [subset(inp, idx) for idx in splits]
    total_counts: dict[str, float] = {}
    for p in parts:  # what the trainer does: sum counts over micro-batches (and all-reduce over DP ranks)
        for k, v in loss_fn.counts(p).items():
            total_counts[k] = total_counts.get(k, 0.0) + v
    inp.logprobs.grad = None
    sums = {"loss": 0.0}  # the loss and every metric, summed over the micro-batches (as the trainer does)
    for p in parts:
        p.counts = total_counts
        part_loss, part_metrics = loss_fn(p)
        part_loss.backward()  # gradients accumulate into inp.logprobs.grad
        sums.update({k: sums.get(k, 0.0) + v for k, v in {"loss": part_loss.item(), **part_metrics}.items()})
    assert sums.pop("loss") == pytest.approx(full.item(), rel=1e-10, abs=1e-14)
    assert sums == pytest.approx(full_metrics, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(inp.logprobs.grad, g_full, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- registry and errors

def test_registry_errors_list_names_and_suggest():
    with pytest.raises(ValueError, match=r"Did you mean 'dapo'\?") as e:
        build_loss("dapo2")
    assert "grpo" in str(e.value) and "trpa" in str(e.value)
    with pytest.raises(ValueError, match=r"clip_high"):
        build_loss("grpo", clip_hihg=0.3)


def test_missing_field_names_the_field():
    inp = make_batch(13)
    inp.ref_logprobs = None
    with pytest.raises(ValueError, match=r"LossInput\.ref_logprobs"):
        build_loss("grpo")(inp)
    build_loss("grpo", kl_coef=0.0)(inp)  # not needed without KL
    inp.old_logprobs = None
    with pytest.raises(ValueError, match=r"LossInput\.old_logprobs"):
        build_loss("dapo")(inp)


def test_issue_defaults():
    d = {n: build_loss(n).hparams for n in LOSSES}
    assert (d["grpo"]["clip_low"], d["grpo"]["clip_high"], d["grpo"]["clip_c"], d["grpo"]["kl_coef"]) == \
        (0.2, 0.2, 3.0, 1e-3)
    assert d["dr_grpo"]["agg_mode"] == "seq-mean-token-sum-norm"
    assert (d["dapo"]["clip_high"], d["dapo"]["clip_c"], d["dapo"]["kl_coef"]) == (0.28, 10.0, 0.0)
    assert (d["trpa"]["beta"], d["trpa"]["kappa"], d["trpa"]["tr_coef"]) == (0.1, 2.5, 1e-3)
    assert (d["astar_po"]["beta2"], d["astar_po"]["entropy_coef"]) == (1e-3, 1e-3)
    assert (d["rpg_ufkl"]["beta"], d["rpg_rf_urkl_clip"]["clip_c"]) == (1e-4, 10.0)
    assert (d["reinforce_pp"]["kl_estimator"], d["reinforce_pp"]["kl_coef"]) == ("k1", 1e-4)
    assert (d["trw_logistic"]["alpha"], d["trw_entropy"]["lam"]) == (10.0, 0.5)

"""SEAD's auxiliary-head loss (recstack.training.sead): the selectors' targets, the bilateral
branches and their BBN merge, the ablations as distinct losses, and where the gradient goes
(the main head never learns from its own soft label; SGA keeps the aux loss out of the
shared parts)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recstack.training import sead

Y = torch.tensor([1.0, 0.0, 1.0, 0.0])
SOFT = torch.tensor([0.3, 0.2, 0.9, 0.6])
MAIN = torch.logit(SOFT)


def test_selectors_targets():
    torch.testing.assert_close(sead.select("max", Y, SOFT), torch.tensor([1.0, 0.2, 1.0, 0.6]))
    torch.testing.assert_close(sead.select("min", Y, SOFT), torch.tensor([0.3, 0.0, 0.9, 0.0]))
    for s in ("curriculum", "positives_only"):
        torch.testing.assert_close(sead.select(s, Y, SOFT), sead.select("max", Y, SOFT))
    torch.testing.assert_close(sead.select("ogl", Y, SOFT), Y)
    torch.testing.assert_close(sead.select("dtl", Y, SOFT), SOFT)
    with pytest.raises(ValueError, match="unknown selector 'mean'"):
        sead.select("mean", Y, SOFT)


def test_scratch_share_follows_bbn_cumulative_learning_for_the_curriculum():
    assert [sead.scratch_share("curriculum", p) for p in (0.0, 0.5, 1.0)] == [1.0, 0.75, 0.0]
    assert sead.scratch_share("max", 0.3) == sead.scratch_share("min", 0.9) == 0.5
    assert sead.scratch_share("ogl", 0.5) == 1.0 and sead.scratch_share("dtl", 0.5) == 0.0
    zs, zd = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(sead.merge("max", zs, zd, 0.0), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(sead.merge("curriculum", zs, zd, 0.0), zs)
    torch.testing.assert_close(sead.merge("curriculum", zs, zd, 1.0), zd)
    assert sead.merge("ogl", zs, zd, 0.5) is zs and sead.merge("dtl", zs, zd, 0.5) is zd


def test_curriculum_weights_decay_to_one():
    w0 = sead.curriculum_weight(Y, progress=0.0, pos_weight=3.0, until=0.5)
    torch.testing.assert_close(w0, torch.tensor([3.0, 1.0, 3.0, 1.0]))
    w_mid = sead.curriculum_weight(Y, progress=0.25, pos_weight=3.0, until=0.5)
    torch.testing.assert_close(w_mid, torch.tensor([2.0, 1.0, 2.0, 1.0]))
    for p in (0.5, 0.9):
        torch.testing.assert_close(sead.curriculum_weight(Y, p, 3.0, 0.5), torch.ones(4))
    with pytest.raises(ValueError, match="pos_weight >= 1"):
        sead.curriculum_weight(Y, 0.0, pos_weight=0.5)


def test_max_loss_is_the_merged_head_on_max_plus_each_branch_on_its_own_label():
    zs, zd = torch.tensor([0.5, -1.0, 2.0, 0.1]), torch.tensor([-0.2, 0.3, 1.0, -1.5])
    loss, parts = sead.aux_loss("max", zs, zd, Y, MAIN)
    merged = 0.5 * zs + 0.5 * zd
    expected = (F.binary_cross_entropy_with_logits(merged, sead.select("max", Y, SOFT))
                + 0.5 * F.binary_cross_entropy_with_logits(zs, Y) + 0.5 * F.binary_cross_entropy_with_logits(zd, SOFT))
    torch.testing.assert_close(loss, expected)
    assert parts["aux_target_mean"].item() == pytest.approx(float(sead.select("max", Y, SOFT).mean()))


@pytest.mark.parametrize("selector,branch", [("ogl", "scratch"), ("dtl", "distill")])
def test_ogl_and_dtl_train_one_branch_on_one_label(selector, branch):
    zs = torch.tensor([0.5, -1.0, 2.0, 0.1], requires_grad=True)
    zd = torch.tensor([-0.2, 0.3, 1.0, -1.5], requires_grad=True)
    loss, _ = sead.aux_loss(selector, zs, zd, Y, MAIN)
    used, unused, label = (zs, zd, Y) if branch == "scratch" else (zd, zs, SOFT)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(used.detach(), label))
    loss.backward()
    assert torch.count_nonzero(used.grad) > 0 and unused.grad is None


def test_positives_only_carries_no_loss_on_negatives():
    zs = torch.zeros(4, requires_grad=True)
    zd = torch.zeros(4, requires_grad=True)
    sead.aux_loss("positives_only", zs, zd, Y, MAIN)[0].backward()
    assert torch.all(zs.grad[Y == 0] == 0) and torch.all(zd.grad[Y == 0] == 0)
    assert torch.all(zs.grad[Y == 1] != 0)


def test_the_main_head_learns_from_the_ground_truth_only():
    main = MAIN.clone().requires_grad_(True)
    zs, zd = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    loss, parts = sead.sead_loss(main, zs, zd, Y, "max", aux_weight=1.0)
    loss.backward()
    # d/dz BCE(z, y) = sigmoid(z) - y, averaged: no term from the auxiliary loss
    torch.testing.assert_close(main.grad, (torch.sigmoid(MAIN) - Y) / 4)
    torch.testing.assert_close(parts["main"], F.binary_cross_entropy_with_logits(MAIN, Y))


def test_weighted_bce_is_zero_without_weight():
    assert sead.weighted_bce(torch.zeros(4), Y, torch.zeros(4)).item() == 0.0


def test_sga_stops_the_aux_gradient_at_the_shared_bottom():
    torch.manual_seed(0)
    bottom = torch.nn.Linear(3, 5)
    aux_head = torch.nn.Linear(5, 1)
    x = torch.randn(8, 3)
    y = (torch.rand(8) < 0.5).float()
    for stop in (True, False):
        bottom.zero_grad(), aux_head.zero_grad()
        h = bottom(x)
        aux = aux_head(sead.aux_input(h, stop)).squeeze(-1)
        sead.weighted_bce(aux, y, torch.ones(8)).backward()
        assert aux_head.weight.grad is not None and torch.any(aux_head.weight.grad != 0)
        if stop:
            assert bottom.weight.grad is None or torch.count_nonzero(bottom.weight.grad) == 0
        else:
            assert torch.count_nonzero(bottom.weight.grad) > 0

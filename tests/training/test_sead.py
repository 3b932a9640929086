"""SEAD selectors and the auxiliary-head loss (recstack.training.sead): targets, weights, and where the
gradient goes (the main head never learns from its own soft label; SGA keeps the aux loss
out of the shared parts)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recstack.training import sead

Y = torch.tensor([1.0, 0.0, 1.0, 0.0])
SOFT = torch.tensor([0.3, 0.2, 0.9, 0.6])


def test_selectors_merge_labels_as_documented():
    torch.testing.assert_close(sead.select("max", Y, SOFT), torch.tensor([1.0, 0.2, 1.0, 0.6]))
    torch.testing.assert_close(sead.select("min", Y, SOFT), torch.tensor([0.3, 0.0, 0.9, 0.0]))
    torch.testing.assert_close(sead.select("curriculum", Y, SOFT), sead.select("max", Y, SOFT))
    torch.testing.assert_close(sead.select("ogl", Y, SOFT), Y)
    torch.testing.assert_close(sead.select("dtl", Y, SOFT), SOFT)
    torch.testing.assert_close(sead.select("positives_only", Y, SOFT), Y)
    with pytest.raises(ValueError, match="unknown selector"):
        sead.select("mean", Y, SOFT)


def test_curriculum_weights_positives_early_then_decays_to_one():
    w0 = sead.curriculum_weight(Y, progress=0.0, pos_weight=3.0, until=0.5)
    torch.testing.assert_close(w0, torch.tensor([3.0, 1.0, 3.0, 1.0]))
    w_mid = sead.curriculum_weight(Y, progress=0.25, pos_weight=3.0, until=0.5)
    torch.testing.assert_close(w_mid, torch.tensor([2.0, 1.0, 2.0, 1.0]))
    for p in (0.5, 0.9, 1.0):
        torch.testing.assert_close(sead.curriculum_weight(Y, p, 3.0, 0.5), torch.ones(4))
    with pytest.raises(ValueError):
        sead.curriculum_weight(Y, 0.0, pos_weight=0.5)


def test_aux_targets_weights_per_selector():
    logits = torch.logit(SOFT)
    t, w = sead.aux_targets("positives_only", Y, logits)
    torch.testing.assert_close(w, Y)  # negatives carry no weight
    t, w = sead.aux_targets("curriculum", Y, logits, progress=0.0, pos_weight=4.0)
    torch.testing.assert_close(t, torch.tensor([1.0, 0.2, 1.0, 0.6]))
    torch.testing.assert_close(w, torch.tensor([4.0, 1.0, 4.0, 1.0]))
    t, w = sead.aux_targets("max", Y, logits)
    torch.testing.assert_close(w, torch.ones(4))


def test_main_head_gradient_comes_from_ground_truth_only():
    main = torch.logit(SOFT).clone().requires_grad_(True)
    aux = torch.zeros(4, requires_grad=True)
    loss, parts = sead.sead_loss(main, aux, Y, "max", aux_weight=1.0)
    loss.backward()
    ref = torch.logit(SOFT).clone().requires_grad_(True)
    F.binary_cross_entropy_with_logits(ref, Y).backward()
    # y' = sigmoid(main) is detached: the aux loss sends nothing into the main head
    torch.testing.assert_close(main.grad, ref.grad)
    assert aux.grad is not None and torch.any(aux.grad != 0)
    assert set(parts) == {"main", "aux", "aux_target_mean"}


def test_aux_loss_is_weighted_bce_against_the_selected_target():
    main, aux = torch.logit(SOFT), torch.tensor([0.5, -0.5, 1.0, 0.0])
    loss, parts = sead.sead_loss(main, aux, Y, "min", aux_weight=0.7)
    expected_aux = F.binary_cross_entropy_with_logits(aux, sead.select("min", Y, SOFT))
    torch.testing.assert_close(parts["aux"], expected_aux)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(main, Y) + 0.7 * expected_aux)
    # with all weights 0 the weighted loss is 0, not NaN
    assert sead.weighted_bce(aux, Y, torch.zeros(4)).item() == 0.0


def test_sga_stops_the_aux_gradient_at_the_shared_bottom():
    torch.manual_seed(0)
    bottom = torch.nn.Linear(3, 5)
    main_head, aux_head = torch.nn.Linear(5, 1), torch.nn.Linear(5, 1)
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

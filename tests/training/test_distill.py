import pytest
import torch

from recstack.training.distill import LambdaSchedule, soft_label_loss, student_loss, sync_loss


def test_lambda_schedule_warm_up():
    s = LambdaSchedule(lam=0.7, swap_step=100)
    assert [s(0), s(99), s(100), s(10_000)] == [0.0, 0.0, 0.7, 0.7]
    with pytest.raises(ValueError):
        LambdaSchedule(lam=1.5)


def test_teacher_gets_no_gradient_from_distillation():
    torch.manual_seed(0)
    ws, wt = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    x, y = torch.randn(32, 8), (torch.rand(32) < 0.3).float()
    s, t = x @ ws, x @ wt
    loss, _ = sync_loss(s, t, y, lam=0.5)
    loss.backward()
    # the teacher's gradient equals that of its own log-loss alone
    wt_only = wt.detach().clone().requires_grad_(True)
    torch.nn.functional.binary_cross_entropy_with_logits(x @ wt_only, y).backward()
    torch.testing.assert_close(wt.grad, wt_only.grad)


def test_student_loss_interpolates_hard_and_soft():
    s, t, y = torch.tensor([0.3, -1.0]), torch.tensor([2.0, -2.0]), torch.tensor([1.0, 0.0])
    hard = torch.nn.functional.binary_cross_entropy_with_logits(s, y)
    soft = soft_label_loss(s, torch.sigmoid(t))
    for lam in (0.0, 0.5, 1.0):
        got, parts = student_loss(s, y, t, lam)
        torch.testing.assert_close(got, (1 - lam) * hard + lam * soft)
    # the soft loss is minimised where the student matches the teacher
    s_opt = t.clone().requires_grad_(True)
    soft_label_loss(s_opt, torch.sigmoid(t)).backward()
    torch.testing.assert_close(s_opt.grad, torch.zeros(2), atol=1e-7, rtol=0)

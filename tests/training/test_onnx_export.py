import numpy as np
import torch

from recstack.training.onnx import export_onnx, parity


class _BN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x)).sum(-1)


def test_export_leaves_the_module_in_eval_mode_and_matches(tmp_path):
    torch.manual_seed(0)
    m = _BN()
    m.train()
    m(torch.randn(64, 3) * 3 + 1)  # move the running statistics away from their init
    x = {"x": np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)}
    export_onnx(m, x, tmp_path / "m.onnx", ["y"])
    assert not m.training and not m.bn.training  # eager inference after export must use running stats
    assert parity(m, tmp_path / "m.onnx", x) <= 1e-5

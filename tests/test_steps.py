"""The shared input-space steps."""

from __future__ import annotations

import pytest
import torch

from invsim.steps import l2_step, normalize_l2, project, sign_step


def test_normalize_l2_unit_norm_and_zero_safe():
    g = torch.randn(5, 3, 4, 4)
    g[2] = 0
    n = normalize_l2(g).flatten(1).norm(dim=1)
    assert torch.allclose(n[[0, 1, 3, 4]], torch.ones(4), atol=1e-6) and n[2] == 0


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_project_respects_ball_and_box(norm):
    center = torch.rand(6, 1, 5, 5)
    x = center + 3 * torch.randn(6, 1, 5, 5)
    p = project(x, center, eps=0.3, norm=norm)
    d = (p - center).flatten(1)
    size = d.norm(dim=1) if norm == "l2" else d.abs().max(dim=1).values
    assert torch.all(size <= 0.3 + 1e-6) and p.min() >= 0 and p.max() <= 1
    inside = center + 0.01 * normalize_l2(torch.randn_like(center))
    assert torch.allclose(project(inside.clamp(0, 1), center, eps=0.3, norm=norm),
                          inside.clamp(0, 1))  # fmt: skip


def test_steps():
    x = torch.zeros(1, 4)
    g = torch.tensor([[3.0, 0.0, -4.0, 0.0]])
    assert torch.allclose(l2_step(x, g, 0.5), torch.tensor([[0.3, 0.0, -0.4, 0.0]]))
    assert torch.equal(sign_step(x, g, 0.1), torch.tensor([[0.1, 0.0, -0.1, 0.0]]))
    with pytest.raises(ValueError, match="norm must be"):
        project(x, x, eps=1.0, norm="l1")

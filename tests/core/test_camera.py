from __future__ import annotations

import pytest
import torch

from hdm_core import PRESETS, XUT, position_map


def test_grid_cell_centres_and_long_side_span():
    pm = position_map(2, 4)  # wide: x spans [-1, 1], y spans [-1/2, 1/2]
    xs = pm.view(2, 4, 2)[0, :, 1]
    ys = pm.view(2, 4, 2)[:, 0, 0]
    torch.testing.assert_close(xs, torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    torch.testing.assert_close(ys, torch.tensor([-0.25, 0.25]))
    tall = position_map(4, 2).view(4, 2, 2)
    torch.testing.assert_close(tall[:, 0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))


@pytest.mark.parametrize(("dx", "dy"), [(0.25, 0.0), (0.0, -0.5), (1.5, 2.0)])
def test_pure_shift_moves_map_by_the_shift(dx, dy):
    base = position_map(6, 10)
    moved = position_map(6, 10, x_shift=dx, y_shift=dy)
    torch.testing.assert_close(moved - base, torch.tensor([dy, dx]).expand_as(base), atol=1e-6, rtol=0)


def test_zoom_divides_after_shift():
    base = position_map(4, 4)
    cam = position_map(4, 4, x_shift=0.2, y_shift=0.1, zoom=2.0)
    torch.testing.assert_close(cam, (base + torch.tensor([0.1, 0.2])) / 2.0)
    with pytest.raises(ValueError, match="zoom"):
        position_map(4, 4, zoom=0)


def test_pos_map_shape_is_checked():
    model = XUT(PRESETS["xut-debug"]).eval()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="pos_map"):
        model(x, torch.rand(1), None, pos_map=position_map(4, 4)[None])


def test_skip_source_mirrored_differs_from_last():
    torch.manual_seed(0)
    last = XUT(PRESETS["xut-debug"]).eval()
    with torch.no_grad():
        for p in last.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mirrored = XUT(PRESETS["xut-debug"].replace(skip_source="mirrored")).eval()
    mirrored.load_state_dict(last.state_dict())  # same weights, only the wiring differs
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 3, 64)
    with torch.no_grad():
        assert (last(x, t, ctx) - mirrored(x, t, ctx)).abs().max() > 1e-4

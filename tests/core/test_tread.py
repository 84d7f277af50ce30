from __future__ import annotations

import torch

from hdm_core import PRESETS, XUT
from hdm_core.tread import gather_tokens, kept_image_tokens, make_route, scatter_tokens


def test_route_is_sorted_subset_of_right_size_and_keeps_text():
    n_img, n_txt, rate = 48, 5, 0.5
    route = make_route(3, n_img, n_txt, rate, device=torch.device("cpu"))
    keep = route.keep
    assert keep.shape == (3, kept_image_tokens(n_img, rate) + n_txt)
    assert kept_image_tokens(n_img, rate) == 24
    for row in keep:
        img, txt = row[:-n_txt], row[-n_txt:]
        assert torch.equal(txt, torch.arange(n_img, n_img + n_txt))
        assert torch.all(img < n_img) and torch.all(img[1:] > img[:-1])  # unique, in original order
    assert not torch.equal(keep[0], keep[1]) or not torch.equal(keep[1], keep[2])  # fresh per sample


def test_rate_rounding_matches_reference_rule():
    assert kept_image_tokens(10, 0.25) == 10 - int(2.5)
    assert kept_image_tokens(7, 0.9) == 1


def test_gather_scatter_round_trip():
    x = torch.randn(2, 10, 4)
    route = make_route(2, 8, 2, 0.5, device=torch.device("cpu"))
    routed = gather_tokens(x, route)
    back = scatter_tokens(torch.zeros_like(x), routed, route)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask.scatter_(1, route.keep, True)
    assert torch.equal(back[mask], x[mask])
    assert torch.all(back[~mask] == 0)


def test_per_sample_generators_make_routing_batch_independent():
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    both = make_route(2, 16, 0, 0.5, device=torch.device("cpu"), generators=gens())
    alone = make_route(1, 16, 0, 0.5, device=torch.device("cpu"), generators=gens()[1:])
    assert torch.equal(both.keep[1], alone.keep[0])


def _model():
    torch.manual_seed(0)
    model = XUT(PRESETS["xut-debug"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, 3, 64, generator=g),
    )


def test_rate_zero_equals_no_routing_in_eval():
    model = _model().eval()
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = model(x, t, ctx)
        torch.testing.assert_close(model(x, t, ctx, tread_rate=0.0), ref, atol=0, rtol=0)
        torch.testing.assert_close(model(x, t, ctx, tread_rate=None), ref, atol=0, rtol=0)
        routed = model(x, t, ctx, tread_rate=0.5)
    assert (routed - ref).abs().max() > 1e-4  # routing really changes the computation


def test_training_mode_routes_by_default_and_gradients_flow():
    model = _model().train()
    x, t, ctx = _inputs()
    torch.manual_seed(1)
    a = model(x, t, ctx)
    torch.manual_seed(2)
    b = model(x, t, ctx)
    assert (a - b).abs().max() > 1e-5  # different random subsets
    a.square().mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone.") or name.startswith("prev_tread") or name.startswith("ctx_proj"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_same_gradients():
    x, t, ctx = _inputs()
    grads = []
    for ckpt in (False, True):
        model = _model().train()
        model.set_gradient_checkpointing(ckpt)
        torch.manual_seed(3)
        model(x, t, ctx, tread_rate=0.5).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)

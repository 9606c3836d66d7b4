"""Randomised shapes and options: every kernel backend against the reference, in float64."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from .helpers import KERNEL_BACKENDS, run


@st.composite
def problems(draw):
    c = draw(st.sampled_from([1, 2, 3, 7, 16, 33, 257]))
    # Spatial maps up to a few pixel blocks (64 per native block, 16-256 per Triton program).
    spatial = draw(st.sampled_from([(), (), (3,), (2, 3), (70,), (5, 13)]))
    n = draw(st.integers(1, 40 if len(spatial) == 0 or spatial[-1] <= 3 else 3))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, *spatial), generator=gen, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 30.0]))
    if draw(st.booleans()):  # duplicated rows make exact ties
        x[1::2] = x[0]
    layout = draw(st.sampled_from(["contiguous", "strided"])) if spatial else "contiguous"
    if layout == "strided":  # every other element of a wider map: no dense layout to read
        wide = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    elif len(spatial) == 2 and draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, c, (n, *spatial), generator=gen)
    ignore_index = draw(st.sampled_from([-100, 0]))
    drop = torch.rand(t.shape, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    t = torch.where(drop, torch.full_like(t, ignore_index), t)
    weight = torch.rand(c, generator=gen, dtype=torch.float64) + 0.1 if draw(st.booleans()) else None
    kw = dict(
        keep=draw(st.sampled_from(["hardest", "easiest"])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.2])),
        ignore_index=ignore_index,
        weight=weight,
    )
    ratio = draw(st.one_of(st.floats(1e-3, 1.0), st.sampled_from([1.0, 0.5])))
    return x, t, ratio, kw


@given(problem=problems(), backend=st.sampled_from(KERNEL_BACKENDS))
def test_backends_match_reference(problem, backend):
    x, t, ratio, kw = problem
    out, info, grad = run(backend, x, t, ratio, **kw)
    ref_out, ref_info, ref_grad = run("reference", x, t, ratio, **kw)
    assert torch.equal(info.kept, ref_info.kept)
    assert int(info.k) == int(ref_info.k)
    tol = dict(rtol=1e-9, atol=1e-11, equal_nan=True)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)
    torch.testing.assert_close(info.losses, ref_info.losses, **tol)
    torch.testing.assert_close(info.threshold, ref_info.threshold, **tol)
    assert torch.all(grad.movedim(1, -1)[~info.kept] == 0)

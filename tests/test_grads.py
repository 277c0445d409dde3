"""The global gradient norm of plain (DDP/single) gradients: as exact as float64's to fp32's accuracy, the same
wherever the gradients lie in memory, and the clipping torch's clip_grad_norm_ does, on gradients shaped like
MiniLM's (a sparse-rowed embedding, small biases)."""

from __future__ import annotations

import torch

from distrain.trainer.parallel.grads import clip_grad_norm, sum_of_squares

SHAPES = [(8192, 384), (384, 384), (1536, 384), (384, 1536)] + [(384,)] * 10  # a slice of MiniLM: 4.5M values


def parameters_with_gradients(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(SHAPES):
        param = torch.nn.Parameter(torch.zeros(shape))
        scale = 10.0 ** (-4 * torch.rand((), generator=generator).item())  # magnitudes from 1e-4 to 1
        param.grad = torch.randn(shape, generator=generator) * scale
        if i == 0:
            param.grad[1000:] = 0  # an embedding's gradient: only the rows of the batch's tokens
        params.append(param)
    return params


def test_the_gradient_norm_is_float64s_to_fp32_accuracy_and_clips_as_torch_does():
    ours, theirs = parameters_with_gradients(0), parameters_with_gradients(0)
    exact = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ours))
    norm = clip_grad_norm(ours, max_norm=1.0)
    # fp32 sums of 4.5M squares: torch's norm kernel is 1.3e-6 away here (BLAS's dot was 4e-7, but see below)
    assert abs(norm.double() - exact) / exact < 3e-6, (norm.item(), exact.item())
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0)
    assert abs(norm - torch_norm) / torch_norm < 1e-5
    for mine, torch_clipped in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.grad, torch_clipped.grad, rtol=1e-5, atol=0)
    clipped = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ours))
    assert abs(clipped - 1.0) < 1e-5  # clipped to max_norm


def test_the_gradient_norm_does_not_depend_on_where_the_gradients_lie_in_memory():
    """DDP's gradients are views into its buckets, at other offsets on the first step after a restart: a norm that
    rounded by address (BLAS's dot: 3 results over 16 offsets of one gradient) made a resumed run's clipping and
    weights drift from the uninterrupted run's."""
    for grad in (param.grad for param in parameters_with_gradients(2)):
        squares = set()
        for offset in range(16):
            view = torch.empty(grad.numel() + offset)[offset:].view(grad.shape)
            view.copy_(grad)
            squares.add(sum_of_squares(view).item())
        assert len(squares) == 1, (grad.shape, squares)


def test_clipping_only_the_rows_a_gradient_has_gives_the_dense_result_bit_for_bit():
    """DDP's word embedding (parallel/comm.py) tells the clipping which rows its gradient has: scaling those alone
    leaves every gradient as scaling all of it does, and the norm is unchanged."""
    dense, by_rows = parameters_with_gradients(1), parameters_with_gradients(1)
    embedding = by_rows[0]
    rows = embedding.grad.ne(0).any(dim=1).nonzero().squeeze(1)
    assert len(rows) == 1000
    norm = clip_grad_norm(dense, max_norm=0.5)
    assert torch.equal(clip_grad_norm(by_rows, max_norm=0.5, rows={embedding: rows}), norm)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(dense, by_rows, strict=True))
    assert embedding.grad[1000:].eq(0).all() and norm > 0.5  # it clipped, and the other rows stayed zero

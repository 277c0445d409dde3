"""The global gradient norm of plain (DDP/single) gradients: as exact as float64's to fp32's accuracy, and the
clipping torch's clip_grad_norm_ does, on gradients shaped like MiniLM's (a sparse-rowed embedding, small biases)."""

from __future__ import annotations

import torch

from distrain.trainer.parallel.grads import clip_grad_norm

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
    assert abs(norm.double() - exact) / exact < 1e-6, (norm.item(), exact.item())
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0)
    assert abs(norm - torch_norm) / torch_norm < 1e-5
    for mine, torch_clipped in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.grad, torch_clipped.grad, rtol=1e-5, atol=0)
    clipped = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ours))
    assert abs(clipped - 1.0) < 1e-5  # clipped to max_norm

"""The window's backward pass with activation checkpointing (`ratbptt.window_segments` > 1).

The plain path keeps the graph of all W differentiable inner steps alive until the meta-loss is back-propagated:
memory grows with W. Here the window runs forward without a graph, keeping only the inner state (parameters,
optimizer buffers and step count, and the generator's state) at the start of each of k segments. The backward
then walks the segments from the last: it rebuilds one segment's graph from its saved start, exactly as the plain
path builds it, and turns the adjoint at the segment's end into the adjoint at its start (plus the segment's share
of the synthetic set's gradient). Memory: about W/k steps of graph plus k saved states; time: about one more
forward of the window. The random draws repeat exactly, so the gradient is the plain path's (up to float
rounding order).

This module knows nothing of networks or data: the caller passes one inner step and the meta-loss (with its
gradient at the final parameters) as functions that draw their randomness from `rng`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from raydistill.methods.ratbptt.inner_opt import InnerState

# step(params, state, create_graph) -> (params, state): one inner step on the synthetic set, drawing from rng
Step = Callable[[list[Tensor], InnerState, bool], tuple[list[Tensor], InnerState]]
# meta_loss(final) -> (meta-loss, its gradient with respect to `final`): the window's final parameters, as detached
# leaves that require grad, drawing from rng
MetaLoss = Callable[[list[Tensor]], tuple[Tensor, list[Tensor]]]


def segment_lengths(window: int, segments: int) -> list[int]:
    """Near-equal segment lengths summing to `window`; more segments than steps are clamped to one step each
    (a random_length window can be shorter than an unvalidated config's segment count)."""
    k = max(1, min(segments, window))
    return [window // k + (1 if i < window % k else 0) for i in range(k)]


def _flat(state: InnerState) -> list[Tensor]:
    return [b for group in state.buffers for b in group]


def _leaf_state(params: list[Tensor], state: InnerState, requires_grad: bool) -> tuple[list[Tensor], InnerState]:
    """Fresh leaves for a segment start. Parameters always require grad (the inner step differentiates the loss
    with respect to them); buffers only when their adjoint is wanted, so the window start stays a constant."""
    params = [p.detach().requires_grad_(True) for p in params]
    buffers = [[b.detach().requires_grad_(requires_grad) for b in group] for group in state.buffers]
    return params, InnerState(state.step, buffers)


def checkpointed_window_gradient(
    step: Step,
    meta_loss: MetaLoss,
    params: list[Tensor],
    state: InnerState,
    lengths: list[int],
    leaves: list[Tensor],
    rng: torch.Generator,
) -> tuple[Tensor, list[Tensor]]:
    """(meta-loss, its gradient with respect to `leaves`) for a window of sum(lengths) steps from (params, state),
    recomputed segment by segment (`lengths`: each segment's steps, as `segment_lengths` splits the window).

    (params, state) is the window start, held constant as in the plain path: no gradient reaches the prefix.
    `rng` is left where the plain path leaves it: after the window's draws and the meta-loss's.
    """
    saved = []  # per segment: its start (params, state) and the generator's state there
    for n in lengths:
        saved.append(([p.detach() for p in params], state.detached(), rng.get_state()))
        for _ in range(n):
            params, state = step(params, state, False)

    final = [p.detach().requires_grad_(True) for p in params]
    loss, d_final = meta_loss(final)  # the meta-loss reads the leaves through the final parameters only
    adjoints: list[Tensor | None] = list(d_final) + [None] * len(_flat(state))  # buffers: unread
    totals: list[Tensor | None] = [None] * len(leaves)
    after_meta_loss = rng.get_state()

    for i in reversed(range(len(lengths))):
        start_params, start_state, rng_state = saved[i]
        rng.set_state(rng_state)
        p0, s0 = _leaf_state(start_params, start_state, requires_grad=i > 0)
        p, s = p0, s0
        for _ in range(lengths[i]):
            p, s = step(p, s, True)
        pairs = [(o, a) for o, a in zip(p + _flat(s), adjoints) if a is not None and o.requires_grad]
        starts = p0 + _flat(s0) if i > 0 else []  # the window start needs no adjoint
        grads = torch.autograd.grad(
            [o for o, _ in pairs], starts + leaves, grad_outputs=[a for _, a in pairs], allow_unused=True
        )
        adjoints = list(grads[: len(starts)])
        for j, g in enumerate(grads[len(starts):]):
            if g is not None:
                totals[j] = g if totals[j] is None else totals[j] + g
        del p, s, pairs, grads  # free this segment's graph before the next one is built

    rng.set_state(after_meta_loss)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(totals, leaves)]

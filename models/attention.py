"""Causal attention for small head dims, computed in cache-sized chunks of (batch x head) rows.

At head_dim 2 the (b h, t, t) scores and probabilities are hundreds of times larger than q, k and v.
`chunked_causal_attention` computes scores, mask, softmax and the product with v for a few (b h)
rows at a time, so each chunk's temporaries stay in cache, and never materializes the scores of the
whole batch. For the backward pass it keeps the probabilities while they total at most
SAVED_PROBS_BYTES. Above that it keeps only q, k, v and the output, and backward recomputes
the probabilities chunk by chunk, as FlashAttention does but with plain torch ops on whole chunks.

The kept probabilities go into one (b h, t, t) buffer that the caller may pass back through
`workspace` once backward is done with it. Allocating it afresh made each step slower: glibc maps
large allocations anew and returns freed heap memory, so every step paid page faults on new pages
(a quarter of the step at d_model 4, batch 256, 1 thread).

q, k and v are passed channel-first, (b h, e, t): the CPU batched-matmul kernels run about 4x
faster when the size-e operand of a (t, t) x (t, e) product is laid out this way (measured with
torch 2.13 on an AMD EPYC at e = 2), and every product below is arranged to use it.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# Target size of one (chunk, t, t) score tensor, about one per-core L2 cache. Forward and backward keep
# two or three live. Of 128 KiB to 4 MiB, 1 MiB gave the fastest full training steps at d_model 4 and
# 64 on a 2-core AMD EPYC (1 MiB L2 per core): smaller chunks lose to per-op overhead.
# NOTE: measured on that one machine only, so other cache sizes may prefer another budget.
SCORE_CHUNK_BYTES = 1024 * 1024

# Maximum bytes of probabilities one call keeps for backward. Reading them back costs far less than
# recomputing them: at head_dim 2 the exp in the softmax, not the products, dominates attention.
# torch.exp took about 0.8 ns per float32 and a copy 0.09 ns (1 thread, AMD EPYC).
SAVED_PROBS_BYTES = 256 * 1024 * 1024


def attention_chunk_rows(t: int, element_size: int) -> int:
    """Return how many (b h) rows of (t, t) scores fit in SCORE_CHUNK_BYTES, at least one."""
    return max(1, SCORE_CHUNK_BYTES // (t * t * element_size))


class _ChunkedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_t, k_t, v_t, mask, scale, chunk_rows, save_probs, workspace):
        # q_t, k_t, v_t: (n, e, t) with n = b h; mask: (t, t) additive, 0 or -inf; scale: float.
        n, _, t = q_t.shape
        y_t = torch.empty_like(v_t)  # (n, e, t)
        all_probs = _take_buffer(workspace, (n, t, t), q_t) if save_probs else None  # (n, t, t)
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            out = None if all_probs is None else all_probs[rows]
            probs = _chunk_probs(q_t[rows], k_t[rows], mask, scale, out)  # (c, t, t)
            torch.bmm(v_t[rows], probs.transpose(1, 2), out=y_t[rows])  # y^T = v^T P^T, (c, e, t)

        ctx.save_for_backward(q_t, k_t, v_t, mask, y_t, all_probs)
        ctx.scale = scale
        ctx.chunk_rows = chunk_rows
        ctx.workspace = workspace
        return y_t

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_t):
        q_t, k_t, v_t, mask, y_t, all_probs = ctx.saved_tensors
        scale, chunk_rows = ctx.scale, ctx.chunk_rows
        grad_y_t = grad_y_t.contiguous()
        # Softmax backward is dS = P * (dP - D) with D_i = sum_j P_ij dP_ij = dy_i . y_i, so the
        # row sums come from the small (n, e, t) tensors instead of another pass over each chunk.
        row_dot = (grad_y_t * y_t).sum(1, keepdim=True).transpose(1, 2)  # (n, t, 1)

        grad_q_t = torch.empty_like(q_t)
        grad_k_t = torch.empty_like(k_t)
        grad_v_t = torch.empty_like(v_t)
        for start in range(0, q_t.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            if all_probs is None:
                probs = _chunk_probs(q_t[rows], k_t[rows], mask, scale)  # (c, t, t), recomputed
            else:
                probs = all_probs[rows]
            torch.bmm(grad_y_t[rows], probs, out=grad_v_t[rows])  # dv^T = dy^T P
            grad_scores = torch.bmm(grad_y_t[rows].transpose(1, 2), v_t[rows])  # dP = dy v^T
            grad_scores.sub_(row_dot[rows]).mul_(probs)  # dS = P * (dP - D), still without scale
            torch.bmm(k_t[rows], grad_scores.transpose(1, 2), out=grad_q_t[rows])  # dq^T = k^T dS^T
            torch.bmm(q_t[rows], grad_scores, out=grad_k_t[rows])  # dk^T = q^T dS

        if all_probs is not None and ctx.workspace is not None:
            # The next forward may overwrite the buffer. A graph kept with retain_graph that is run
            # again after that fails autograd's in-place check instead of reading stale values.
            ctx.workspace.append(all_probs)
        return grad_q_t.mul_(scale), grad_k_t.mul_(scale), grad_v_t, None, None, None, None, None


def _take_buffer(
    workspace: list[torch.Tensor] | None, shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor:
    """Return a buffer of shape, dtype and device as `like`: one popped from workspace, or a new one.

    Buffers popped on the way that do not match are dropped, so a workspace does not grow when the
    batch shape changes.
    """
    while workspace:
        buffer = workspace.pop()
        if buffer.shape == shape and buffer.dtype == like.dtype and buffer.device == like.device:
            return buffer
    return like.new_empty(shape)


def _chunk_probs(
    q_t: torch.Tensor, k_t: torch.Tensor, mask: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Return softmax(scale * q k^T + mask) of shape (c, t, t) for channel-first q_t, k_t (c, e, t).

    The probabilities are written into `out` (c, t, t) when it is given.
    """
    scores = torch.baddbmm(mask, q_t.transpose(1, 2), k_t, alpha=scale)  # (c, t, t)
    return torch.softmax(scores, dim=-1, out=out)


def chunked_causal_attention(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    chunk_rows: int | None = None,
    workspace: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Return softmax(scale * q k^T + mask) v, channel-first: (n, e, t) for q_t, k_t, v_t (n, e, t).

    `mask` is the (t, t) additive causal mask in the dtype of q. `chunk_rows` defaults to the number
    of rows whose scores fit in SCORE_CHUNK_BYTES. Every row must have at least one finite mask
    entry, as causal masks do, or its softmax is NaN. `workspace`, a list owned by the caller, lends
    the probability buffer: forward takes a matching one from it, and backward puts it back.
    """
    if chunk_rows is None:
        chunk_rows = attention_chunk_rows(q_t.shape[-1], q_t.element_size())
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q_t, k_t, v_t))
    n, _, t = q_t.shape
    save_probs = needs_grad and n * t * t * q_t.element_size() <= SAVED_PROBS_BYTES
    return _ChunkedCausalAttention.apply(q_t, k_t, v_t, mask, scale, chunk_rows, save_probs, workspace)

"""The gated linear recurrence h[t] = f[t] * h[t-1] + u[t] (elementwise), shared by the HGRN token
mixer and H-Net's EMA dechunking.

A Python loop that slices tensors under autograd costs O(T^2) in backward (every slice's gradient
is a full-size tensor). `linear_scan` is a custom autograd function instead: a loop forward, and
a reverse loop backward using g[t] = dh[t] + f[t+1] * g[t+1], du[t] = g[t], df[t] = g[t] * h[t-1].
Exact, O(T) time, and it stores only h.
"""

from __future__ import annotations

import torch


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: torch.Tensor, u: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        h = torch.empty_like(u)
        prev = h0
        for t, (f_t, u_t) in enumerate(zip(f.unbind(1), u.unbind(1))):
            prev = torch.addcmul(u_t, f_t, prev)
            h[:, t] = prev
        ctx.save_for_backward(f, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        f, h, h0 = ctx.saved_tensors
        T = f.shape[1]
        grad_u = torch.empty_like(grad_h)
        carry = torch.zeros_like(h0)  # f[t+1] * g[t+1]
        for t in range(T - 1, -1, -1):
            g_t = grad_h[:, t] + carry
            grad_u[:, t] = g_t
            carry = f[:, t] * g_t
        h_prev = torch.cat([h0[:, None], h[:, :-1]], dim=1)
        grad_f = grad_u * h_prev
        return grad_f, grad_u, carry  # carry is now f[0] * g[0] = dL/dh0


def linear_scan(f: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """h (B, T, D) for gates f and inputs u of shape (B, T, D); h0 (B, D) is the state before t = 0
    (zeros by default). Computed and returned in fp32 whatever the input dtype (the recurrence
    accumulates; callers cast)."""
    if f.shape != u.shape or f.dim() != 3:
        raise ValueError(f"linear_scan expects f and u of the same shape (B, T, D), got {tuple(f.shape)} and {tuple(u.shape)}")
    if h0 is None:
        h0 = u.new_zeros(u.shape[0], u.shape[2], dtype=torch.float32)
    return _LinearScan.apply(f.float(), u.float(), h0.float())


def naive_linear_scan(f: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the same recurrence as a plain autograd loop (O(T^2) backward; tests and benchmarks only)."""
    prev = torch.zeros_like(u[:, 0]) if h0 is None else h0
    out = []
    for t in range(u.shape[1]):
        prev = f[:, t] * prev + u[:, t]
        out.append(prev)
    return torch.stack(out, dim=1)

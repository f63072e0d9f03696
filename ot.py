"""Batched, masked, log-domain Sinkhorn for the Wasserstein loss of AI-STA (paper eq. 1, 3 and 6).

Copy this file into other work: it imports nothing but torch.

Problem (paper eq. 1). For point clouds x_1..x_n and y_1..y_m in R^d with uniform masses a_i = 1/n and
b_j = 1/m over the *valid* positions (padding carries no mass),

    W(x, y) = min_{P >= 0, P 1 = a, P^T 1 = b}  <P, C>,      C_ij = |x_i - y_j|^2.

Entropic OT replaces the linear program by  OT_eps = min_P <P, C> + eps KL(P | a b^T),  whose solution is
P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps) for the dual potentials (f, g) of the Sinkhorn fixed point,
computed in the log domain so that nothing under- or overflows:

    f_i <- -eps * logsumexp_j( log b_j + (g_j - C_ij) / eps )        (rows of P sum to a)
    g_j <- -eps * logsumexp_i( log a_i + (f_i - C_ij) / eps )        (columns of P sum to b)

Value. `wasserstein` returns <P, C>, the transport cost of the entropic plan: the estimate of W in eq. 1
(within a few percent of the exact linear program at the defaults; the tests check against POT's
`ot.emd2`). It is averaged over the two half-step plans (P_row after an f-update has exact row sums,
P_col after a g-update exact column sums), which cancels most of the error of a not fully converged plan.
With debias=True it returns the Sinkhorn divergence S = OT_eps(x,y) - OT_eps(x,x)/2 - OT_eps(y,y)/2.

Gradient (envelope theorem / Danskin): at the fixed point dOT_eps/dC = P, which is also the gradient of
the linear program at its optimal plan. With the plan held fixed,

    dW/dx_i = 2 sum_j P_row,ij (x_i - y_j),        dW/dy_j = 2 sum_i P_col,ij (y_j - x_i),

each side taking the plan whose marginal on that side is exact. Nothing is back-propagated through the
iterations: backward is one (B, n, m) x (B, m, d) product per side, and memory does not grow with n_iters.

Relative epsilon. `eps` is dimensionless: each problem uses eps_abs = eps * scale(C), with

    scale(C) = std(C) + 1e-3 * mean(C)        (over the valid entries of that problem's cost),

so one default fits the LLM's embedding layer (norms ~1) and deep layers (norms ~1e3 - 1e4) alike, and
W(c x, c y) = c^2 W(x, y) exactly. The standard deviation measures how much the costs of different
pairings differ, which is what the plan has to resolve; the small mean term keeps eps positive when all
costs are equal (n = m = 1). Like any hyperparameter, eps_abs is held fixed when differentiating.

Iterations. eps-scaling: eps starts at max(C) (the plan is then nearly a b^T) and decays geometrically to
eps_abs over the first `anneal` fraction of the iterations (as GeomLoss and Schmitzer 2019 do); the rest
run at eps_abs with over-relaxation (f <- (1 - w) f + w T(g), w = 1.9; Thibault et al. 2017), the last one
plain so that the marginals are exact. The count is a Python int and the loop has no data-dependent
branch: no host-device synchronisation, so any batch runs at full speed and the loop can be captured in a
CUDA graph. `tol` adds an optional early stop (it synchronises every 10 iterations).

Precision. Inputs may be bf16, fp16, fp32 or fp64; the solver works in fp32 (fp64 for fp64 inputs):
  * the cost: both sets are centred on their common mean (C is translation invariant) so that
    |x|^2 + |y|^2 - 2 x.y involves only the spread of the data, then clamped at 0. Evaluated in bf16
    with d = 1024, that expansion is off by whole units -- as much as the distances between neighbouring
    frames -- hence fp32. (With TF32 matmuls enabled on a GPU, centring keeps the error at the scale of the
    spread rather than of the much larger norms.)
  * the iterations: potentials are as large as the costs while log-sum-exp needs their differences to a
    fraction of eps; bf16's 8 significant bits would lose them. The loop only touches (B, n, m) tensors,
    which is small next to an LLM forward.
  * padded positions are zeroed before use, so NaN or huge garbage there never reaches valid entries.
  * the loss is returned in fp32 (fp64 for fp64 inputs); gradients come back in the input dtype. With
    C / eps_abs ~ 1e4 at the default eps, fp32 rounding moves the value by ~1e-4 relative: use fp64
    inputs for finite-difference checks.
"""
from typing import NamedTuple, Optional

import torch

__all__ = ["wasserstein", "pairwise_wasserstein", "sinkhorn", "cost_matrix", "SinkhornResult"]

EPS = 1e-3         # relative epsilon (module docstring)
N_ITERS = 150      # total iterations
ANNEAL = 0.15      # fraction of the iterations spent decaying eps from max(C) to EPS * scale(C)
OMEGA = 1.9        # over-relaxation after annealing (1.95 already oscillates on some problems)
MEAN_WEIGHT = 1e-3  # weight of mean(C) in scale(C)


class SinkhornResult(NamedTuple):
    f: torch.Tensor          # (B, n) potential of x after the last f-update given g (rows exact); 0 on padding
    g: torch.Tensor          # (B, m) potential of y; 0 on padding
    log_plan_row: torch.Tensor  # (B, n, m) log P from (f, g): exact row sums a; -inf on padding
    log_plan_col: torch.Tensor  # (B, n, m) log P from (f_prev, g): exact column sums b; -inf on padding
    eps: torch.Tensor        # (B,) absolute epsilon of the last iteration


def _work_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _full_masks(x, y, x_mask, y_mask):
    x_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if x_mask is None else x_mask.bool()
    y_mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device) if y_mask is None else y_mask.bool()
    if x_mask.shape != x.shape[:2] or y_mask.shape != y.shape[:2]:
        raise ValueError(f"mask shapes {tuple(x_mask.shape)} and {tuple(y_mask.shape)} do not match "
                         f"x {tuple(x.shape)} and y {tuple(y.shape)}")
    return x_mask, y_mask


def _check_nonempty(mask, name):
    """Every problem needs mass on both sides (one host sync, outside the solver loop)."""
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise ValueError(f"{name} has no valid position in batch index {empty[0]}{more}: "
                         "every problem needs at least one valid point on each side")


def _centre(x, y, x_mask, y_mask, dims):
    """Zero the padding and subtract the mean of the valid points of x and y together, taken over `dims`
    ((1,): per problem; (0, 1): over everything), in the work dtype."""
    dt = _work_dtype(x, y)
    xm, ym = x_mask.unsqueeze(-1).to(dt), y_mask.unsqueeze(-1).to(dt)
    x = torch.where(xm > 0, x.to(dt), 0.0)
    y = torch.where(ym > 0, y.to(dt), 0.0)
    count = xm.sum(dims, keepdim=True) + ym.sum(dims, keepdim=True)
    centre = (x.sum(dims, keepdim=True) + y.sum(dims, keepdim=True)) / count.clamp(min=1)
    return (x - centre) * xm, (y - centre) * ym


def cost_matrix(x, y, x_mask=None, y_mask=None):
    """C_ij = |x_i - y_j|^2 for x (B, n, d), y (B, m, d) -> (B, n, m), fp32 (fp64 for fp64 inputs).

    Padding is zeroed, both sets are centred on the mean of their valid points, C is expanded as
    |x|^2 + |y|^2 - 2 x.y and clamped at 0 (module docstring, "Precision"). Entries that involve padding
    are meaningless; the solver gives them no mass.
    """
    return _centred_cost(x, y, *_full_masks(x, y, x_mask, y_mask))[2]


def _centred_cost(x, y, x_mask, y_mask):
    """(centred x, centred y, C) for full masks; see cost_matrix."""
    x, y = _centre(x, y, x_mask, y_mask, dims=(1,))
    cost = (x * x).sum(-1, keepdim=True) + (y * y).sum(-1).unsqueeze(1) - 2.0 * x @ y.transpose(1, 2)
    return x, y, cost.clamp(min=0.0)


def _scale(cost, valid):
    """scale(C) = std(C) + 1e-3 mean(C) and max(C) over the valid entries, per problem -> (B,), (B,)."""
    count = valid.sum((1, 2)).clamp(min=1)
    mean = cost.sum((1, 2)) / count                        # cost is already 0 off the valid entries
    var = (torch.where(valid, cost - mean[:, None, None], 0.0) ** 2).sum((1, 2)) / count
    return var.sqrt() + MEAN_WEIGHT * mean, cost.amax((1, 2))


def _logsumexp(z, dim):
    """log sum_dim exp(z), keepdim. Terms more than 80 (fp64: 700) below the maximum are raised to that
    floor before exp(): they add less than e^-80 relative to the largest term either way, and on CPUs
    exp() of very negative numbers takes a slow underflow path (measured 20-60x slower)."""
    top = z.amax(dim, keepdim=True)
    floor = 700.0 if z.dtype == torch.float64 else 80.0
    return top + (z - top).clamp_(min=-floor).exp_().sum(dim, keepdim=True).log_()


@torch.no_grad()
def sinkhorn(cost: torch.Tensor, x_mask: Optional[torch.Tensor] = None, y_mask: Optional[torch.Tensor] = None,
             *, eps: float = EPS, n_iters: int = N_ITERS, anneal: float = ANNEAL, omega: float = OMEGA,
             tol: Optional[float] = None) -> SinkhornResult:
    """Log-domain Sinkhorn on a batch of cost matrices with padding masks (no gradient).

    cost (B, n, m); x_mask (B, n), y_mask (B, m) bool, True = valid (None = all valid). Masses are uniform
    on the valid positions: a_i = 1/n_b, b_j = 1/m_b. eps is relative: eps_abs = eps * scale(C) per
    problem. The first round(anneal * n_iters) iterations decay eps geometrically from max(C) to eps_abs;
    the others run at eps_abs, over-relaxed by omega except the last. tol: optional early stop once the
    L1 error of the column sums of P_row is below tol for every problem (checked every 10 iterations).

    Returns SinkhornResult(f, g, log_plan_row, log_plan_col, eps) where
        log P_ij = log a_i + log b_j + (f_i + g_j - C_ij) / eps.
    Differentiate through the plan with `wasserstein` (envelope theorem), not through this loop.
    Raises ValueError naming the batch index if a problem has no valid position on one side.
    """
    if cost.dim() != 3:
        raise ValueError(f"cost must be (B, n, m), got shape {tuple(cost.shape)}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    B, n, m = cost.shape
    dt = _work_dtype(cost)
    x_mask = torch.ones(B, n, dtype=torch.bool, device=cost.device) if x_mask is None else x_mask.bool()
    y_mask = torch.ones(B, m, dtype=torch.bool, device=cost.device) if y_mask is None else y_mask.bool()
    _check_nonempty(x_mask, "x_mask")
    _check_nonempty(y_mask, "y_mask")
    valid = x_mask[:, :, None] & y_mask[:, None, :]
    cost = torch.where(valid, cost.to(dt), 0.0)           # garbage on padding must not become NaN * 0

    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=cost.device)
    log_a = torch.where(x_mask, -x_mask.sum(1, keepdim=True).to(dt).log(), neg_inf)[:, :, None]  # (B, n, 1)
    log_b = torch.where(y_mask, -y_mask.sum(1, keepdim=True).to(dt).log(), neg_inf)[:, None, :]  # (B, 1, m)

    scale, cmax = _scale(cost, valid)
    eps_end = (eps * scale).clamp(min=torch.finfo(dt).tiny)[:, None, None]        # (B, 1, 1)
    eps_start = torch.maximum(cmax[:, None, None], eps_end)
    n_anneal = max(1, min(n_iters, round(anneal * n_iters)))
    log_ratio = (eps_end / eps_start).log()

    # Potentials are kept in cost units; ce = C / eps is recomputed only while eps changes (annealing).
    def f_update(g, e, ce):   # exact row sums
        return torch.where(x_mask[:, :, None], -e * _logsumexp((log_b + g / e) - ce, dim=2), 0.0)

    def g_update(f, e, ce):   # exact column sums
        return torch.where(y_mask[:, None, :], -e * _logsumexp((log_a + f / e) - ce, dim=1), 0.0)

    f = torch.zeros(B, n, 1, dtype=dt, device=cost.device)
    g = torch.zeros(B, 1, m, dtype=dt, device=cost.device)
    for k in range(n_iters):
        if k < n_anneal:
            e = eps_start * (log_ratio * min(1.0, k / max(1, n_anneal - 1))).exp()
            ce = cost / e
        w = omega if n_anneal <= k < n_iters - 1 else 1.0
        f = (1 - w) * f + w * f_update(g, e, ce) if w != 1.0 else f_update(g, e, ce)
        g = (1 - w) * g + w * g_update(f, e, ce) if w != 1.0 else g_update(f, e, ce)
        if tol is not None and k >= n_anneal and (k - n_anneal) % 10 == 9:
            col_err = (torch.logsumexp(log_a + log_b + (f_update(g, e, ce) + g) / e - ce, dim=1).exp()
                       - log_b.squeeze(1).exp()).abs().sum(1)
            if bool((col_err < tol).all()):
                break
    f_row = f_update(g, e, ce)
    log_plan_col = log_a + log_b + (f + g - cost) / e
    log_plan_row = log_a + log_b + (f_row + g - cost) / e
    return SinkhornResult(f_row[:, :, 0], g[:, 0, :], log_plan_row, log_plan_col, e[:, 0, 0])


def _plans_and_values(cost, x_mask, y_mask, eps, n_iters):
    """Solve, and return (P_row, P_col, <P, C> averaged over the two plans, OT_eps dual value)."""
    res = sinkhorn(cost, x_mask, y_mask, eps=eps, n_iters=n_iters)
    p_row, p_col = res.log_plan_row.exp(), res.log_plan_col.exp()   # exp(-inf) = 0 on padding
    primal = 0.5 * ((p_row * cost).sum((1, 2)) + (p_col * cost).sum((1, 2)))
    a = x_mask.to(cost.dtype) / x_mask.sum(1, keepdim=True)
    b = y_mask.to(cost.dtype) / y_mask.sum(1, keepdim=True)
    dual = (a * res.f).sum(1) + (b * res.g).sum(1)                  # OT_eps at the fixed point
    return p_row, p_col, primal, dual


class _Transport(torch.autograd.Function):
    """value(x, y) with the envelope gradient of the module docstring (the plan is held fixed)."""

    @staticmethod
    def forward(ctx, x, y, x_mask, y_mask, eps, n_iters, entropic):
        xc, yc, cost = _centred_cost(x.detach(), y.detach(), x_mask, y_mask)
        p_row, p_col, primal, dual = _plans_and_values(cost, x_mask, y_mask, eps, n_iters)
        ctx.save_for_backward(xc, yc, p_row, p_col)
        ctx.dtypes = (x.dtype, y.dtype)
        return dual if entropic else primal

    @staticmethod
    def backward(ctx, grad):
        xc, yc, p_row, p_col = ctx.saved_tensors
        grad = grad.to(xc.dtype)[:, None, None]
        gx = gy = None
        if ctx.needs_input_grad[0]:   # 2 sum_j P_ij (x_i - y_j), P with exact row sums
            gx = (2.0 * grad * (p_row.sum(2, keepdim=True) * xc - p_row @ yc)).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:   # 2 sum_i P_ij (y_j - x_i), P with exact column sums
            gy = (2.0 * grad * (p_col.sum(1).unsqueeze(-1) * yc - p_col.transpose(1, 2) @ xc)).to(ctx.dtypes[1])
        return gx, gy, None, None, None, None, None


def wasserstein(x: torch.Tensor, y: torch.Tensor, x_mask: Optional[torch.Tensor] = None,
                y_mask: Optional[torch.Tensor] = None, *, eps: float = EPS, n_iters: int = N_ITERS,
                debias: bool = False) -> torch.Tensor:
    """Wasserstein loss between batches of point clouds (paper eq. 1), differentiable in x and y.

    x (B, n, d), y (B, m, d) in any float dtype; x_mask (B, n), y_mask (B, m) bool, True = valid
    (None = all valid); padded positions may hold anything. Uniform mass on the valid positions.
    Returns (B,) in fp32 (fp64 for fp64 inputs):
        debias=False: <P, C>, the squared-Euclidean W of eq. 1 estimated by entropic OT;
        debias=True:  the Sinkhorn divergence OT_eps(x, y) - OT_eps(x, x)/2 - OT_eps(y, y)/2.
    eps is relative to each problem's cost scale (module docstring). The gradient is the envelope
    gradient 2 sum_j P_ij (x_i - y_j); memory does not grow with n_iters. Detach y to move x only
    (the paper's text side). Raises ValueError naming the batch index if a problem has no valid
    position on one side.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"expected x (B, n, d) and y (B, m, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    x_mask, y_mask = _full_masks(x, y, x_mask, y_mask)
    _check_nonempty(x_mask, "x_mask")
    _check_nonempty(y_mask, "y_mask")
    value = _Transport.apply(x, y, x_mask, y_mask, eps, n_iters, debias)
    if debias:
        value = value - 0.5 * _Transport.apply(x, x, x_mask, x_mask, eps, n_iters, True) \
                      - 0.5 * _Transport.apply(y, y, y_mask, y_mask, eps, n_iters, True)
    return value


@torch.no_grad()
def pairwise_wasserstein(x: torch.Tensor, y: torch.Tensor, x_mask: Optional[torch.Tensor] = None,
                         y_mask: Optional[torch.Tensor] = None, *, eps: float = EPS, n_iters: int = N_ITERS,
                         chunk_size: int = 4096) -> torch.Tensor:
    """All-pairs distances D_ij = W(x_i, y_j) for speech-to-text retrieval (paper eq. 3) -> (Nx, Ny).

    x (Nx, n, d), y (Ny, m, d), masks as in `wasserstein`. Blocks of at most `chunk_size` pairs are
    solved as one batch, so memory is O(chunk_size * n * m + (Nx n + Ny m) d), never O(Nx Ny n m); the
    cost of a block is one matrix product of the stacked points. All points are centred on one common
    mean first (hidden states of an LLM layer share a large common offset). No gradient.
    D_ij equals wasserstein(x[i:i+1], y[j:j+1]) up to rounding.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[2] != y.shape[2]:
        raise ValueError(f"expected x (Nx, n, d) and y (Ny, m, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    x_mask, y_mask = _full_masks(x, y, x_mask, y_mask)
    _check_nonempty(x_mask, "x_mask")
    _check_nonempty(y_mask, "y_mask")
    (Nx, n, d), (Ny, m, _) = x.shape, y.shape
    xc, yc = _centre(x, y, x_mask, y_mask, dims=(0, 1))
    x2, y2 = (xc * xc).sum(-1), (yc * yc).sum(-1)                          # (Nx, n), (Ny, m)
    out = torch.empty(Nx, Ny, dtype=xc.dtype, device=x.device)
    cj = max(1, min(Ny, chunk_size))
    ci = max(1, min(Nx, chunk_size // cj))
    for i in range(0, Nx, ci):
        for j in range(0, Ny, cj):
            a, b = min(ci, Nx - i), min(cj, Ny - j)
            dot = (xc[i:i + a].reshape(a * n, d) @ yc[j:j + b].reshape(b * m, d).T).view(a, n, b, m)
            cost = (x2[i:i + a, :, None, None] + y2[None, None, j:j + b, :] - 2.0 * dot).clamp(min=0.0)
            cost = cost.permute(0, 2, 1, 3).reshape(a * b, n, m)
            xm = x_mask[i:i + a, None, :].expand(a, b, n).reshape(a * b, n)
            ym = y_mask[None, j:j + b, :].expand(a, b, m).reshape(a * b, m)
            out[i:i + a, j:j + b] = _plans_and_values(cost, xm, ym, eps, n_iters)[2].view(a, b)
    return out

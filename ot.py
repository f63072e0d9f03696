"""Batched, masked, stabilised Sinkhorn for the Wasserstein loss of AI-STA (paper eq. 1, 3 and 6).

Copy this file into other work: it imports nothing but torch.

Problem (paper eq. 1). For point clouds x_1..x_n and y_1..y_m in R^d with uniform masses a_i = 1/n and
b_j = 1/m over the *valid* positions (padding carries no mass),

    W(x, y) = min_{P >= 0, P 1 = a, P^T 1 = b}  <P, C>,      C_ij = |x_i - y_j|^2.

Entropic OT replaces the linear program by  OT_eps = min_P <P, C> + eps KL(P | a b^T),  whose solution is
P_ij = exp((F_i + G_j - C_ij) / eps) for potentials (F, G) (the log-masses folded in) of the Sinkhorn
fixed point: F makes the rows of P sum to a, G the columns to b.

Iterations: stabilised scaling domain (Schmitzer 2019). The potentials are absorbed into a kernel
K_ij = exp((F_i + G_j - C_ij) / eps), built with one exp pass, and the iterations only rescale it,

    u <- a / (K v),      v <- b / (K^T u),        P = diag(u) K diag(v),

two batched matrix-vector products per iteration and no exp: one pass over (B, n, m) per half-iteration
(the log-domain form needs about seven). Every `ABSORB` iterations, and whenever eps changes, eps log u
and eps log v are moved into (F, G) and K is rebuilt, so u and v stay near 1 and nothing over- or
underflows; exponents are floored at -80 (fp64: -700), which adds less than e^-80 relative mass and keeps
exp() off the CPU's slow denormal path. eps-scaling: eps starts at max(C) (the plan is then nearly a b^T)
and decays geometrically to eps_abs over the first `anneal` fraction of the iterations (one iteration per
eps, as GeomLoss and Schmitzer do); the rest run at eps_abs with over-relaxation on the scalings,
u <- u^(1-w) (a / K v)^w with w = OMEGA (Thibault et al. 2017; the log-domain f <- (1-w) f + w T(g)), the
last one plain so that the rows of P are exact. The count is a Python int and the loop has no
data-dependent branch: no host-device synchronisation.

Newton polish. At eps = 1e-3 those iterations leave an L1 column error of 1e-2 .. 1e-1 (plain Sinkhorn
would need thousands more). Then, with rows exact (u = a / K v), Newton steps on the semi-dual
S(v) = <b, log v> - <a, log K v> solve

    (diag(P^T 1) - P^T diag(1/a) P + b b^T + lambda diag(b)) delta = b - P^T 1,    v <- v exp(t delta)

(b b^T lifts the null vector 1; Levenberg-Marquardt damping lambda; |delta| <= a per-problem trust radius
5..40; the best of t = 1, 1/4, 1/16, 1/64 by S, all four in one product with K; far-moved scalings
absorbed into G as above), until the L1 column error is below TOL = 1e-5 (fp32: its floor is ~1e-6, with
C / eps_abs ~ 1e4 in the exponents) or TOL64 = 1e-8 (fp64) for every problem, at most NEWTON steps. One
host sync per step (on a GPU a pipeline drain, ~10-50 us each; 7-16 steps on the benchmark batches, up
to the cap on a few ragged problems). A
converged problem is frozen, so its steps do not depend on its batch; a problem still above tol at the
cap keeps its Sinkhorn state (and gets the envelope gradient below): far from the optimum the Newton path
depends on rounding. newton=0 gives the Sinkhorn loop alone.

Value. `wasserstein` returns the transport cost of the entropic plan, the estimate of W in eq. 1 (the
tests check it against POT's exact `ot.emd2`): the mean of <P_row, C> (P after the last u-update, exact
row sums) and <P_col, C> with P_col = P diag(b / P^T 1) (exact column sums), which cancels most of the
error of a not fully converged plan. With debias=True it returns the Sinkhorn divergence
S = OT_eps(x,y) - OT_eps(x,x)/2 - OT_eps(y,y)/2 from the dual values <a, f> + <b, g>.

Gradient. The value <P, C> is differentiated exactly (eps_abs held fixed): differentiating the marginal
constraints of P_ij = exp((f_i + g_j - C_ij) / eps) gives

    d<P, C>/dC_ij = P_ij (1 + (lambda_i + mu_j - C_ij) / eps),
    (diag(P^T 1) - P^T diag(1/a) P) mu = s - P^T (r / a),   lambda = (r - P mu) / a,   r = (P*C) 1, s = (P*C)^T 1,

one (B, m, m) Cholesky solve (the Newton matrix), and dW/dx_i = 2 sum_j G_ij (x_i - y_j), dW/dy_j =
2 sum_i G_ij (y_j - x_i) for that G. It needs a converged plan: a problem whose column error is above
10 tol gets the envelope gradient G = P instead (the derivative of OT_eps at its fixed point, Danskin),
rows from P_row and columns from P_col, which for <P, C> leaves out -eps dKL(P)/dC (1-8% of the gradient
on the benchmark's loss batch). debias=True returns OT_eps values and uses the envelope gradient, their
exact derivative. Nothing is back-propagated through the iterations: memory does not grow with n_iters.

Relative epsilon. `eps` is dimensionless: each problem uses eps_abs = eps * scale(C), with

    scale(C) = std(C) + 1e-3 * mean(C)        (over the valid entries of that problem's cost),

so one default fits the LLM's embedding layer (norms ~1) and deep layers (norms ~1e3 - 1e4) alike, and
W(c x, c y) = c^2 W(x, y) exactly. The standard deviation measures how much the costs of different
pairings differ, which is what the plan has to resolve; the small mean term keeps eps positive when all
costs are equal (n = m = 1). Like any hyperparameter, eps_abs is held fixed when differentiating.

Independence. Every quantity (centre, cost, eps, masses, the iterations) is per problem, so a problem's
result does not depend on the others in its batch, except through rounding (matrix-product blocking).
A problem with a non-finite value at a valid position returns NaN (and a NaN gradient) and leaves every other problem's result untouched; `pairwise_wasserstein`
centres on the mean of the finite sequences only.

Precision. Inputs may be bf16, fp16, fp32 or fp64; the solver works in fp32 (fp64 for fp64 inputs),
whatever autocast context is active (autocast is switched off inside: its bf16 matmul would ruin the cost):
  * the cost: both sets are centred on their common mean (C is translation invariant) so that
    |x|^2 + |y|^2 - 2 x.y involves only the spread of the data, then clamped at 0. Evaluated in bf16
    with d = 1024, that expansion is off by whole units -- as much as the distances between neighbouring
    frames -- hence fp32. (With TF32 matmuls enabled on a GPU, centring keeps the error at the scale of the
    spread rather than of the much larger norms.)
  * the iterations: potentials are as large as the costs while the plan needs their differences to a
    fraction of eps; bf16's 8 significant bits would lose them. The loop only touches (B, n, m) tensors,
    which is small next to an LLM forward.
  * padded positions are zeroed before use, so NaN or huge garbage there never reaches valid entries.
  * the loss is returned in fp32 (fp64 for fp64 inputs); gradients come back in the input dtype. With
    C / eps_abs ~ 1e4 at the default eps, fp32 rounding moves the value by ~1e-4 relative: use fp64
    inputs for finite-difference checks.
"""
import contextlib
import math
import numbers
from typing import NamedTuple, Optional

import torch

__all__ = ["wasserstein", "pairwise_wasserstein", "sinkhorn", "cost_matrix", "SinkhornResult"]

EPS = 1e-3         # relative epsilon (module docstring)
N_ITERS = 100      # Sinkhorn iterations (the warm start of the Newton polish)
TOL = 1e-5         # L1 column-marginal error at which the Newton polish stops (rows are exact); fp32 reaches
TOL64 = 1e-8       # ~1e-6 at best (C / eps_abs ~ 1e4 in exponents), fp64 far below: fp64 inputs stop at TOL64
NEWTON = 60        # cap on the Newton steps (benchmark batches: 7-16 reach TOL, ragged ones up to ~57)
ANNEAL = 0.15      # fraction of the iterations spent decaying eps from max(C) to EPS * scale(C)
OMEGA = 1.9        # over-relaxation after annealing (1.95 already oscillates on some problems)
ABSORB = 4         # iterations between kernel rebuilds at the final eps (8 moved an fp32 value by 0.2%)
MEAN_WEIGHT = 1e-3  # weight of mean(C) in scale(C)


class SinkhornResult(NamedTuple):
    f: torch.Tensor          # (B, n) dual potential of x (rows of P_row exact); 0 on padding
    g: torch.Tensor          # (B, m) dual potential of y; 0 on padding
    log_plan_row: torch.Tensor  # (B, n, m) log P_row: exact row sums a; -inf on padding
    log_plan_col: torch.Tensor  # (B, n, m) log P_col: exact column sums b; -inf on padding
    eps: torch.Tensor        # (B,) absolute epsilon of the last iteration


# ----------------------------------------------------------------------------------------- input checks
def _no_autocast(device):
    """Autocast off inside the solver: it would run the cost's matrix product in bf16/fp16."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _check_points(x, y, names=("x", "y"), same_batch=True):
    for t, name in zip((x, y), names):
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got "
                             f"{t.dtype if torch.is_tensor(t) else type(t).__name__}")
    batch = "B" if same_batch else "Nx/Ny"
    if x.dim() != 3 or y.dim() != 3 or x.shape[2] != y.shape[2] or (same_batch and x.shape[0] != y.shape[0]):
        raise ValueError(f"expected {names[0]} ({batch}, n, d) and {names[1]} ({batch}, m, d), "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"{names[0]} is on {x.device} and {names[1]} on {y.device}: they must be on one device")


def _check_mask(mask, shape, device, name):
    """None -> all valid; bool, or an integer/float tensor holding only 0 and 1 -> bool (True = valid)."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not torch.is_tensor(mask):
        raise ValueError(f"{name} must be a tensor (bool, True = valid position), got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)} (batch, positions)")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the points are on {device}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[:1].tolist() if not mask.is_complex() else ["complex"]
        raise ValueError(f"{name} must be bool, or hold only 0 and 1 (True / 1 = valid position, False / 0 = "
                         f"padding); got the value {bad[0] if bad else '?'} (an additive 0 / -inf mask? use "
                         f"mask == 0)")
    return mask != 0


def _check_params(eps, n_iters, tol=None, newton=NEWTON):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0 (relative to the cost scale), got {eps!r}")
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral) or n_iters < 1:
        raise ValueError(f"n_iters must be an integer >= 1, got {n_iters!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0):
        raise ValueError(f"tol must be None (the default) or a number > 0 (L1 marginal error), got {tol!r}")
    if isinstance(newton, bool) or not isinstance(newton, numbers.Integral) or newton < 0:
        raise ValueError(f"newton must be an integer >= 0 (Newton steps), got {newton!r}")


def _check_nonempty(mask, name):
    """Every problem needs mass on both sides (one host sync, outside the solver loop)."""
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise ValueError(f"{name} has no valid position in batch index {empty[0]}{more}: "
                         "every problem needs at least one valid point on each side")


def _work_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------------- cost
def _zero_padding(x, mask, dt):
    """A work-dtype copy of x with the padded positions set to 0 (NaN / inf garbage there is dropped)."""
    out = x.to(dt, copy=True)
    return out.masked_fill_(~mask[..., None], 0.0)


def _centred_cost(x, y, x_mask, y_mask):
    """(centred x, centred y, C) for bool masks: padding zeroed, both sets centred on the mean of their
    valid points (per problem), C = |x|^2 + |y|^2 - 2 x.y clamped at 0, and 0 on every entry that involves
    padding. One copy of each input is the only (B, n, d) allocation."""
    dt = _work_dtype(x, y)
    xc, yc = _zero_padding(x, x_mask, dt), _zero_padding(y, y_mask, dt)
    count = (x_mask.sum(1) + y_mask.sum(1)).clamp(min=1).to(dt)[:, None]
    centre = ((xc.sum(1) + yc.sum(1)) / count)[:, None, :]
    xc.sub_(centre)
    yc.sub_(centre)         # padded rows now hold -centre: finite, and they get no mass
    cost = _sq_dist(xc, yc)
    valid = x_mask[:, :, None] & y_mask[:, None, :]
    return xc, yc, cost.masked_fill_(~valid, 0.0)


def _sq_dist(xc, yc):
    x2 = torch.linalg.vector_norm(xc, dim=-1).square_()
    y2 = torch.linalg.vector_norm(yc, dim=-1).square_()
    return torch.baddbmm(x2[:, :, None] + y2[:, None, :], xc, yc.transpose(1, 2), alpha=-2.0).clamp_(min=0.0)


def cost_matrix(x, y, x_mask=None, y_mask=None):
    """C_ij = |x_i - y_j|^2 for x (B, n, d), y (B, m, d) -> (B, n, m), fp32 (fp64 for fp64 inputs).

    Padding is zeroed, both sets are centred on the mean of their valid points, C is expanded as
    |x|^2 + |y|^2 - 2 x.y and clamped at 0 (module docstring, "Precision"). Entries that involve padding
    are 0; the solver gives them no mass.
    """
    _check_points(x, y)
    x_mask = _check_mask(x_mask, x.shape[:2], x.device, "x_mask")
    y_mask = _check_mask(y_mask, y.shape[:2], y.device, "y_mask")
    with _no_autocast(x.device):
        return _centred_cost(x, y, x_mask, y_mask)[2]


# ----------------------------------------------------------------------------------------- solver
def _scale(cost, valid):
    """scale(C) = std(C) + 1e-3 mean(C) and max(C) over the valid entries, per problem -> (B,), (B,)."""
    count = valid.sum((1, 2)).clamp(min=1)
    mean = cost.sum((1, 2)) / count                        # cost is already 0 off the valid entries
    var = (torch.where(valid, cost - mean[:, None, None], 0.0) ** 2).sum((1, 2)) / count
    return var.sqrt() + MEAN_WEIGHT * mean, cost.amax((1, 2))


def _kernel(g, cost, e, valid, x_mask, y_mask, floor):
    """Rebuild after absorbing: Z = (G_j - C_ij) / e shifted so that every row and every column of
    K = exp(Z) has its largest entry exactly 1 (no row or column can underflow), exponents floored at `floor`
    (no denormals; absorbing every ABSORB iterations keeps u, v near 1, so the floor adds < e^-70 relative
    mass), 0 on every entry that involves padding. G is -inf on padded
    columns and padded rows are set to -inf, so padding never sets a maximum. -> (K, f, g): the potentials of K, P = diag(u) K diag(v)."""
    z = torch.sub(g[:, None, :], cost)
    top = z.amax(2, keepdim=True)                       # (B, n, 1)
    z.sub_(top).masked_fill_(~x_mask[:, :, None], float("-inf"))   # padded rows must not set a maximum
    side = z.amax(1, keepdim=True).clamp_(max=0.0)      # (B, 1, m); 0 wherever a row attains its maximum
    side.masked_fill_(~y_mask[:, None, :], 0.0)         # padded columns: -inf - -inf would be NaN
    z.sub_(side).div_(e[:, :, None])
    K = z.clamp_(min=floor).exp_().mul_(valid)
    return K, -top[:, :, 0], g - side[:, 0, :]


class _Solution(NamedTuple):
    plan: torch.Tensor   # (B, n, m) P_row = diag(u) K diag(v): rows sum to a; 0 on padding
    col: torch.Tensor    # (B, m) column sums of P_row
    a: torch.Tensor      # (B, n) masses
    b: torch.Tensor      # (B, m)
    f: torch.Tensor      # (B, n) potentials F, G of P_row (log masses included); 0 on padding
    g: torch.Tensor
    eps: torch.Tensor    # (B,) absolute epsilon


def _hessian(plan, col, a_safe, b, pad_y, ridge):
    """H = diag(col) - P^T diag(1/a) P + b b^T + ridge diag(b) (+ 1 on padded columns), (B, m, m): eps times
    the negative Hessian of the semi-dual in g (rows exact), with its null vector 1 lifted by b b^T."""
    h = torch.bmm(plan.transpose(1, 2), plan / a_safe[:, :, None]).neg_()
    h.diagonal(dim1=1, dim2=2).add_(col + pad_y + ridge * b)
    return h.add_(b[:, :, None] * b[:, None, :])


_STEPS = torch.tensor([1.0, 0.25, 0.0625, 0.015625])   # the Newton step lengths tried


def _newton(rebuild, K, f, G, v, e, a, b, a_safe, pad_x, pad_y, y_mask, tol, steps):
    """Levenberg-Marquardt Newton on the semi-dual in log v (rows exact: u = a / K v), until the L1 column
    error is below tol for every problem or `steps` steps; one host sync per step. A step is accepted per
    problem if it raises the semi-dual S = <b, log v> - <a, log K v> or is small (|log step| < 0.1, where S's
    rounding hides the gain), without a sync; the damping shrinks after an accepted step and grows after a
    rejected one. When some |log v| exceeds 15, e log v is absorbed into G and K rebuilt (as in the Sinkhorn
    loop): K's exponent floor must not decide where far-moved mass goes. -> (K, f, G, v)."""
    dt = v.dtype
    lam = torch.full_like(v[:, :1], 1e-3)
    radius = torch.full_like(v[:, :1], 5.0)   # grows while full steps succeed (far-off potentials), up to 40
    tiny = torch.finfo(dt).eps
    mv = lambda w: torch.bmm(w[:, None, :], K.transpose(1, 2))[:, 0] + pad_x   # noqa: E731 (K v, 1 on padding)
    semi = lambda w, kw: (b * torch.where(y_mask, w.log(), 0.0)).sum(1) - (a * kw.log()).sum(1)  # noqa: E731
    start = K, f, G, v
    kv = mv(v)
    s_old = semi(v, kv)
    for _ in range(steps + 1):   # the last pass only measures
        u = a_safe / kv
        plan = K * u[:, :, None] * v[:, None, :]
        col = plan.sum(1)
        err = (col - b).abs().sum(1)
        active = err > tol          # the others are frozen: a problem's steps do not depend on its batch
        far = (torch.where(y_mask, v.log().abs(), 0.0).amax(1) > 15.0) & active
        more, absorb = torch.stack([active.any(), far.any()]).tolist()   # NaN: done, not far
        if not more or _ == steps:
            break
        if absorb:   # only the far problems take the new kernel: the others' iterates must not depend on them
            G_abs = G + e * torch.where(y_mask, v.log(), 0.0)
            K_new, f_new, g = rebuild(G_abs)
            v_new = torch.where(y_mask, ((G_abs - g) / e).exp(), 1.0)   # <= 1 after a rebuild: G - g <= 0
            K = torch.where(far[:, None, None], K_new, K)
            f, G, v = (torch.where(far[:, None], new, old) for new, old in ((f_new, f), (g, G), (v_new, v)))
            kv = mv(v)
            s_old = semi(v, kv)
            u = a_safe / kv
            plan = K * u[:, :, None] * v[:, None, :]
            col = plan.sum(1)
        h = _hessian(plan, col, a_safe, b, pad_y, lam + 100 * tiny)
        chol, _ = torch.linalg.cholesky_ex(h)
        delta = torch.cholesky_solve((b - col)[:, :, None], chol)[:, :, 0]
        # trust region |log step| <= radius, then the best of four step lengths (one product with K for all four)
        delta = delta * (radius / torch.maximum(delta.abs().amax(1, keepdim=True), radius))
        v_try = v[:, None, :] * (_STEPS.to(dt)[:, None] * delta[:, None, :]).exp()         # (B, 4, m)
        kv_try = torch.bmm(v_try, K.transpose(1, 2)) + pad_x[:, None, :]                 # (B, 4, n)
        s_try = (b[:, None, :] * torch.where(y_mask[:, None, :], v_try.log(), 0.0)).sum(2) \
            - (a[:, None, :] * kv_try.log()).sum(2)
        best = s_try.nan_to_num(nan=-math.inf).argmax(1)
        s_new = s_try.gather(1, best[:, None])[:, 0]
        small = delta.abs().amax(1) < 0.05        # near the optimum S's rounding hides the gain of a full step
        best = torch.where(small, 0, best)
        ok = ((s_new > s_old) | small) & active
        pick = best[:, None, None].expand(-1, 1, v.shape[1])
        v = torch.where(ok[:, None], v_try.gather(1, pick)[:, 0], v)
        kv = torch.where(ok[:, None], kv_try.gather(1, best[:, None, None].expand(-1, 1, kv.shape[1]))[:, 0], kv)
        s_old = torch.where(ok, s_try.gather(1, best[:, None])[:, 0], s_old)
        full = ok[:, None] & (best[:, None] == 0)
        grow = active[:, None] & ~full
        lam = torch.where(full, lam * 0.25, torch.where(grow, lam * 4.0, lam)).clamp_(1e-9, 1e6)
        radius = torch.where(full, radius * 2.0, torch.where(grow, radius * 0.5, radius)).clamp_(5.0, 40.0)
    # a problem still above tol at the cap keeps its Sinkhorn state: far from the optimum the polish's path
    # depends on rounding (so on the batch), Sinkhorn's fixed schedule does not
    keep = active
    K = torch.where(keep[:, None, None], start[0], K)
    f, G, v = (torch.where(keep[:, None], old, new) for old, new in zip(start[1:], (f, G, v)))
    return K, f, G, v


@torch.no_grad()
def _solve(cost, x_mask, y_mask, eps, n_iters, anneal=ANNEAL, omega=OMEGA, tol=None, newton=NEWTON):
    """The loop of the module docstring on cost (B, n, m) (0 on padding), bool masks -> _Solution."""
    B, n, m = cost.shape
    dt = cost.dtype
    floor = -700.0 if dt == torch.float64 else -80.0
    lo, hi = math.exp(floor + 10), math.exp(-floor - 10)
    xm, ym = x_mask.to(dt), y_mask.to(dt)
    a = xm / xm.sum(1, keepdim=True)
    b = ym / ym.sum(1, keepdim=True)
    a_safe, b_safe = torch.where(x_mask, a, 1.0), torch.where(y_mask, b, 1.0)   # u, v = 1 on padding
    pad_x, pad_y = 1.0 - xm, 1.0 - ym        # K is 0 on padded rows / columns: K v + 1 there
    valid = (x_mask[:, :, None] & y_mask[:, None, :]).to(dt)

    scale, cmax = _scale(cost, valid > 0)
    eps_end = (eps * scale).clamp(min=torch.finfo(dt).tiny)[:, None]          # (B, 1)
    eps_start = torch.maximum(cmax[:, None], eps_end)
    n_anneal = max(1, min(n_iters, round(anneal * n_iters)))
    log_ratio = (eps_end / eps_start).log()

    # F, G: total potentials (cost units). Between rebuilds P = diag(u) K diag(v), F = f + e log u.
    F = torch.zeros(B, n, dtype=dt, device=cost.device)
    G = torch.where(y_mask, 0.0, float("-inf")).to(dt)
    e = v = None
    for k in range(n_iters):
        annealing = k < n_anneal
        if annealing or (k - n_anneal) % ABSORB == 0:   # absorb the scalings, rebuild K (maybe new eps)
            if e is not None:
                F = f + e * torch.where(x_mask, u.log(), 0.0)
                G = G + e * torch.where(y_mask, v.log(), 0.0)
            first = e is None
            t = (min(1.0, k / (n_anneal - 1)) if n_anneal > 1 else 0.0) if annealing else 1.0
            e = eps_start * (log_ratio * t).exp()       # t = 1: eps_abs (the last annealing step when > 1)
            K, f, g = _kernel(G, cost, e, valid, x_mask, y_mask, floor)
            if first:
                u, v = torch.ones_like(F), torch.ones_like(G)
            else:   # the same (F, G) in the new kernel; this plan's entries are <= ~1, so are u and v
                u = ((F - f) / e).clamp_(min=floor, max=-floor).exp_()
                v = torch.where(y_mask, ((G - g) / e).clamp_(min=floor, max=-floor).exp_(), 1.0)
            G = g
        w = omega if not annealing and k < n_iters - 1 else 1.0
        kv = torch.bmm(v[:, None, :], K.transpose(1, 2))[:, 0]
        u_new = a_safe / (kv + pad_x)
        # u^(1-w) u_new^w without overflow; clamped to [e^-70, e^70] (fp64: +-690): far from convergence (a
        # short schedule) the scalings can run away before the next absorption, which then undoes the clamp
        u = (u_new if w == 1.0 else u_new * (u_new / u).pow_(w - 1.0)).clamp_(min=lo, max=hi)
        ktu = torch.bmm(u[:, None, :], K)[:, 0]
        v_new = b_safe / (ktu + pad_y)
        v = (v_new if w == 1.0 else v_new * (v_new / v).pow_(w - 1.0)).clamp_(min=lo, max=hi)
    if newton:
        tol = tol if tol is not None else (TOL64 if dt == torch.float64 else TOL)
        rebuild = lambda G: _kernel(G, cost, e, valid, x_mask, y_mask, floor)   # noqa: E731
        K, f, G, v = _newton(rebuild, K, f, G, v, e, a, b, a_safe, pad_x, pad_y, y_mask, tol, newton)
    u = a_safe / (torch.bmm(v[:, None, :], K.transpose(1, 2))[:, 0] + pad_x)   # plain: rows exact
    plan = K * u[:, :, None]
    plan.mul_(v[:, None, :])
    f = torch.where(x_mask, f + e * u.log(), 0.0)
    g = torch.where(y_mask, G + e * v.log(), 0.0)
    return _Solution(plan, plan.sum(1), a, b, f, g, e[:, 0])


def _values(sol, cost):
    """(<P, C> averaged over P_row and P_col, OT_eps dual value) per problem."""
    pc = (sol.plan * cost).sum(1)                                        # (B, m) column sums of P * C
    ratio = torch.where(sol.b > 0, sol.b / sol.col, 0.0)                 # P_col = P_row diag(b / col)
    primal = 0.5 * (pc.sum(1) + (ratio * pc).sum(1))
    n, m = (sol.a > 0).sum(1).to(cost.dtype), (sol.b > 0).sum(1).to(cost.dtype)
    dual = (sol.a * sol.f).sum(1) + (sol.b * sol.g).sum(1) + sol.eps * (n.log() + m.log())
    return primal, dual


@torch.no_grad()
def sinkhorn(cost: torch.Tensor, x_mask: Optional[torch.Tensor] = None, y_mask: Optional[torch.Tensor] = None,
             *, eps: float = EPS, n_iters: int = N_ITERS, anneal: float = ANNEAL, omega: float = OMEGA,
             tol: Optional[float] = None, newton: int = NEWTON) -> SinkhornResult:
    """Stabilised Sinkhorn on a batch of cost matrices with padding masks (no gradient).

    cost (B, n, m); x_mask (B, n), y_mask (B, m) bool (or 0/1), True = valid (None = all valid). Masses
    are uniform on the valid positions: a_i = 1/n_b, b_j = 1/m_b. eps is relative: eps_abs = eps * scale(C)
    per problem. The first round(anneal * n_iters) iterations decay eps geometrically from max(C) to
    eps_abs; the others run at eps_abs, over-relaxed by omega except the last. Then at most `newton`
    Newton steps until the L1 column error is below tol for every problem (one host sync per step; rows
    are exact; tol=None: TOL, or TOL64 for fp64 costs); newton=0: Sinkhorn only.

    Returns SinkhornResult(f, g, log_plan_row, log_plan_col, eps) where
        log P_row,ij = log a_i + log b_j + (f_i + g_j - C_ij) / eps     (up to the exponent floor).
    Differentiate through the plan with `wasserstein` (envelope theorem), not through this loop.
    Raises ValueError naming the batch index if a problem has no valid position on one side.
    """
    if not torch.is_tensor(cost) or cost.dim() != 3 or not cost.is_floating_point():
        raise ValueError(f"cost must be a floating-point (B, n, m) tensor, got "
                         f"{tuple(cost.shape) if torch.is_tensor(cost) else type(cost).__name__}")
    _check_params(eps, n_iters, tol, newton)
    B, n, m = cost.shape
    x_mask = _check_mask(x_mask, (B, n), cost.device, "x_mask")
    y_mask = _check_mask(y_mask, (B, m), cost.device, "y_mask")
    _check_nonempty(x_mask, "x_mask")
    _check_nonempty(y_mask, "y_mask")
    valid = x_mask[:, :, None] & y_mask[:, None, :]
    with _no_autocast(cost.device):
        cost = torch.where(valid, cost.to(_work_dtype(cost)), 0.0)   # garbage on padding must not become NaN
        sol = _solve(cost, x_mask, y_mask, eps, n_iters, anneal, omega, tol, newton)
        log_row = torch.where(valid, sol.plan.log(), float("-inf"))
        log_col = log_row + torch.where(sol.b > 0, sol.b / sol.col, 1.0).log()[:, None, :]
        e = sol.eps[:, None]     # standard potentials: P = a b exp((f + g - C) / e), F = f + e log a
        f = torch.where(x_mask, sol.f - e * sol.a.log(), 0.0)
        g = torch.where(y_mask, sol.g - e * sol.b.log(), 0.0)
    return SinkhornResult(f, g, log_row, log_col, sol.eps)


# ----------------------------------------------------------------------------------------- loss
class _Transport(torch.autograd.Function):
    """value(x, y) with the envelope gradient of the module docstring (the plan is held fixed)."""

    @staticmethod
    def forward(ctx, x, y, x_mask, y_mask, eps, n_iters, entropic, tol, newton):
        with _no_autocast(x.device):
            xc, yc, cost = _centred_cost(x.detach(), y.detach(), x_mask, y_mask)
            sol = _solve(cost, x_mask, y_mask, eps, n_iters, tol=tol, newton=newton)
            primal, dual = _values(sol, cost)
        ratio = torch.where(sol.b > 0, sol.b / sol.col, 0.0)
        # the implicit gradient needs a converged plan: a problem the polish left above 10 tol gets the envelope
        limit = 10 * (tol if tol is not None else (TOL64 if cost.dtype == torch.float64 else TOL))
        converged = ((sol.col - sol.b).abs().sum(1) <= limit) if newton else torch.zeros_like(sol.b[:, 0], dtype=torch.bool)
        ctx.save_for_backward(xc, yc, sol.plan, sol.a, sol.b, ratio, None if entropic else cost, sol.eps, converged)
        ctx.dtypes, ctx.entropic = (x.dtype, y.dtype), entropic
        return dual if entropic else primal

    @staticmethod
    def backward(ctx, grad):
        xc, yc, plan, a, b, ratio, cost, e, converged = ctx.saved_tensors
        with _no_autocast(xc.device):
            s = 2.0 * grad.to(xc.dtype)[:, None, None]
            # envelope: dOT_eps/dC = P, rows from P_row (exact a), columns from P_col (exact b)
            gc_x, gc_y = plan * s, plan * (s * ratio[:, None, :])
            if not ctx.entropic:   # d<P, C>/dC where the plan is converged
                exact = _implicit(plan, cost, a, b, e) * s
                keep = converged[:, None, None]
                gc_x, gc_y = torch.where(keep, exact, gc_x), torch.where(keep, exact, gc_y)
            gx = gy = None
            if ctx.needs_input_grad[0]:   # dC_ij/dx_i = 2 (x_i - y_j)
                gx = torch.baddbmm(xc * gc_x.sum(2, keepdim=True), gc_x, yc, alpha=-1.0).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:   # dC_ij/dy_j = 2 (y_j - x_i)
                gy = torch.baddbmm(yc * gc_y.sum(1)[:, :, None], gc_y.transpose(1, 2), xc,
                                   alpha=-1.0).to(ctx.dtypes[1])
        return gx, gy, None, None, None, None, None, None, None


def _implicit(plan, cost, a, b, e):
    """d<P, C>/dC for the entropic plan P(C) (eps held fixed), by implicit differentiation of the marginal
    constraints (module docstring, "Gradient"):  P_ij (1 + (lambda_i + mu_j - C_ij) / e)  with
    (diag(col) - P^T diag(1/a) P) mu = s - P^T (r / a),  lambda = (r - P mu) / a,  r = (P*C) 1,  s = (P*C)^T 1."""
    a_safe = torch.where(a > 0, a, 1.0)
    pad_y = (b == 0).to(plan.dtype)
    pc = plan * cost
    r, s = pc.sum(2), pc.sum(1)
    h = _hessian(plan, plan.sum(1), a_safe, b, pad_y, 100 * torch.finfo(plan.dtype).eps)
    chol, _ = torch.linalg.cholesky_ex(h)
    rhs = s - torch.bmm((r / a_safe)[:, None, :], plan)[:, 0]
    mu = torch.cholesky_solve(rhs[:, :, None], chol)[:, :, 0]
    lam = (r - torch.bmm(plan, mu[:, :, None])[:, :, 0]) / a_safe
    z = torch.sub(lam[:, :, None] + mu[:, None, :], cost).div_(e[:, None, None]).add_(1.0)
    return z.mul_(plan)


def wasserstein(x: torch.Tensor, y: torch.Tensor, x_mask: Optional[torch.Tensor] = None,
                y_mask: Optional[torch.Tensor] = None, *, eps: float = EPS, n_iters: int = N_ITERS,
                debias: bool = False, tol: Optional[float] = None, newton: int = NEWTON) -> torch.Tensor:
    """Wasserstein loss between batches of point clouds (paper eq. 1), differentiable in x and y.

    x (B, n, d), y (B, m, d) in any float dtype, on one device; x_mask (B, n), y_mask (B, m) bool (or
    integer / float holding only 0 and 1), True = valid (None = all valid); padded positions may hold
    anything. Uniform mass on the valid positions. Returns (B,) in fp32 (fp64 for fp64 inputs):
        debias=False: <P, C>, the squared-Euclidean W of eq. 1 estimated by entropic OT;
        debias=True:  the Sinkhorn divergence OT_eps(x, y) - OT_eps(x, x)/2 - OT_eps(y, y)/2.
    eps (> 0) is relative to each problem's cost scale (module docstring); n_iters >= 1 Sinkhorn iterations,
    then at most `newton` Newton steps to an L1 marginal error of tol (None: TOL, fp64 TOL64). The gradient
    is the exact derivative of the returned value where the plan converged (module docstring, "Gradient"),
    else the envelope gradient 2 sum_j P_ij (x_i - y_j); memory does not grow with n_iters. Detach y to move x
    only (the paper's text side). Computes in fp32 even under autocast. A problem with a non-finite value
    at a valid position returns NaN (NaN gradient) and leaves the others untouched. Raises ValueError on
    a bad shape, device, mask, eps or n_iters, and naming the batch index if a problem has no valid
    position on one side.
    """
    _check_points(x, y)
    _check_params(eps, n_iters, tol, newton)
    x_mask = _check_mask(x_mask, x.shape[:2], x.device, "x_mask")
    y_mask = _check_mask(y_mask, y.shape[:2], y.device, "y_mask")
    _check_nonempty(x_mask, "x_mask")
    _check_nonempty(y_mask, "y_mask")
    if x.shape[0] == 0:
        return x.new_zeros(0, dtype=_work_dtype(x, y)) + 0.0 * (x.sum() + y.sum())   # keeps the graph
    value = _Transport.apply(x, y, x_mask, y_mask, eps, n_iters, debias, tol, newton)
    if debias:
        value = value - 0.5 * _Transport.apply(x, x, x_mask, x_mask, eps, n_iters, True, tol, newton) \
                      - 0.5 * _Transport.apply(y, y, y_mask, y_mask, eps, n_iters, True, tol, newton)
    return value


@torch.no_grad()
def pairwise_wasserstein(x: torch.Tensor, y: torch.Tensor, x_mask: Optional[torch.Tensor] = None,
                         y_mask: Optional[torch.Tensor] = None, *, eps: float = EPS, n_iters: int = N_ITERS,
                         chunk_size: int = 4096, tol: Optional[float] = None, newton: int = NEWTON) -> torch.Tensor:
    """All-pairs distances D_ij = W(x_i, y_j) for speech-to-text retrieval (paper eq. 3) -> (Nx, Ny).

    x (Nx, n, d), y (Ny, m, d), masks as in `wasserstein`. Blocks of at most `chunk_size` pairs are
    solved as one batch, so memory is O(chunk_size * n * m + (Nx n + Ny m) d), never O(Nx Ny n m); the
    cost of a block is one matrix product of the stacked points. All points are centred on one common
    mean first (hidden states of an LLM layer share a large common offset), taken over the sequences whose
    valid values are all finite: a sequence with a NaN or inf gets a NaN row (or column) and changes no
    other entry. No gradient. D_ij equals wasserstein(x[i:i+1], y[j:j+1]) up to rounding.
    """
    _check_points(x, y, same_batch=False)
    _check_params(eps, n_iters, tol, newton)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    x_mask = _check_mask(x_mask, x.shape[:2], x.device, "x_mask")
    y_mask = _check_mask(y_mask, y.shape[:2], y.device, "y_mask")
    _check_nonempty(x_mask, "x_mask")
    _check_nonempty(y_mask, "y_mask")
    (Nx, n, d), (Ny, m, _) = x.shape, y.shape
    dt = _work_dtype(x, y)
    out = torch.empty(Nx, Ny, dtype=dt, device=x.device)
    with _no_autocast(x.device):
        xc, yc = _zero_padding(x, x_mask, dt), _zero_padding(y, y_mask, dt)
        fx = torch.isfinite(xc).flatten(1).all(1)      # sequences that may enter the common centre
        fy = torch.isfinite(yc).flatten(1).all(1)
        total = xc[fx].sum((0, 1)) + yc[fy].sum((0, 1))
        count = (x_mask[fx].sum() + y_mask[fy].sum()).clamp(min=1).to(dt)
        centre = total / count
        xc.sub_(centre)
        yc.sub_(centre)
        x2 = torch.linalg.vector_norm(xc, dim=-1).square_()                  # (Nx, n)
        y2 = torch.linalg.vector_norm(yc, dim=-1).square_()                  # (Ny, m)
        cj = max(1, min(Ny, chunk_size))
        ci = max(1, min(Nx, chunk_size // cj))
        for i in range(0, Nx, ci):
            for j in range(0, Ny, cj):
                a, b = min(ci, Nx - i), min(cj, Ny - j)
                dot = (xc[i:i + a].reshape(a * n, d) @ yc[j:j + b].reshape(b * m, d).T).view(a, n, b, m)
                cost = (x2[i:i + a, :, None, None] + y2[None, None, j:j + b, :] - 2.0 * dot).clamp_(min=0.0)
                cost = cost.permute(0, 2, 1, 3).reshape(a * b, n, m)
                xm = x_mask[i:i + a, None, :].expand(a, b, n).reshape(a * b, n)
                ym = y_mask[None, j:j + b, :].expand(a, b, m).reshape(a * b, m)
                cost.masked_fill_(~(xm[:, :, None] & ym[:, None, :]), 0.0)
                sol = _solve(cost, xm, ym, eps, n_iters, tol=tol, newton=newton)
                out[i:i + a, j:j + b] = _values(sol, cost)[0].view(a, b)
    return out

"""Wasserstein distances between batches of padded point clouds (AI-STA, paper eq. 1 and 3). Imports torch only.

    import torch
    import ot            # this file; where POT (also `ot`) is installed, copy it under another name: sinkhorn_ot.py
    device = "cuda" if torch.cuda.is_available() else "cpu"
    speech = torch.randn(8, 88, 896, device=device, requires_grad=True)         # (B, n, d), any float dtype
    text = torch.randn(8, 40, 896, device=device)                               # (B, m, d)
    speech_mask = torch.arange(88, device=device) < torch.randint(10, 89, (8, 1), device=device)   # True = valid
    loss = ot.wasserstein(speech, text, speech_mask, None).mean()              # (B,) -> scalar, float32
    loss.backward()                                                             # gradient in speech's dtype
    D = ot.pairwise_wasserstein(speech.detach(), text, speech_mask, None)      # (8, 8): D[i, j] = W(speech_i, text_j)

What it computes. For the valid points x_1..x_n, y_1..y_m with uniform masses a_i = 1/n, b_j = 1/m,

    W(x, y) = min_{P >= 0, P 1 = a, P^T 1 = b} <P, C>,        C_ij = |x_i - y_j|^2,

is estimated by <P, C> for the plan of entropic OT,  argmin_P <P, C> + eps KL(P | a b^T),  which is
P = diag(u) K diag(v), K = exp(-C / eps), for the scalings u, v that give P its marginals. eps is relative:
eps_abs = eps * (std(C) + 1e-3 mean(C)) over each problem's valid entries, so one default fits hidden states of
any scale, and W(c x, c y) = c^2 W(x, y). Against the exact linear program the value is off by ~1e-4 (relative)
on the benchmark's batches (benchmarks/bench_ot.py, docs/ot.md).

Gradient: the envelope gradient  dW/dC ~= P,  i.e.  dW/dx_i = 2 sum_j P_ij (x_i - y_j), dW/dy_j = 2 sum_i P_ij
(y_j - x_i), the exact derivative of the entropic objective min_P <P, C> + eps KL(P) at its optimum (eps_abs held
fixed). As the derivative of the returned <P, C> it leaves out  -eps_abs dKL(P)/dC:  5-9% of the gradient's norm
on a ragged (6, 88, 40, 128) batch, at most 10% on small problems whose plan has converged (tested), more where
it has not. Nothing is recorded per iteration: memory does not depend on n_iters.

The solver (`_solve`, the equations beside the code) runs a fixed number of iterations with no data-dependent
branch and no host synchronisation, so a call can be captured in a CUDA graph or compiled with
torch.compile(fullgraph=True). Scaling domain, not log domain: an iteration is two batched matrix-vector
products and two divisions (4 operators) where the log domain needs an exp over n x m per half-iteration. The
scalings would overflow at small eps, so whenever eps changes they are absorbed into potentials F, G and the
kernel is rebuilt from C (Schmitzer 2019), its exponents floored so no row or column of K vanishes.
eps-scaling: the first ANNEAL of the iterations decay eps geometrically from std(C) to eps_abs, LEVEL iterations
per value; the rest run at eps_abs, over-relaxed (Thibault et al. 2017). The last update makes the rows of P
exact; its columns keep an error that the iterations shrink. Problems whose optimal plan is nearly a
permutation (clouds of nearly equal size, nearly tied assignments) converge slowly: raise n_iters for them.

Precision: inputs may be bf16, fp16, fp32 or fp64; the work is fp32 (fp64 for fp64 inputs), autocast off. The
cost is computed from points centred on their mean (C is translation invariant), so |x|^2 + |y|^2 - 2 x.y
involves only the spread of the points, not their common offset; in bf16 it would be off by whole units at
d = 1024. Padded positions may hold anything (NaN included): they are replaced by 0 before use.

Failures stay local and cost no synchronisation: a problem with a NaN or inf at a valid position, no valid
position on a side, or a mask value other than 0 / 1 gives NaN for that problem (value and gradient) and leaves
the others as they would be alone. validate=True checks the masks on the host instead (one synchronisation)
and raises ValueError naming the batch index.
"""
import contextlib
import math
import numbers

import torch

__all__ = ["wasserstein", "pairwise_wasserstein", "EPS", "N_ITERS", "EPS_MIN"]

EPS = 5e-3            # relative epsilon (above)
N_ITERS = 100         # Sinkhorn iterations
ANNEAL = 0.5          # fraction of the iterations spent decaying eps from std(C) to eps_abs
LEVEL = 8             # iterations per eps value while annealing
OMEGA = 1.8           # over-relaxation at eps_abs
MEAN_WEIGHT = 1e-3    # weight of mean(C) in the scale of eps
# The smallest eps per working dtype. float32: the exponents (F + G - C) / eps_abs carry a rounding error of about
# unit_roundoff * max(C) / (eps std(C)), 3e-3 at eps = 1e-4 when max(C) = 5 std(C); at 1e-8 it is whole units (the
# plan, and the value, are garbage). float64 rounds 1e9 times finer, but the eps-scaling of a fixed iteration count
# does not reach eps far below 1e-6 (eps = 1e-8: 9% off on 6 x 6 clouds at n_iters = 100).
EPS_MIN = {torch.float32: 1e-4, torch.float64: 1e-6}


def wasserstein(x, y, x_mask=None, y_mask=None, *, eps=EPS, n_iters=N_ITERS, validate=False):
    """W(x_b, y_b) for each problem b of a padded batch -> (B,), differentiable in x and y.

    x (B, n, d), y (B, m, d) float tensors on one device; x_mask (B, n), y_mask (B, m) bool (or 0 / 1 numbers),
    True = valid, None = all valid. eps (relative, >= EPS_MIN) and n_iters as above; validate=True checks the
    masks on the host (one synchronisation) and raises ValueError naming the batch index, instead of a NaN for
    that problem. Returns float32 (float64 for float64 inputs); gradients come back in the inputs' dtypes. Detach
    y to move x only (the paper's text side gets no gradient).
    """
    _check_points(x, y, batched=True)
    _check_params(eps, n_iters, _work_dtype(x, y))
    x_mask, x_bad = _check_mask(x_mask, x, "x_mask", validate)
    y_mask, y_bad = _check_mask(y_mask, y, "y_mask", validate)
    return _Transport.apply(x, y, x_mask, y_mask, _either(x_bad, y_bad), eps, n_iters)


@torch.no_grad()
def pairwise_wasserstein(x, y, x_mask=None, y_mask=None, *, eps=EPS, n_iters=N_ITERS, chunk_size=4096,
                         validate=False):
    """All pairs D_ij = W(x_i, y_j) -> (Nx, Ny), for retrieval (paper eq. 3). No gradient.

    x (Nx, n, d), y (Ny, m, d), masks as in `wasserstein`. Blocks of at most chunk_size pairs are solved as one
    batch: memory O(chunk_size n m + (Nx n + Ny m) d); on a GPU a larger chunk_size (e.g. 65536) means fewer
    kernel launches. All points are centred on one mean, taken over the
    sequences whose valid values are finite; a sequence with a NaN or inf gets a NaN row (column) and changes no
    other entry. D_ij equals wasserstein(x[i:i+1], y[j:j+1]) up to rounding.
    """
    _check_points(x, y, batched=False)
    dt = _work_dtype(x, y)
    _check_params(eps, n_iters, dt)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    x_mask, x_bad = _check_mask(x_mask, x, "x_mask", validate)
    y_mask, y_bad = _check_mask(y_mask, y, "y_mask", validate)
    (Nx, n, d), (Ny, m, _) = x.shape, y.shape
    with _no_autocast(x.device):
        xc, yc = _zero_padding(x, x_mask, dt), _zero_padding(y, y_mask, dt)
        fx = xc.isfinite().all(2).all(1)[:, None, None]              # sequences that may enter the common centre
        fy = yc.isfinite().all(2).all(1)[:, None, None]
        total = torch.where(fx, xc, 0.0).sum((0, 1)) + torch.where(fy, yc, 0.0).sum((0, 1))
        count = (x_mask & fx[:, :, 0]).sum() + (y_mask & fy[:, :, 0]).sum()
        xc, yc = xc.sub_(total / count), yc.sub_(total / count)
        x2, y2 = torch.linalg.vector_norm(xc, dim=2).square(), torch.linalg.vector_norm(yc, dim=2).square()
        out = torch.empty(Nx, Ny, dtype=dt, device=x.device)
        cj = min(Ny, chunk_size)
        ci = max(1, min(Nx, chunk_size // cj))
        for i in range(0, Nx, ci):
            for j in range(0, Ny, cj):
                a, b = min(ci, Nx - i), min(cj, Ny - j)
                dot = (xc[i:i + a].reshape(a * n, d) @ yc[j:j + b].reshape(b * m, d).T).view(a, n, b, m)
                cost = (x2[i:i + a, :, None, None] + y2[None, None, j:j + b] - 2.0 * dot).clamp_(min=0.0)
                cost = cost.permute(0, 2, 1, 3).reshape(a * b, n, m)
                xm = x_mask[i:i + a, None].expand(a, b, n).reshape(a * b, n)
                ym = y_mask[None, j:j + b].expand(a, b, m).reshape(a * b, m)
                bad = _either(None if x_bad is None else x_bad[i:i + a, None].expand(a, b),
                              None if y_bad is None else y_bad[None, j:j + b].expand(a, b))
                invalid = ~(xm[:, :, None] & ym[:, None, :])
                plan = _solve(cost.masked_fill_(invalid, 0.0), invalid, xm, ym,
                              None if bad is None else bad.reshape(a * b), eps, n_iters)
                out[i:i + a, j:j + b] = (plan * cost).sum((1, 2)).view(a, b)
    return out


# ------------------------------------------------------------------------------------------------------- core
def _cost(x, y, x_mask, y_mask, invalid):
    """(x - c, y - c, C): garbage on padding replaced by 0, both sets centred on the mean c of their valid points,
    C_ij = |x_i|^2 + |y_j|^2 - 2 x_i.y_j >= 0 on valid pairs, 0 elsewhere. One new (B, n, d) tensor per side: on a
    CPU a large allocation costs more than the arithmetic on it (its pages are mapped and zeroed on first touch)."""
    dt = _work_dtype(x, y)
    xc, yc = _zero_padding(x, x_mask, dt), _zero_padding(y, y_mask, dt)
    centre = (xc.sum(1, keepdim=True) + yc.sum(1, keepdim=True)) / (x_mask.sum(1) + y_mask.sum(1)).view(-1, 1, 1)
    xc, yc = xc.sub_(centre), yc.sub_(centre)                            # padded rows: -c, finite, no mass
    x2, y2 = torch.linalg.vector_norm(xc, dim=2, keepdim=True), torch.linalg.vector_norm(yc, dim=2)[:, None, :]
    C = torch.baddbmm(x2.square() + y2.square(), xc, yc.mT, alpha=-2.0).clamp_(min=0.0)
    return xc, yc, C.masked_fill_(invalid, 0.0)


def _solve(C, invalid, x_mask, y_mask, bad, eps, n_iters):
    """The entropic plan P (B, n, m) of the cost C (0 where `invalid`: a padded row or column); its rows are exact.

    P = diag(u) K diag(v) / n with K = exp((F + G - C) / e): the row update u = 1 / K v gives the rows of P the
    sum 1/n, the column update v = 1 / (m/n) K^T u its columns the sum 1/m. Vectors are rows (B, 1, n): a row
    vector times a matrix is the fast form of a batched matrix-vector product."""
    dt, floor = C.dtype, (-700.0 if C.dtype == torch.float64 else -80.0)   # exp(floor): normal, > 0
    xr, yr = x_mask.to(dt)[:, None, :], y_mask.to(dt)[:, None, :]            # (B, 1, n), (B, 1, m): 1 = valid
    n, m = xr.sum(2, keepdim=True), yr.sum(2, keepdim=True)                  # (B, 1, 1)
    mean = C.sum((1, 2), keepdim=True) / (n * m)                                        # NaN if a side is empty
    std = ((C - mean).masked_fill_(invalid, 0.0).square_().sum((1, 2), keepdim=True) / (n * m)).sqrt()
    scale = (std + MEAN_WEIGHT * mean).clamp(min=torch.finfo(dt).tiny / eps)           # equal costs: still > 0
    if bad is not None:
        scale = scale.masked_fill(bad.view(-1, 1, 1), math.nan)                        # NaN for that problem
    levels = max(1, round(ANNEAL * n_iters / LEVEL))
    anneal = min(n_iters, levels * LEVEL)
    powers = [k / (levels - 1) for k in range(levels)] if levels > 1 else [1.0]
    schedule = [scale * eps ** t for t in powers]                                      # e: std(C) ... eps_abs

    F, G = xr.log(), yr.log()                        # potentials: 0 on valid positions, -inf on padding (K = 0)
    low = F.mT + G + floor                           # floor on valid entries, -inf on padding
    G = G + (C - F.mT).amin(1, keepdim=True)         # G_j = min_i C_ij: every column of K has an entry 1
    pad_x, pad_y, ratio = 1.0 - xr, 1.0 - yr, m / n  # K v + 1 on padded rows: u, v = 1 there
    u, v, e = torch.ones_like(xr), torch.ones_like(yr), None
    ones_x, ones_y = u, v
    for k in range(n_iters):
        if k < anneal and k % LEVEL == 0:           # new eps: absorb F += e log u, G += e log v; u = v = 1
            if e is not None:
                F, G, u, v = torch.addcmul(F, e, u.log()), torch.addcmul(G, e, v.log()), ones_x, ones_y
            e = schedule[k // LEVEL]
            K = torch.maximum((F.mT + G - C) / e, low).exp()                   # K = exp((F + G - C) / e)
            Kr, Kt = K * ratio, K.mT.contiguous()                              # (m/n) K, K^T
        if k == anneal:                             # over-relaxed: u <- u^(1-w) (1 / K v)^w, via s = u^((1-w)/w)
            su, sv = u.pow((1.0 - OMEGA) / OMEGA), v.pow((1.0 - OMEGA) / OMEGA)
        if anneal <= k < n_iters - 1:
            q = su / torch.baddbmm(pad_x, v, Kt)                               # q = s / K v
            su = q.pow(1.0 - OMEGA)
            u = q / su                                                         # u = q^w,  s = q^(1-w)
            q = sv / torch.baddbmm(pad_y, u, Kr)
            sv = q.pow(1.0 - OMEGA)
            v = q / sv
        else:
            u = torch.baddbmm(pad_x, v, Kt).reciprocal()                      # u = 1 / K v
            v = torch.baddbmm(pad_y, u, Kr).reciprocal()                      # v = 1 / (m/n) K^T u
    u = torch.baddbmm(pad_x, v, Kt).reciprocal()                              # the rows of P exact
    return K * u.mT * (v / n)                                                  # P = diag(u) K diag(v) / n


class _Transport(torch.autograd.Function):
    """<P, C> forward; backward with the envelope gradient G = P:
    dW/dx_i = 2 sum_j P_ij (x_i - y_j),  dW/dy_j = 2 sum_i P_ij (y_j - x_i)."""

    @staticmethod
    def forward(ctx, x, y, x_mask, y_mask, bad, eps, n_iters):
        with _no_autocast(x.device):
            invalid = ~(x_mask[:, :, None] & y_mask[:, None, :])              # (B, n, m): a padded row or column
            xc, yc, C = _cost(x.detach(), y.detach(), x_mask, y_mask, invalid)
            P = _solve(C, invalid, x_mask, y_mask, bad, eps, n_iters)
        ctx.save_for_backward(xc, yc, P)
        ctx.dtypes = x.dtype, y.dtype
        return (P * C).sum((1, 2))

    @staticmethod
    def backward(ctx, grad):
        xc, yc, P = ctx.saved_tensors
        with _no_autocast(xc.device):
            P = P * (2.0 * grad.to(P.dtype)).view(-1, 1, 1)
            gx = gy = None                        # one new tensor each: x_i sum_j P_ij - sum_j P_ij y_j, in place
            if ctx.needs_input_grad[0]:
                gx = torch.bmm(P, yc).neg_().addcmul_(xc, P.sum(2, keepdim=True)).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                gy = torch.bmm(P.mT, xc).neg_().addcmul_(yc, P.sum(1)[:, :, None]).to(ctx.dtypes[1])
        return gx, gy, None, None, None, None, None


# ------------------------------------------------------------------------------------------------------- inputs
def _work_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _zero_padding(x, mask, dt):
    return x.to(dt, copy=True).masked_fill_(~mask[:, :, None], 0.0)


def _no_autocast(device):
    """Autocast off inside: it would run the cost's matrix product in bf16 / fp16."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()                      # e.g. the meta device


def _either(a, b):
    return b if a is None else a if b is None else a | b


def _check_points(x, y, batched):
    for t, name in ((x, "x"), (y, "y")):
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got "
                             f"{t.dtype if torch.is_tensor(t) else type(t).__name__}")
    batch = "B" if batched else "Nx/Ny"
    if x.dim() != 3 or y.dim() != 3 or x.shape[2] != y.shape[2] or (batched and x.shape[0] != y.shape[0]):
        raise ValueError(f"expected x ({batch}, n, d) and y ({batch}, m, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} and y on {y.device}: they must be on one device")


def _check_params(eps, n_iters, dt):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0 (relative to the cost scale), got {eps!r}")
    if eps < EPS_MIN[dt]:
        raise ValueError(f"eps={eps:g} is below {EPS_MIN[dt]:g}, the smallest eps the solver represents in {dt} "
                         f"(ot.EPS_MIN): its exponents (F + G - C) / eps would lose whole units")
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral) or n_iters < 1:
        raise ValueError(f"n_iters must be an integer >= 1, got {n_iters!r}")


def _check_mask(mask, points, name, validate):
    """-> (bool mask, (B,) bool "this problem's mask holds values other than 0 / 1" or None). No host sync
    unless validate."""
    shape = tuple(points.shape[:2])
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=points.device), None
    if not torch.is_tensor(mask):
        raise ValueError(f"{name} must be a tensor (bool, True = valid position), got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {shape} (batch, positions)")
    if mask.device != points.device:
        raise ValueError(f"{name} is on {mask.device} but the points are on {points.device}")
    if mask.is_complex():
        raise ValueError(f"{name} must be bool, or hold only 0 and 1, got a complex tensor")
    bad = None                                           # an empty side gives NaN by itself (0 / 0)
    if mask.dtype != torch.bool:
        bad = ((mask != 0) & (mask != 1)).any(1)         # e.g. an additive 0 / -inf mask
        mask = mask == 1
    if validate:
        _raise_if_bad(mask, bad, name)
    return mask, bad


def _raise_if_bad(mask, bad, name):
    """The host-side checks of validate=True (one synchronisation)."""
    for flags, problem in ((bad, "holds values other than 0 and 1 (an additive 0 / -inf mask? use mask == 0); "
                                 "masks must be bool, or hold only 0 and 1 (True / 1 = valid position)"),
                           (~mask.any(1), "has no valid position: every problem needs at least one valid point "
                                          "on each side")):
        index = [] if flags is None else flags.nonzero().flatten().tolist()
        if index:
            more = f" (and {len(index) - 1} more)" if len(index) > 1 else ""
            raise ValueError(f"{name} in batch index {index[0]}{more} {problem}")

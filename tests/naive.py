"""An independent float64 implementation of every loss, one row at a time, in NumPy.

Values come straight from the definitions, gradients from the closed forms derived in the spec
(§0, §1b, §2b, §3b, §4b) — not from autograd — so agreement with the reference checks both.
Each function returns (loss, gradient w.r.t. the student input) for the given reduction.
"""
from __future__ import annotations

import numpy as np


def _log_softmax(v):
    shifted = v - v.max()
    return shifted - np.log(np.exp(shifted).sum())


def _onehot(y, size):
    e = np.zeros(size)
    e[y] = 1.0
    return e


def _reduce(rows, grads, counted, reduction, mean_divisor):
    rows = np.where(counted, rows, 0.0)
    grads = grads * counted[:, None]
    if reduction == "none":
        return rows, grads  # gradient of each row's loss
    n = max(int(counted.sum()), 1)
    divisor = {"sum": 1, "batchmean": n, "mean": n * mean_divisor}[reduction]
    return rows.sum() / divisor, grads / divisor


def _counted(target, n, ignore_index=-100):
    return np.ones(n, bool) if target is None else np.asarray(target) != ignore_index


def _kd_terms(h_s, h_t_log_q, y, T, alpha):
    """Loss and ∂/∂h of α·T²·KL(q ‖ σ_T(h)) + (1 − α)·CE(h, y) for one row."""
    log_p = _log_softmax(h_s / T)
    q = np.exp(h_t_log_q)
    kl = sum(qc * (lqc - lpc) for qc, lqc, lpc in zip(q, h_t_log_q, log_p) if qc > 0)
    loss = alpha * T * T * kl
    grad = alpha * T * (np.exp(log_p) - q)
    if alpha < 1:
        log_p1 = _log_softmax(h_s)
        loss += (1 - alpha) * -log_p1[y]
        grad = grad + (1 - alpha) * (np.exp(log_p1) - _onehot(y, len(h_s)))
    return loss, grad


def kd(zs, zt, y=None, *, T=4.0, alpha=1.0, reduction="batchmean", ignore_index=-100):
    n, c = zs.shape
    counted = _counted(y, n, ignore_index)
    rows, grads = np.zeros(n), np.zeros((n, c))
    for i in range(n):
        if counted[i]:
            label = None if y is None else y[i]
            rows[i], grads[i] = _kd_terms(zs[i], _log_softmax(zt[i] / T), label, T, alpha)
    return _reduce(rows, grads, counted, reduction, c)


def _normalise(z, how, kappa, eps):
    """(h, backward) where backward maps ∂ℓ/∂h to ∂ℓ/∂z (spec §1b and its l2 / standardize analogues)."""
    c = len(z)
    if how == "layernorm":
        x = z - z.mean()
        s = np.sqrt((x * x).mean() + eps)
        xhat = x / s
        return kappa * xhat, lambda g: kappa / s * (g - g.mean() - xhat * (g * xhat).mean())
    if how == "l2":
        norm = max(np.sqrt((z * z).sum()), eps)
        zhat = z / norm
        return kappa * zhat, lambda g: kappa / norm * (g - zhat * (zhat @ g))
    if how == "standardize":
        x = z - z.mean()
        std = np.sqrt((x * x).sum() / max(c - 1, 1))
        a = std + eps
        def backward(g):
            first = kappa / a * (g - g.mean())
            if std == 0:
                return first
            return first - kappa / a**2 * (g @ x) * x / (max(c - 1, 1) * std)
        return kappa * x / a, backward
    raise ValueError(how)


def skd(zs, zt, y=None, *, T=4.0, kappa=2.0, alpha=1.0, eps=1e-7, how="layernorm", reduction="batchmean",
        ignore_index=-100):
    n, c = zs.shape
    counted = _counted(y, n, ignore_index)
    rows, grads = np.zeros(n), np.zeros((n, c))
    for i in range(n):
        if counted[i]:
            h_s, backward = _normalise(zs[i], how, kappa, eps)
            h_t, _ = _normalise(zt[i], how, kappa, eps)
            label = None if y is None else y[i]
            rows[i], g = _kd_terms(h_s, _log_softmax(h_t / T), label, T, alpha)
            grads[i] = backward(g)
    return _reduce(rows, grads, counted, reduction, c)


def partial_teacher_target(zt_row, y, T):
    """q^pt from the plain softmax (not the log-space route of the reference)."""
    q = np.exp(_log_softmax(zt_row / T))
    c = len(q)
    rho = q[y]
    target = np.full(c, (1 - rho) / max(c - 1, 1))
    target[y] = rho
    return target


def partial_teacher(zs, zt, y, *, T=1.0, alpha=0.5, reduction="batchmean", ignore_index=-100):
    n, c = zs.shape
    counted = _counted(y, n, ignore_index)
    rows, grads = np.zeros(n), np.zeros((n, c))
    for i in range(n):
        if counted[i]:
            q = partial_teacher_target(zt[i], y[i], T)
            with np.errstate(divide="ignore"):
                log_q = np.log(q)
            rows[i], grads[i] = _kd_terms(zs[i], log_q, y[i], T, alpha)
    return _reduce(rows, grads, counted, reduction, c)


def label_smoothing(zs, y, *, eps=0.1, reduction="mean", ignore_index=-100):
    n, c = zs.shape
    counted = _counted(y, n, ignore_index)
    rows, grads = np.zeros(n), np.zeros((n, c))
    for i in range(n):
        if counted[i]:
            log_p = _log_softmax(zs[i])
            target = (1 - eps) * _onehot(y[i], c) + eps / c
            rows[i] = -(target * log_p).sum()
            grads[i] = np.exp(log_p) - target
    return _reduce(rows, grads, counted, reduction, 1)


def reweighted_ce(zs, zt, y, *, alpha=0.5, T=1.0, delta=1e-6, reduction="mean", ignore_index=-100):
    n, c = zs.shape
    counted = _counted(y, n, ignore_index)
    rows, grads = np.zeros(n), np.zeros((n, c))
    for i in range(n):
        if counted[i]:
            p = np.exp(_log_softmax(zs[i]))
            rho = np.exp(_log_softmax(zt[i] / T))[y[i]]
            w = 1 - alpha * (1 - rho) / max(1 - p[y[i]], delta)
            rows[i] = -w * np.log(p[y[i]])
            grads[i] = w * (p - _onehot(y[i], c))
    return _reduce(rows, grads, counted, reduction, 1)


def nd(u, ft, y, centres, *, reduction="mean", ignore_index=-100, eps=1e-8):
    n, d = u.shape
    counted = _counted(y, n, ignore_index)
    rows, grads = np.zeros(n), np.zeros((n, d))
    for i in range(n):
        if not counted[i]:
            continue
        centre = centres[y[i]]
        e = centre / max(np.sqrt(centre @ centre), eps)
        u_norm, t_norm = np.sqrt(u[i] @ u[i]), np.sqrt(ft[i] @ ft[i])
        if u_norm >= t_norm and u_norm >= eps:      # cosine branch (ties included)
            uhat = u[i] / u_norm
            rows[i] = 1 - uhat @ e
            grads[i] = -(e - (uhat @ e) * uhat) / u_norm
        else:                                       # linear branch
            scale = max(t_norm, eps)
            rows[i] = 1 - (u[i] @ e) / scale
            grads[i] = -e / scale
    return _reduce(rows, grads, counted, reduction, 1)


def nystrom(fs, ft, cs, ct, *, kind="smooth_l1", normalize=True, reduction="sum", beta=1.0, eps=1e-12):
    n, m = fs.shape[0], cs.shape[0]
    residual = np.zeros((n, m))
    teacher_sq = 0.0
    for i in range(n):
        for k in range(m):
            teacher_entry = ft[i] @ ct[k]
            residual[i, k] = fs[i] @ cs[k] - teacher_entry
            teacher_sq += teacher_entry**2
    scale = 1 / (np.sqrt(teacher_sq) + eps) if normalize else 1.0
    if kind == "fro":
        norm = np.sqrt((residual**2).sum())
        slope = residual / norm if norm > 0 else np.zeros_like(residual)
        return norm * scale, slope @ cs * scale
    if kind == "smooth_l1":
        small = np.abs(residual) < beta
        elements = np.where(small, 0.5 * residual**2 / beta, np.abs(residual) - 0.5 * beta)
        slope = np.where(small, residual / beta, np.sign(residual))
    else:
        elements, slope = residual**2, 2 * residual
    rows, grads = elements.sum(1) * scale, slope @ cs * scale
    if reduction == "none":
        return rows, grads
    divisor = 1 if reduction == "sum" else max(n * m, 1)
    return rows.sum() / divisor, grads / divisor

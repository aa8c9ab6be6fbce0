"""The kernel contract every fused backend (cpu, cuda, triton) implements: the code tables of the
kernels' integer options, and the translation of a public loss's options into kernel parameters.

The integer codes are those of the C++ enums in ``csrc/common/contract.h`` (``kNormNone`` …
``kNormStandardize``, ``kTeacherNone`` … ``kTeacherPartial``, ``kGramSmoothL1`` / ``kGramSquared``);
this module is the only Python copy of them.

Row-softmax kernel (KD, SKD, KD-pt, label smoothing, re-weighted CE), per row z ∈ ℝ^C with label y,
in these stages (the same names in the C++ and Triton kernels):

``normalisation_map``
    row statistics → the positive affine map h = scale·(z − mean): identity for ``none``;
    ``layernorm`` mean μ, scale κ/√(var + ε) with the biased var; ``l2`` mean 0, scale κ/max(‖z‖, ε);
    ``standardize`` mean μ, scale κ/(σ + ε) with the unbiased σ = √max(var, tiny).
    Its backward factors (c1, c2) give  ∂ℓ/∂z = scale·(g − c1·mean(g)) − scale·c2·Σ_j g_j(z_j − μ)·(z − μ)
    for g = ∂ℓ/∂h: layernorm c1 = 1, c2 = 1/(C(var + ε)); l2 c1 = 0, c2 = 1/‖z‖² (0 where the clamp
    holds); standardize c1 = 1, c2 = 1/((C − 1)σ(σ + ε)) (0 where σ is clamped).
``exp_shift``
    the shift of a set's exponentials: its max, or 0 when the max is −inf (an all-masked set,
    whose sum of exponentials is then 0). log softmax(h/T)_c = (h_c − m)/T − log Σ_j exp((h_j − m)/T).
``partial teacher``
    log ρ = z^t_y/T − lse(z^t/T) from the raw teacher; log q_other = lse_{c≠y}(z^t/T) − lse(z^t/T)
    − log(C − 1), from the log-sum-exp over c ≠ y (never log(1 − ρ)); −inf when every c ≠ y is
    −inf or C = 1.
``kl_entry``
    q·(log q − log p), with 0·log 0 = 0 only where q == 0 exactly (NaN stays NaN; q > 0 where
    log p = −inf gives +inf).
``divergence_entry``
    the divergence term D(p_T, q) of a ``softmax`` teacher, for any ``divergence`` (code table
    DIVERGENCE_CODES), per entry j from p = p_T,j, q = q_j and their logs: its loss term d_j and
    π_j = p_j·∂D/∂p_j (up to a constant in ∂D/∂p, which cancels), so that
    ∂D/∂h_j = (π_j − p_j·Σ_i π_i)/T. With the mixture m = w·x + (1 − w)·y of the form and the
    convention 0·log 0 = 0 decided on x == 0 *before* any difference of logs is formed:

    ================  =========================================  ========================================
    divergence        d_j                                        π_j
    ================  =========================================  ========================================
    forward_kl        q·(log q − log p)                          −q
    reverse_kl        p·(log p − log q)                          p·(log p − log q)
    mixed_kl (w)      w·fkl_j + (1 − w)·rkl_j                    −w·q + (1 − w)·p·(log p − log q)
    jsd (β)           β·q·log(q/m) + (1 − β)·p·log(p/m),         (1 − β)·p·log(p/m)
                      m = β·q + (1 − β)·p
    tvd               ½·|p − q|                                  ½·p·sign(p − q), sign(0) = 0
    skew_forward_kl   q·log(q/m), m = α·q + (1 − α)·p            −(1 − α)·p·q/m
    (α)
    skew_reverse_kl   p·log(p/m), m = α·p + (1 − α)·q            p·(log(p/m) − α·p/m)
    (α)
    ================  =========================================  ========================================

    w, β and α are the kernel's ``divergence_param``; the endpoints (β ∈ {0, 1}, α = 0, w ∈ {0, 1})
    are mapped to the plain KLs before a kernel sees them (:func:`canonical_divergence`), so the
    mixtures' logs are always of a positive weight. log m = logaddexp(log w + log x, log(1 − w) + log y).
    ``forward_kl`` is the classic KD term (what ``kl_entry`` and the KL coefficients compute).
``row_coefficients``
    the per-row scalars of the loss and the logit gradient, with w = 1 or the detached
    re-weighting w = 1 − α_rw·(1 − ρ)/max(1 − p_y, ε_rw) (ρ from the raw teacher at T)::

        ∂ℓ/∂h = kl_w/T·(p_T − q) + ce_w·w·(p − e_y) + u_w·(p − 1/C)
        ℓ     = kl_w·Σ_c kl_entry(q_c, log q_c, log p_T,c) + ce_w·w·(−log p_y) + u_w·(−mean_c log p_c)

    (for a divergence other than ``forward_kl``, the KL term's loss is kl_w·Σ_j d_j and its
    gradient kl_w/T·(π − p_T·Σπ), see ``divergence_entry``)

    with p_T = softmax(h^s/T), p = softmax(h^s); q = softmax(h^t/T) (``softmax`` teacher, h^t the
    teacher under the same normalisation) or the partial teacher (ρ at y, q_other elsewhere).
``logit_gradient``, ``normalisation_backward``
    the two lines above, applied per entry (the second only when normalising).

Special values: a −inf logit is a masked entry of probability 0; a NaN anywhere in a row (student
or teacher) makes that row's loss and its whole gradient row NaN; a row whose label equals the
kernel's ``ignore_index`` gets loss 0 and an all-zero gradient row whatever it holds. Labels are
int64 (the wrappers widen narrower integer labels) and may have any stride.

Feature–centre kernel (ND): ℓ = 1 − ⟨u, ê_y⟩/M, ê_y = c_y/max(‖c_y‖, ε), M = max(‖u‖ or ‖f^t‖, ε)
(a tie takes ‖u‖), ∂ℓ/∂u = −ê_y/M + [M = ‖u‖ > ε]·⟨u, ê_y⟩·u/‖u‖³; ignored rows as above, other
labels in [0, num_centres).

Landmark-Gram kernel (Nyström / KDA): R = F^s·C^sᵀ − F^t·C^tᵀ, per-row sums of huber_β(R)
(huber_β(r) = r²/(2β) if |r| < β else |r| − β/2, derivative r/β or r/|r|) or of R² (derivative 2R),
both times ``weight`` and, with ``normalize``, divided by ‖F^t·C^tᵀ‖_F + eps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..reference.rowsoftmax import default_skd_multiplier

#: ``normalize`` option → kernel code (C++ ``kNormNone``, ``kNormLayerNorm``, ``kNormL2``, ``kNormStandardize``)
NORMALIZE_CODES = {"none": 0, "layernorm": 1, "l2": 2, "standardize": 3}
#: teacher distribution of the KL term → kernel code (C++ ``kTeacherNone``, ``kTeacherSoftmax``, ``kTeacherPartial``)
TEACHER_CODES = {"none": 0, "softmax": 1, "partial": 2}
#: the divergence term of a ``softmax`` teacher → kernel code (C++ ``kDivForwardKL`` … ``kDivSkewReverseKL``)
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "mixed_kl": 2, "jsd": 3, "tvd": 4, "skew_forward_kl": 5,
                    "skew_reverse_kl": 6}
#: landmark-Gram residual loss → kernel code (C++ ``kGramSmoothL1``, ``kGramSquared``)
GRAM_KIND_CODES = {"smooth_l1": 0, "sq_fro": 1}

#: the kernels' ``ignore_index`` when the public one is None: no int64 label equals it in practice
#: (labels are class indices ≥ 0 or a small negative ignore value), so no row is ignored
NO_IGNORE_INDEX = -(2**63)


def kernel_ignore_index(ignore_index: Optional[int]) -> int:
    """The kernels' ignore_index for a public one (None: :data:`NO_IGNORE_INDEX`, no row ignored)."""
    return NO_IGNORE_INDEX if ignore_index is None else int(ignore_index)


@dataclass(frozen=True)
class RowSoftmaxParams:
    """The row-softmax kernel's parameters (see the module docstring for the formulas)."""
    normalize: str = "none"          # a key of NORMALIZE_CODES
    multiplier: float = 1.0          # κ (> 0)
    eps: float = 1e-7
    temperature: float = 1.0
    teacher: str = "none"            # a key of TEACHER_CODES
    kl_weight: float = 0.0
    ce_weight: float = 0.0
    uniform_weight: float = 0.0
    reweight: bool = False
    reweight_alpha: float = 0.0
    reweight_eps: float = 1e-6
    ignore_index: int = -100         # the public default; NO_IGNORE_INDEX: no row ignored
    divergence: str = "forward_kl"   # a key of DIVERGENCE_CODES: the KL term's form (softmax teacher only)
    divergence_param: float = 0.0    # its weight: w (mixed_kl), β (jsd), α (skew forms), strictly inside (0, 1)

    @property
    def needs_target(self) -> bool:
        return self.ce_weight != 0 or self.uniform_weight != 0 or self.teacher == "partial" or self.reweight


def canonical_divergence(divergence: str, *, beta: float = 0.5, skew_alpha: float = 0.1,
                         mixed_kl_weight: float = 0.5) -> tuple[str, float]:
    """(kernel ``divergence``, ``divergence_param``) for a public divergence: the endpoints of the
    weighted forms become the plain KLs (JSD β = 0 is forward KL and β = 1 reverse KL exactly, as
    TRL defines it; a skew α = 0 is the unskewed KL; a mixed weight of 1 or 0 one KL alone)."""
    if divergence == "jsd":
        if beta == 0:
            return "forward_kl", 0.0
        if beta == 1:
            return "reverse_kl", 0.0
        return "jsd", float(beta)
    if divergence == "mixed_kl":
        if mixed_kl_weight == 1:
            return "forward_kl", 0.0
        if mixed_kl_weight == 0:
            return "reverse_kl", 0.0
        return "mixed_kl", float(mixed_kl_weight)
    if divergence in ("skew_forward_kl", "skew_reverse_kl"):
        if skew_alpha == 0:
            return divergence.removeprefix("skew_"), 0.0
        return divergence, float(skew_alpha)
    if divergence not in DIVERGENCE_CODES:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, DIVERGENCE_CODES))}; got {divergence!r}")
    return divergence, 0.0


def row_softmax_params(loss: str, **options) -> tuple[RowSoftmaxParams, str, str]:
    """(kernel parameters, reduction, kind of "mean") for a public row-softmax loss and its options.

    ``divergence_loss`` (α, T, t2_scaling, divergence and its weight): kl_w = α (α·T² with
    t2_scaling), ce_w = 1 − α, a ``softmax`` teacher; the options' logit transforms are applied
    before the kernel. ``kd_loss`` / ``skd_loss`` / ``partial_teacher_loss`` (α, T): kl_w = α·T², ce_w = 1 − α, the
    teacher ``softmax`` (SKD: with the student's normalisation and κ, ε) or ``partial``; "mean"
    divides by rows·C ("kl"). ``label_smoothing_loss`` (ε): ce_w = 1 − ε, u_w = ε.
    ``reweighted_ce_loss`` (α, T, eps): ce_w = 1 with the re-weighting. Their "mean" divides by
    rows ("ce"). A None ignore_index becomes :data:`NO_IGNORE_INDEX`."""
    ignore = kernel_ignore_index(options.get("ignore_index"))
    reduction = options["reduction"]
    if loss in ("kd_loss", "skd_loss", "partial_teacher_loss"):
        temperature, alpha = options["temperature"], options["alpha"]
        common = dict(temperature=temperature, kl_weight=alpha * temperature**2, ce_weight=1 - alpha,
                      ignore_index=ignore)
        if loss == "kd_loss":
            params = RowSoftmaxParams(teacher="softmax", **common)
        elif loss == "skd_loss":
            multiplier = options.get("multiplier")
            if multiplier is None:  # the reference's default: each normalisation's published κ
                multiplier = default_skd_multiplier(options["normalize"])
            params = RowSoftmaxParams(teacher="softmax", normalize=options["normalize"],
                                      multiplier=multiplier, eps=options["eps"], **common)
        else:
            params = RowSoftmaxParams(teacher="partial", **common)
        return params, reduction, "kl"
    if loss == "divergence_loss":
        temperature, alpha = options["temperature"], options["alpha"]
        divergence, param = canonical_divergence(options["divergence"], beta=options["beta"],
                                                 skew_alpha=options["skew_alpha"],
                                                 mixed_kl_weight=options["mixed_kl_weight"])
        t2 = temperature**2 if options["t2_scaling"] else 1.0
        return RowSoftmaxParams(teacher="softmax", temperature=temperature, kl_weight=alpha * t2,
                                ce_weight=1 - alpha, ignore_index=ignore, divergence=divergence,
                                divergence_param=param), reduction, "kl"
    if loss == "label_smoothing_loss":
        smoothing = options["smoothing"]
        return RowSoftmaxParams(ce_weight=1 - smoothing, uniform_weight=smoothing, ignore_index=ignore), \
            reduction, "ce"
    if loss == "reweighted_ce_loss":
        return RowSoftmaxParams(temperature=options["temperature"], ce_weight=1.0, reweight=True,
                                reweight_alpha=options["alpha"], reweight_eps=options["eps"],
                                ignore_index=ignore), reduction, "ce"
    raise KeyError(loss)

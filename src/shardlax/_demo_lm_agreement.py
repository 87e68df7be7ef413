"""When the demo calls the sharded losses those of one device (`agreement`), in words (`describe`).

The reasoning (f32 summation order; the permuted one-device run that measures
how far rounding alone drifts) is in `shardlax._demo_lm`'s module docstring.
"""

from __future__ import annotations

import numpy as np

#: relative agreement of the first steps: the f32 row of the test suite's one tolerance
#: table (tests/utils.py TOLERANCES; tests/test_demo.py holds the two equal)
F32_RTOL = 2e-5


def agreement(losses_s, losses_1, losses_p, exact_steps: int, drift_factor: float) -> dict:
    """Are the sharded losses those of one device? See the module docstring.

    Steps `[0, exact_steps)`: relative difference <= F32_RTOL. Every later
    step t: relative difference <= max(F32_RTOL, drift_factor * the largest
    relative difference of the permuted one-device run up to step t).
    """
    ref = np.asarray(losses_1, np.float64)
    scale = np.maximum(np.abs(ref), 1e-30)
    rel_s = np.abs(np.asarray(losses_s, np.float64) - ref) / scale
    rel_p = np.abs(np.asarray(losses_p, np.float64) - ref) / scale
    k = min(exact_steps, len(rel_s))
    bound = np.maximum(F32_RTOL, drift_factor * np.maximum.accumulate(rel_p))
    bound[:k] = F32_RTOL
    finite = bool(np.all(np.isfinite(losses_s)) and np.all(np.isfinite(losses_1)))
    over = np.flatnonzero(~(rel_s <= bound))
    return {
        "ok": finite and over.size == 0,
        "finite": finite,
        "exact_steps": k,
        "f32_rtol": F32_RTOL,
        "drift_factor": drift_factor,
        "max_rel_exact": float(rel_s[:k].max()) if k else 0.0,
        "max_rel_sharded": float(rel_s.max()),
        "max_rel_permuted": float(rel_p.max()),
        "first_step_over": int(over[0]) if over.size else None,
        "rel_sharded": rel_s.tolist(),
        "rel_permuted": rel_p.tolist(),
        "bound": bound.tolist(),
    }


def describe(check: dict, steps: int) -> str:
    """The agreement check in words: what was compared with what."""
    k = check["exact_steps"]
    lines = [
        f"steps 0-{k - 1}: max relative difference sharded vs 1 device "
        f"{check['max_rel_exact']:.1e} (must be <= {check['f32_rtol']:g}, the f32 tolerance)"
        if k
        else "no step checked for exact agreement (--exact-steps 0)"
    ]
    if steps > k:
        lines.append(
            f"steps {k}-{steps - 1}: max {check['max_rel_sharded']:.1e}; rounding alone (1 device, "
            f"batch rows permuted) drifted {check['max_rel_permuted']:.1e}, and the sharded run "
            f"may drift {check['drift_factor']:g}x that by each step (at least {F32_RTOL:g})"
        )
    if not check["finite"]:
        lines.append("a loss is not finite")
    elif check["first_step_over"] is not None:
        t = check["first_step_over"]
        lines.append(
            f"first step over its bound: {t} ({check['rel_sharded'][t]:.1e} > "
            f"{check['bound'][t]:.1e})"
        )
    return "\n".join(lines)

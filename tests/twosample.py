"""Two-sample histogram test shared by the test modules (not a test file)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def two_sample_chi2(a: np.ndarray, b: np.ndarray) -> tuple[float, int, float]:
    """Chi-square test that two histograms (counts) share one shape (Press et al., Numerical Recipes, 14.3.2):
    chi2 = sum (sqrt(B/A) a - sqrt(A/B) b)^2 / (a + b) over bins with a + b > 0; dof = bins - 1.
    Returns (chi2, dof, p-value)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    A, B = a.sum(), b.sum()
    chi2 = float((((math.sqrt(B / A) * a - math.sqrt(A / B) * b) ** 2) / (a + b)).sum())
    dof = int(keep.sum()) - 1
    return chi2, dof, float(stats.chi2.sf(chi2, dof))

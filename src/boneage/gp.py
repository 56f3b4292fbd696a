"""Greulich-Pyle standard deviations of bone age by chronological age and sex, and the Z-score.

Source: Greulich & Pyle, Radiographic Atlas of Skeletal Development of the Hand and Wrist, 2nd ed.,
Stanford University Press 1959, Brush Foundation data (mean skeletal age and its SD in months by
chronological age and sex, as reproduced in public bone age software; see docs/gp-sd.md).

Between tabulated ages the SD is interpolated linearly; outside the table the nearest row is used
and the result says so. Interpretation by the two-SD rule: |Z| <= 2 normal, Z > 2 advanced,
Z < -2 delayed.
"""

from __future__ import annotations

import numpy as np

from boneage.errors import InputError

# (chronological age in years, mean bone age in months, SD in months)
GP_MALE = (
    (0.25, 3.01, 0.69), (0.5, 6.09, 1.13), (0.75, 9.56, 1.43), (1, 12.74, 1.97), (1.5, 19.36, 3.52),
    (2, 25.97, 3.92), (2.5, 32.40, 4.52), (3, 38.21, 5.08), (3.5, 43.89, 5.40), (4, 49.04, 6.66),
    (4.5, 56.00, 8.36), (5, 62.43, 8.79), (6, 75.46, 9.17), (7, 88.20, 8.91), (8, 101.38, 9.10),
    (9, 113.90, 9.00), (10, 125.68, 9.79), (11, 137.32, 10.09), (12, 148.82, 10.38), (13, 158.39, 10.44),
    (14, 170.02, 10.72), (15, 182.72, 11.32), (16, 195.32, 12.86), (17, 206.21, 13.05),
)
GP_FEMALE = (
    (0.25, 3.02, 0.72), (0.5, 6.04, 1.16), (0.75, 9.05, 1.36), (1, 12.04, 1.77), (1.5, 18.22, 3.49),
    (2, 24.16, 4.64), (2.5, 30.96, 5.37), (3, 36.63, 5.97), (3.5, 43.50, 7.48), (4, 50.14, 8.98),
    (4.5, 60.06, 10.73), (5, 66.21, 11.65), (6, 78.50, 10.23), (7, 89.30, 9.64), (8, 100.66, 10.23),
    (9, 113.86, 10.74), (10, 125.66, 11.73), (11, 137.86, 11.94), (12, 149.62, 10.24), (13, 162.28, 10.67),
    (14, 174.25, 11.30), (15, 183.62, 9.23), (16, 189.44, 7.31),
)
GP_SOURCE = ("Greulich & Pyle, Radiographic Atlas of Skeletal Development of the Hand and Wrist, 2nd ed., "
             "Stanford University Press 1959, Brush Foundation data")
Z_LIMIT = 2.0


def gp_table(male: bool) -> np.ndarray:
    """The table for one sex as an (n, 3) array: age in months, mean bone age, SD (months)."""
    rows = np.array(GP_MALE if male else GP_FEMALE, dtype=float)
    rows[:, 0] *= 12.0
    return rows


def gp_sd(chronological_age_months: float, male: bool) -> tuple[float, str]:
    """SD of bone age (months) at this chronological age and sex, and a note ('' when inside the table).

    Linear interpolation between rows; outside the table the nearest row, with a note saying so.
    """
    age = float(chronological_age_months)
    if not np.isfinite(age) or age < 0:
        raise InputError(f"chronological age must be a non-negative number of months, got {chronological_age_months!r}")
    table = gp_table(male)
    ages, sds = table[:, 0], table[:, 2]
    note = ""
    if age < ages[0] or age > ages[-1]:
        nearest = ages[0] if age < ages[0] else ages[-1]
        note = (f"chronological age {age:.1f} months is outside the Greulich-Pyle table for "
                f"{'males' if male else 'females'} ({ages[0]:.0f}-{ages[-1]:.0f} months); "
                f"the SD of the nearest row ({nearest:.0f} months) is used")
    return float(np.interp(age, ages, sds)), note  # np.interp holds the end values outside


def interpret_z(z: float) -> str:
    """Two-SD rule: 'advanced' (z > 2), 'delayed' (z < -2), else 'normal'."""
    if z > Z_LIMIT:
        return "advanced"
    if z < -Z_LIMIT:
        return "delayed"
    return "normal"


def assess_against_gp(bone_age_months: float, chronological_age_months: float, male: bool) -> dict:
    """Difference, SD, Z-score and interpretation of a bone age against the chronological age."""
    sd, note = gp_sd(chronological_age_months, male)
    diff = float(bone_age_months) - float(chronological_age_months)
    z = diff / sd
    out = {
        "chronological_age_months": round(float(chronological_age_months), 2),
        "difference_months": round(diff, 2),
        "gp_sd_months": round(sd, 2),
        "z_score": round(z, 2),
        "interpretation": interpret_z(z),
        "gp_source": GP_SOURCE,
    }
    if note:
        out["gp_note"] = note
    return out

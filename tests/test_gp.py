"""Greulich-Pyle SD table and Z-scores on known table values."""

import pytest

from boneage.errors import InputError
from boneage.gp import GP_SOURCE, assess_against_gp, gp_sd, gp_table, interpret_z


def test_table_rows_known_values():
    assert gp_sd(120.0, male=True) == (pytest.approx(9.79), "")  # males 10 years
    assert gp_sd(120.0, male=False)[0] == pytest.approx(11.73)  # females 10 years
    assert gp_sd(3.0, male=True)[0] == pytest.approx(0.69)  # 0.25 years
    assert gp_sd(192.0, male=False)[0] == pytest.approx(7.31)  # females 16 years, the last row
    assert gp_table(True).shape == (24, 3) and gp_table(False).shape == (23, 3)


def test_linear_interpolation_between_rows():
    # males 5 y (60 mo, SD 8.79) and 6 y (72 mo, SD 9.17): halfway 8.98
    assert gp_sd(66.0, male=True)[0] == pytest.approx(8.98)
    # females 12 y (10.24) and 13 y (10.67): a quarter of the way 10.3475
    assert gp_sd(147.0, male=False)[0] == pytest.approx(10.3475)


def test_outside_the_table_nearest_row_and_says_so():
    sd, note = gp_sd(216.0, male=False)  # 18 years, table ends at 16
    assert sd == pytest.approx(7.31) and "outside" in note and "nearest row (192 months)" in note
    sd, note = gp_sd(1.0, male=True)
    assert sd == pytest.approx(0.69) and "outside" in note
    sd, note = gp_sd(210.0, male=True)  # 17.5 years, males end at 17
    assert sd == pytest.approx(13.05) and note


def test_z_score_and_two_sd_rule():
    r = assess_against_gp(150.0, 120.0, male=True)  # +30 months at SD 9.79
    assert r["difference_months"] == pytest.approx(30.0)
    assert r["gp_sd_months"] == pytest.approx(9.79)
    assert r["z_score"] == pytest.approx(3.06, abs=0.005)
    assert r["interpretation"] == "advanced" and "gp_note" not in r
    assert r["gp_source"] == GP_SOURCE and "Brush Foundation" in GP_SOURCE
    assert assess_against_gp(100.0, 120.0, male=False)["interpretation"] == "normal"  # z = -1.71
    assert assess_against_gp(90.0, 120.0, male=False)["interpretation"] == "delayed"  # z = -2.56
    assert interpret_z(2.0) == "normal" and interpret_z(-2.0) == "normal" and interpret_z(2.01) == "advanced"
    assert "gp_note" in assess_against_gp(200.0, 230.0, male=True)


def test_bad_age():
    with pytest.raises(InputError):
        gp_sd(-5.0, male=True)
    with pytest.raises(InputError):
        gp_sd(float("nan"), male=True)

"""bench/plot.py: the plot's input from rows, and the PNG (or a clear False without matplotlib)."""

from __future__ import annotations

import sys

import pytest

from peft_fast_bench.plot import plot_ratios, ratio_groups

ROWS = [
    {"case": 1, "variant": "linear", "ratio": 1.0},
    {"case": 1, "variant": "peft", "ratio": 2.5},
    {"case": 1, "variant": "torch", "ratio": 1.5},
    {"case": 2, "variant": "linear", "ratio": 1.0},
    {"case": 2, "variant": "torch", "ratio": 1.25},
]


def test_ratio_groups_leave_out_bare_linear():
    groups = ratio_groups(ROWS, lambda r: f"case {r['case']}", "ratio")
    assert groups == {"case 1": {"peft": 2.5, "torch": 1.5}, "case 2": {"torch": 1.25}}


def test_without_matplotlib_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    path = tmp_path / "f.png"
    assert plot_ratios({"case 1": {"torch": 1.5}}, path, "ratio") is False
    assert not path.exists()
    assert plot_ratios({}, path, "ratio") is False


def test_png_is_written(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (the bench extra)")
    path = tmp_path / "sub" / "f.png"
    assert plot_ratios(ratio_groups(ROWS, lambda r: f"case {r['case']}", "ratio"), path, "ratio") is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

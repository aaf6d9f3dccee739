"""The SVG line chart of mqc.plot: ticks, coordinates read back from the document, gaps for missing values."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from mqc.plot import Panel, Series, nice_ticks, render_svg


@pytest.mark.parametrize(("low", "high", "expected"), [(0.0, 10.0, [0, 2, 4, 6, 8, 10]),
                                                       (12.3, 47.9, [10, 20, 30, 40, 50]),
                                                       (0.31, 0.38, [0.3, 0.32, 0.34, 0.36, 0.38])])
def test_ticks_are_round_and_cover_the_range(low, high, expected):
    assert nice_ticks(low, high) == pytest.approx(expected)


def test_polylines_follow_the_data_and_break_at_missing_values():
    panel = Panel("t", "x", "y", [Series("a", [(0, 1.0), (1, 3.0), (2, None), (3, 2.0), (4, 4.0)]),
                                  Series("b", [(0, 4.0), (4, 0.0)], color=1, dashed=True)])
    root = ET.fromstring(render_svg([panel, Panel("empty", "x", "y", [Series("c", [(0, None)])])]))
    lines = [(p.get("data-label"), [tuple(map(float, xy.split(","))) for xy in p.get("points").split()],
              p.get("stroke-dasharray")) for p in root.iter() if p.tag.endswith("polyline")]
    assert [(label, len(points), dash) for label, points, dash in lines] == [
        ("a", 2, None), ("a", 2, None), ("b", 2, "5,3")]
    (_, first, _), (_, second, _), (_, diagonal, _) = lines
    assert first[0][0] < first[1][0] < second[0][0] < second[1][0]  # x grows to the right
    assert first[1][1] < first[0][1]  # 3.0 is drawn above 1.0
    assert diagonal[0][1] == second[1][1] < second[0][1]  # both 4.0: the top; 2.0 below them
    assert diagonal[1][1] > first[0][1]  # 0.0 below 1.0
    assert any(t.text == "empty: no data" for t in root.iter() if t.tag.endswith("text"))

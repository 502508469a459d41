import re

import h3

from agents.svg import MAX_CELLS, Marker, hex_map_svg
from tests.factories import BERLIN_CELL


def _points(svg: str) -> list[tuple[float, float]]:
    return [
        tuple(map(float, pair.split(",")))
        for points in re.findall(r'points="([^"]+)"', svg)
        for pair in points.split()
    ]


def _view_box(svg: str) -> tuple[float, float]:
    _, _, width, height = map(float, re.search(r'viewBox="([^"]+)"', svg).group(1).split())
    return width, height


def test_each_cell_is_a_hexagon_from_its_h3_boundary_inside_the_view_box():
    cells = h3.grid_disk(BERLIN_CELL, 2)
    svg = hex_map_svg(counts=dict.fromkeys(cells, 1), svg_id="t", title="test")
    polygons = re.findall(r'<polygon[^>]*points="([^"]+)"', svg)
    assert len(polygons) == len(cells) == 19
    assert all(len(p.split()) == 6 for p in polygons)
    width, height = _view_box(svg)
    assert all(0 <= x <= width and 0 <= y <= height for x, y in _points(svg))


def test_north_is_up_and_east_is_right():
    north = h3.latlng_to_cell(60.0, 10.0, 5)
    south = h3.latlng_to_cell(59.5, 10.0, 5)
    east = h3.latlng_to_cell(59.75, 11.0, 5)
    svg = hex_map_svg(counts={north: 1, south: 1, east: 1}, svg_id="t", title="t")
    centres = {}
    for cell, points in re.findall(r'data-cell="([0-9a-f]+)"[^>]*points="([^"]+)"', svg):
        xy = [tuple(map(float, p.split(","))) for p in points.split()]
        centres[cell] = (sum(x for x, _ in xy) / 6, sum(y for _, y in xy) / 6)
    assert centres[north][1] < centres[south][1]
    assert centres[east][0] > centres[north][0]


def test_density_sets_fill_opacity():
    a, b = sorted(h3.grid_ring(BERLIN_CELL, 1))[:2]
    svg = hex_map_svg(counts={a: 10, b: 1, BERLIN_CELL: 0}, svg_id="t", title="t")
    opacity = dict(re.findall(r'data-cell="([0-9a-f]+)"[^>]*fill-opacity="([\d.]+)"', svg))
    assert float(opacity[a]) > float(opacity[b]) > float(opacity[BERLIN_CELL])


def test_cells_across_the_antimeridian_stay_together():
    cells = h3.grid_disk(h3.latlng_to_cell(0.0, 179.99, 6), 1)
    assert {h3.cell_to_latlng(c)[1] > 0 for c in cells} == {True, False}
    svg = hex_map_svg(counts=dict.fromkeys(cells, 1), svg_id="t", title="t")
    width, height = _view_box(svg)
    # One small cluster fills the picture; unwrapped, it would be a sliver 360° wide.
    assert width / height < 3


def test_markers_in_one_cell_do_not_overlap_and_titles_are_escaped():
    markers = [Marker(cell=BERLIN_CELL, label=f"<b>{i}</b>") for i in range(3)]
    svg = hex_map_svg(counts={BERLIN_CELL: 3}, svg_id="t", title="t", markers=markers)
    centres = re.findall(r'<circle[^>]*cx="([\d.]+)" cy="([\d.]+)"', svg)
    assert len(set(centres)) == 3
    assert "<b>" not in svg
    assert "&lt;b&gt;0&lt;/b&gt;" in svg


def test_invalid_cells_are_left_out_and_size_is_bounded():
    cells = list(h3.grid_disk(BERLIN_CELL, 30))
    assert len(cells) > MAX_CELLS
    svg = hex_map_svg(counts={**dict.fromkeys(cells, 1), "nonsense": 5}, svg_id="t", title="t")
    assert svg.count("<polygon") == MAX_CELLS
    assert "nonsense" not in svg
    assert 'id="t-empty"' in hex_map_svg(counts={}, svg_id="t", title="t")

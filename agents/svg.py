"""Server-side SVG pictures of H3 cells for the back office: no JavaScript, no tiles, no
network. Hexagons come from h3.cell_to_boundary, projected equirectangularly (longitude
scaled by the cosine of the mean latitude, which is faithful over a city's extent).

Elements carry stable ids and classes (hex-cell, agent-marker, ...) that the browser test
and the page styles select on; titles give hover tooltips.
"""

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import h3
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

VIEW_WIDTH = 480
PADDING = 12
# Pictures stay a few hundred kilobytes at most, whatever the tenant's size.
MAX_CELLS = 2000
MAX_MARKERS = 120

_FILL = "#417690"  # the admin's own header blue, so the pictures match the page
_SELF = "#ba2121"
_MARKER = "#f5dd5d"


@dataclass(frozen=True, slots=True)
class Marker:
    """A dot drawn in a cell: an agent, with its tooltip."""

    cell: str
    label: str
    css_class: str = "agent-marker"
    element_id: str | None = None


def _unwrap(lng: float, reference: float) -> float:
    # Cells across the antimeridian would otherwise stretch across the whole picture.
    while lng - reference > 180:
        lng -= 360
    while lng - reference < -180:
        lng += 360
    return lng


class _Projection:
    def __init__(self, boundaries: Iterable[Sequence[tuple[float, float]]]):
        points = [point for boundary in boundaries for point in boundary]
        self.reference_lng = points[0][1]
        lats = [lat for lat, _ in points]
        self.kx = math.cos(math.radians(sum(lats) / len(lats)))
        xs = [self._x(lng) for _, lng in points]
        ys = [-lat for lat in lats]
        self.x0, self.y0 = min(xs), min(ys)
        span_x = max(xs) - self.x0 or 1e-9
        span_y = max(ys) - self.y0 or 1e-9
        self.scale = (VIEW_WIDTH - 2 * PADDING) / max(span_x, span_y)
        self.width = VIEW_WIDTH
        self.height = round(span_y * self.scale + 2 * PADDING, 2)
        if span_x < span_y:
            self.width = round(span_x * self.scale + 2 * PADDING, 2)

    def _x(self, lng: float) -> float:
        return _unwrap(lng, self.reference_lng) * self.kx

    def __call__(self, lat: float, lng: float) -> tuple[float, float]:
        x = (self._x(lng) - self.x0) * self.scale + PADDING
        y = (-lat - self.y0) * self.scale + PADDING
        return round(x, 2), round(y, 2)


def _points(projection: _Projection, boundary) -> str:
    return " ".join("{},{}".format(*projection(lat, lng)) for lat, lng in boundary)


def _plural(n: int) -> str:
    return f"{n} agent" if n == 1 else f"{n} agents"


def hex_map_svg(
    *,
    counts: Mapping[str, int],
    svg_id: str,
    title: str,
    markers: Sequence[Marker] = (),
    centre: str | None = None,
) -> SafeString:
    """An SVG of the cells in `counts` (cell -> number of agents), filled darker where
    more agents are, with `markers` drawn as dots in their cells and `centre` outlined.

    Takes at most MAX_CELLS cells (the most populated) and MAX_MARKERS markers; cells
    that are not valid H3 indexes are left out. Returns safe HTML.
    """
    cells = [cell for cell in counts if isinstance(cell, str) and h3.is_valid_cell(cell)]
    cells.sort(key=lambda cell: (-counts[cell], cell))
    cells = cells[:MAX_CELLS]
    if centre is not None and centre not in cells and h3.is_valid_cell(centre):
        cells.append(centre)
    if not cells:
        return mark_safe(f'<p class="hex-map-empty" id="{escape(svg_id)}-empty">No cells.</p>')
    boundaries = {cell: h3.cell_to_boundary(cell) for cell in cells}
    project = _Projection(boundaries.values())
    densest = max((counts.get(cell, 0) for cell in cells), default=0) or 1

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(svg_id)}" class="hex-map" '
        f'role="img" aria-label="{escape(title)}" '
        f'viewBox="0 0 {project.width} {project.height}" '
        f'width="{project.width}" height="{project.height}" '
        'style="max-width:100%;height:auto;background:#f8f8f8;border:1px solid #ddd">',
        f"<title>{escape(title)}</title>",
        '<g class="hex-cells">',
    ]
    for cell in cells:
        count = counts.get(cell, 0)
        opacity = 0.06 + 0.84 * count / densest if count else 0.03
        css = "hex-cell hex-centre" if cell == centre else "hex-cell"
        stroke = f'stroke="{_SELF}" stroke-width="2"' if cell == centre else 'stroke="#999"'
        parts.append(
            f'<polygon class="{css}" data-cell="{escape(cell)}" data-count="{count}" '
            f'points="{_points(project, boundaries[cell])}" fill="{_FILL}" '
            f'fill-opacity="{opacity:.3f}" {stroke} stroke-width="0.6">'
            f"<title>{escape(cell)}: {_plural(count)}</title></polygon>"
        )
    parts.append("</g>")
    if markers:
        parts.append('<g class="agent-markers">')
        parts.extend(_markers(project, boundaries, markers))
        parts.append("</g>")
    parts.append("</svg>")
    return mark_safe("".join(parts))


def _markers(project: _Projection, boundaries, markers: Sequence[Marker]) -> list[str]:
    drawn = [m for m in markers if m.cell in boundaries][:MAX_MARKERS]
    per_cell = Counter(m.cell for m in drawn)
    placed = Counter()
    out = []
    for marker in drawn:
        lat, lng = h3.cell_to_latlng(marker.cell)
        cx, cy = project(lat, lng)
        # Corner to centre distance in picture units, so dots scale with the hexagons.
        corner = project(*boundaries[marker.cell][0])
        size = math.dist((cx, cy), corner)
        n, i = per_cell[marker.cell], placed[marker.cell]
        placed[marker.cell] += 1
        if n > 1:
            # Several agents in one cell sit on a small ring instead of on top of each other.
            angle = 2 * math.pi * i / n
            cx = round(cx + 0.45 * size * math.cos(angle), 2)
            cy = round(cy + 0.45 * size * math.sin(angle), 2)
        is_self = "agent-self" in marker.css_class.split()
        radius = max(size * (0.3 if is_self else 0.16), 2.0)
        colour = _SELF if is_self else _MARKER
        element_id = f' id="{escape(marker.element_id)}"' if marker.element_id else ""
        out.append(
            f'<circle{element_id} class="{escape(marker.css_class)}" '
            f'data-cell="{escape(marker.cell)}" cx="{cx}" cy="{cy}" r="{radius:.2f}" '
            f'fill="{colour}" stroke="#333" stroke-width="0.8">'
            f"<title>{escape(marker.label)}</title></circle>"
        )
    return out


def neighbourhood_svg(*, agent, nearby: Iterable, radius: int) -> SafeString:
    """The cells within `radius` rings of the agent's cell, shaded by how many of the
    `nearby` agents (objects with id, name, status, location_h3) are in each, with a dot
    per nearby agent and a larger one for the agent itself."""
    centre = agent.location_h3
    disk = set(h3.grid_disk(centre, radius))
    others = [a for a in nearby if a.id != agent.id and a.location_h3 in disk]
    counts = dict.fromkeys(disk, 0)
    counts.update(Counter(a.location_h3 for a in others))
    counts[centre] += 1
    markers = [
        Marker(
            cell=centre,
            label=f"{agent.name} (this agent, {agent.status})",
            css_class="agent-marker agent-self",
            element_id="agent-marker-self",
        ),
        *(
            Marker(
                cell=a.location_h3,
                label=f"{a.name} ({a.status})",
                css_class="agent-marker agent-nearby",
            )
            for a in sorted(others, key=lambda a: a.name)
        ),
    ]
    return hex_map_svg(
        counts=counts,
        svg_id="agent-neighbourhood",
        title=f"Agents within {radius} cells of {centre}",
        markers=markers,
        centre=centre,
    )

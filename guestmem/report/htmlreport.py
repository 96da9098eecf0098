"""One self-contained HTML page per run: ``guestmem report SCENARIO -o run.html`` or
``guestmem run SCENARIO --html FILE``.

What it holds: the summary table (the same rows ``guestmem run`` prints), the guest physical map at
every moment (before, after each phase, after) with a slider to step through them, resident memory
and conversions over time, and exits per vCPU.  Why one file with everything inline (SVG drawn by
:mod:`guestmem.report.figures`, CSS, a small script, no fonts, images or scripts fetched from
anywhere): it is mailed, attached to a bug or opened on a machine with no network, and must look
the same there.  Without JavaScript every map is shown, one under the other; the script only adds
the slider.  ``#phase=N`` in the URL opens the page at moment N (0 = the first).

The map colours and the legend's words come from :mod:`guestmem.report.palette`, the same as the
terminal and the figures.
"""

from __future__ import annotations

from html import escape

from guestmem.report.figures import (
    FigureOptions,
    exits_figure,
    figure_bytes,
    map_figure,
    map_subtitle,
    resident_line,
    run_panels,
    run_title,
    timeline_figure,
)
from guestmem.report.palette import (
    BACKGROUND,
    INK,
    KIND_COLOURS,
    KIND_LABELS,
    KIND_MEANINGS,
    KINDS,
    MUTED,
    pale,
)
from guestmem.report.summary import summary_rows
from guestmem.scenarios.run import ScenarioReport
from guestmem.scenarios.sizes import fmt_size

DPI = 96  # SVG is vector; this only sets the size matplotlib reports in pt

CSS = f"""
body {{ font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: {INK};
       background: {BACKGROUND}; margin: 0 auto; max-width: 1200px; padding: 1.5em; }}
h1 {{ font-size: 1.6em; margin: 0 0 .2em; }}
h2 {{ font-size: 1.2em; margin: 1.6em 0 .5em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }}
.verdict {{ display: inline-block; padding: .1em .6em; border-radius: .3em; font-weight: 600; }}
.verdict.ok {{ background: #e3f4ec; color: #00603f; }}
.verdict.failed {{ background: #fbe4d9; color: #8a2f00; }}
.sub {{ color: {MUTED}; margin: .2em 0; }}
table.summary {{ border-collapse: collapse; }}
table.summary th {{ text-align: left; padding: .25em 1.2em .25em 0; vertical-align: top;
                   white-space: nowrap; }}
table.summary td {{ padding: .25em 0; }}
table.summary tr + tr {{ border-top: 1px solid #eee; }}
figure {{ margin: .5em 0; }}
figure svg {{ max-width: 100%; height: auto; }}
figure.map-frame svg {{ width: 100%; max-height: 70vh; }}
figcaption {{ color: {MUTED}; font-size: .92em; }}
.controls {{ display: none; align-items: center; gap: 1em; margin: .5em 0; }}
.js .controls {{ display: flex; }}
.controls input[type=range] {{ flex: 1; max-width: 32em; }}
.controls output {{ font-weight: 600; min-width: 16em; }}
.legend {{ display: grid; grid-template-columns: auto 1fr; gap: .25em .7em; align-items: center;
          margin: .6em 0; }}
.legend svg {{ width: 1.1em; height: 1.1em; }}
.note {{ color: {MUTED}; font-size: .9em; }}
"""

# The slider: shows one map at a time, keeps the label and the URL's #phase=N in step.
SCRIPT = """
(function () {
  var root = document.documentElement;
  root.className += " js";
  var frames = document.querySelectorAll("#maps .map-frame");
  var slider = document.getElementById("phase");
  var label = document.getElementById("phase-label");
  if (!frames.length || !slider) { return; }
  function show(i) {
    i = Math.max(0, Math.min(frames.length - 1, i | 0));
    for (var j = 0; j < frames.length; j++) { frames[j].hidden = (j !== i); }
    slider.value = String(i);
    label.textContent = (i + 1) + " / " + frames.length + ": " + frames[i].getAttribute("data-label");
    document.body.setAttribute("data-phase", String(i));
  }
  slider.addEventListener("input", function () { show(parseInt(slider.value, 10)); });
  document.addEventListener("keydown", function (e) {
    if (e.target === slider) { return; }
    if (e.key === "ArrowLeft") { show(parseInt(slider.value, 10) - 1); }
    if (e.key === "ArrowRight") { show(parseInt(slider.value, 10) + 1); }
  });
  var m = /(?:^#|&)phase=(\\d+)/.exec(window.location.hash);
  show(m ? parseInt(m[1], 10) : frames.length - 1);
  document.body.setAttribute("data-ready", "yes");
})();
"""


def _svg(data: bytes) -> str:
    """An SVG file's bytes as an element to inline (without its XML prolog and DOCTYPE)."""
    text = data.decode("utf-8")
    return text[text.index("<svg"):].strip()


def _swatch(fill: str, stroke: str = "none", hatch: bool = False) -> str:
    lines = ("" if not hatch else f'<path d="M0 12 L12 0 M-4 8 L8 -4 M4 16 L16 4" '
             f'stroke="{pale(fill, 0.65)}" stroke-width="1.5"/>')
    return (f'<svg viewBox="0 0 12 12" aria-hidden="true"><rect x="1" y="1" width="10" height="10" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>{lines}</svg>')


def _legend(levels_known: bool) -> str:
    rows = [f"<div>{_swatch(KIND_COLOURS[k])}</div><div><b>{escape(KIND_LABELS[k])}</b>: "
            f"{escape(KIND_MEANINGS[k])}</div>" for k in KINDS]
    if levels_known:
        sample = "#5b6470"
        rows += [f"<div>{_swatch(sample)}</div><div><b>solid</b>: mapped by the guest at 2M</div>",
                 f"<div>{_swatch(sample, INK)}</div><div><b>dark border</b>: mapped at 1G</div>",
                 f"<div>{_swatch(sample, hatch=True)}</div><div><b>hatched</b>: mapped at 4K only</div>",
                 f"<div>{_swatch(BACKGROUND, sample)}</div><div><b>outline</b>: resident, not mapped by "
                 "the guest</div>"]
    else:
        rows.append("<div></div><div>mapping levels: not visible on this backend</div>")
    return f'<div class="legend" id="map-legend">{"".join(rows)}</div>'


def _summary(report: ScenarioReport) -> str:
    out = ['<table class="summary" id="summary-table">']
    for what, value in summary_rows(report):
        out.append(f"<tr><th>{escape(what)}</th><td>{escape(value.plain)}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def build_html(report: ScenarioReport, *, options: FigureOptions | None = None) -> str:
    """The report page for ``report`` (a run made with ``snapshots=True``), as one string."""
    opts = options or FigureOptions(dpi=DPI)
    title = run_title(report)
    panels = run_panels(report, before=True, phases=True)
    snaps = [s for _, s in panels]
    frames = []
    for i, (label, snap) in enumerate(panels):
        fig = map_figure([(label, snap)], title="", options=FigureOptions(dpi=opts.dpi), legend=False)
        frames.append(f'<figure class="map-frame" data-index="{i}" data-label="{escape(label)}" '
                      f'aria-label="{escape(label)}: {escape(resident_line(snap))}">'
                      f'{_svg(figure_bytes(fig, "svg", salt=f"map{i}", text_as_text=True))}</figure>')
    maps = ("<p>No map was taken for this run.</p>" if not panels else
            f'<div class="controls"><label for="phase">moment</label>'
            f'<input type="range" id="phase" min="0" max="{len(panels) - 1}" step="1" '
            f'value="{len(panels) - 1}"><output id="phase-label" for="phase"></output></div>'
            f'<p class="sub">{escape(map_subtitle(snaps, report.memory))}</p>'
            + "\n".join(frames) + _legend(all(s.levels_known for s in snaps)))
    timeline = timeline_figure(report.trace, title="", options=FigureOptions(dpi=opts.dpi))
    exits = exits_figure([v["exits"] for v in report.vcpu_results] or [{}], title="",
                         options=FigureOptions(dpi=opts.dpi))
    verdict = ('<span class="verdict ok">OK</span>' if report.ok
               else '<span class="verdict failed">FAILED</span>')
    error = f'<p class="sub">{escape(report.error)}</p>' if report.error else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>guestmem run {escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>guestmem run {escape(report.scenario)} {verdict}</h1>
<p class="sub">{escape(report.flavour)} on the {escape(report.backend)} backend; {report.vcpus} vCPU(s),
{escape(fmt_size(report.memory))} of guest memory; {report.wall_s:.3f} s</p>
{error}
</header>
<section id="summary">
<h2>Summary</h2>
{_summary(report)}
</section>
<section id="maps">
<h2>Guest physical map, moment by moment</h2>
{maps}
</section>
<section id="timeline">
<h2>Resident memory and conversions over time</h2>
<figure id="timeline-chart">{_svg(figure_bytes(timeline, "svg", salt="timeline", text_as_text=True))}
<figcaption>Resident pages are sampled (each dot is a sample); conversions are cumulative, counting only
requests that changed pages. Dashed lines: phase starts.</figcaption></figure>
</section>
<section id="exits">
<h2>Exits per vCPU</h2>
<figure id="exits-chart">{_svg(figure_bytes(exits, "svg", salt="exits", text_as_text=True))}
<figcaption>vCPU exits by reason; sync exits are the scenario's own doorbells.</figcaption></figure>
</section>
<footer><p class="note">Written by guestmem; this page is self-contained and needs no network.
Use the slider or the arrow keys to step through the map; add <code>#phase=N</code> to the address to
open it at moment N.</p></footer>
<script>{SCRIPT}</script>
</body>
</html>
"""

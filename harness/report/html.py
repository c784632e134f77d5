"""report.html: the report content as one HTML page (jinja2, autoescape on).

Images are PNG files beside the page in the assets folder, referenced by relative URL, so that
report.md and report.html share one copy of each plot and the pair can be moved as a folder.
"""
from __future__ import annotations

import jinja2

from harness.report.model import OVERVIEW_HEADER, PERF_HEADER, TABLE_HEADER, ReportContent

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ c.title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.PASS { color: #176b1a; font-weight: bold; } .FAIL, .NOTHING.COMPARED { color: #b00020; font-weight: bold; }
.PERF.REGRESSION { color: #a15c00; font-weight: bold; }
tr.first td { background: #ffe3e3; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; font-size: 0.85rem; }
img { max-width: 100%; height: auto; }
</style>
</head>
<body>
<h1>{{ c.title }}</h1>
<p>Generated {{ c.generated }}.</p>
<h2 id="overview">Overview</h2>
<table>
<tr>{% for h in overview_header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in c.overview %}<tr>{% for cell in row %}<td{% if loop.index == 2 %} class="{{ cell }}"{% endif %}>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% for s in c.sections %}
<section>
<h2>{{ s.title }}: <span class="{{ s.status }}">{{ s.status }}</span></h2>
<h3>Summary</h3>
<pre>{% for line in s.summary %}{{ line }}
{% endfor %}</pre>
{% if s.image %}<h3>Error by layer</h3>
<figure><img src="{{ assets }}/{{ s.image.name }}" alt="{{ s.image.caption }}"><figcaption>{{ s.image.caption }}</figcaption></figure>
{% endif %}
{% if s.perf %}<h3>Performance</h3>
<table>
<tr>{% for h in perf_header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in s.perf %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% endif %}
<h3>Verdict table</h3>
{% if s.failed_rows %}<p>Failing taps ({{ s.failed_rows | length }}), in execution order:</p>
{{ table(s.failed_rows) }}
{% else %}<p>No failing taps.</p>
{% endif %}
{% if s.passed_rows %}<details><summary>Passing taps ({{ s.passed_rows | length }})</summary>
{{ table(s.passed_rows) }}
</details>{% endif %}
</section>
{% endfor %}
{% if c.trends %}<h2 id="trends">Performance trends</h2>
{% for img in c.trends %}<figure><img src="{{ assets }}/{{ img.name }}" alt="{{ img.caption }}"><figcaption>{{ img.caption }}</figcaption></figure>
{% endfor %}{% endif %}
</body>
</html>
"""

_TABLE = """{% macro table(rows) %}<table>
<tr>{% for h in table_header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for r in rows %}<tr{% if r.first %} class="first"{% endif %}><td>{{ r.model }}</td><td>{{ r.phase }}</td><td>{{ r.tap }}{% if r.first %} (first failure){% endif %}</td><td class="{{ 'PASS' if r.passed else 'FAIL' }}">{{ 'pass' if r.passed else 'FAIL' }}</td><td class="num">{{ r.r }}</td><td class="num">{{ r.r_tail }}</td><td class="num">{{ r.r_bias }}</td><td class="num">{{ r.cosine }}</td></tr>
{% endfor %}</table>{% endmacro %}"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_PAGE = _ENV.from_string(_TABLE + _TEMPLATE)


def render_html(content: ReportContent, assets: str) -> str:
    """The page for ``content``; ``assets`` is the relative folder holding the PNGs."""
    return _PAGE.render(c=content, assets=assets, overview_header=OVERVIEW_HEADER, table_header=TABLE_HEADER,
                        perf_header=PERF_HEADER)

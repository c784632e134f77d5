"""report.html / report.md: same content, escaped, written atomically, and loading in headless Chromium."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.report import TrendSeries, build_content, write_report
from harness.report import writer
from harness.report.markdown import escape
from harness.report.samples import sample_perf, sample_verdict

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL = '<img src=x onerror="alert(1)"> | *bold* `tick` [link](http://x)'


def _verdicts() -> list[dict]:
    return [sample_verdict("llama-3.2-1b", perf=sample_perf("llama-3.2-1b")),
            sample_verdict("qwen3-0.6b", fail_phase="prefill", fail_tap="layers.1.q_rope",
                           perf=sample_perf(regression=True))]


def _trend() -> TrendSeries:
    return TrendSeries("qwen3-0.6b", "ttft", "ms", [(f"r{i}", 40.0 + (8.0 if i > 6 else 0.0)) for i in range(10)], [7])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return write_report(tmp_path_factory.mktemp("rep"), _verdicts(), [_trend()])


def _assets(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.startswith(writer.ASSETS_PREFIX))


def test_both_files_written_with_table_and_images(report):
    out = report.parent
    html, md = report.read_text(), (out / "report.md").read_text()
    (assets,) = _assets(out)
    pngs = sorted(p.name for p in assets.iterdir())
    assert len(pngs) == 3  # two layer plots, one trend
    for name in pngs:  # both pages reference every image, relatively
        assert f'src="{assets.name}/{name}"' in html
        assert f"]({assets.name}/{name})" in md
    # The verdict table has the same rows in both renderings: one per result.
    n_rows = sum(len(v["results"]) for v in _verdicts())
    html_row = r"<tr(?: class=\"first\")?><td>(?:llama|qwen)[^<]*</td><td>(?:prefill|decode)"
    assert len(re.findall(html_row, html)) == n_rows
    assert len(re.findall(r"^\| (?:llama|qwen)\S* \| (?:prefill|decode)", md, re.M)) == n_rows
    assert html.count("(first failure)") == md.count(escape("(first failure)")) == 1
    assert "PERF REGRESSION" not in html  # the failing model is FAIL, which outranks the perf verdict
    assert "15.0% slower" in html and "15.0% slower" in md


def test_text_is_escaped_in_both(tmp_path):
    v = sample_verdict("qwen3-0.6b", fail_phase="prefill")
    v["model"], v["first_failure"]["hint"] = f"m{EVIL}", EVIL
    path = write_report(tmp_path, [v])
    html, md = path.read_text(), (tmp_path / "report.md").read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
    # Raw text appears only inside the fenced summary block, where Markdown shows it verbatim.
    outside_fences = re.sub(r"^```text\n.*?^```$", "", md, flags=re.S | re.M)
    assert "```text" in md and not re.search(r"(?<!\\)<img src=x", outside_fences)
    assert escape(f"m{EVIL}") in md
    assert escape("a|b\nc") == "a\\|b c"


def test_rewrite_replaces_assets_and_keeps_other_files(tmp_path):
    (tmp_path / "verdict.json").write_text("{}")
    write_report(tmp_path, _verdicts()[:1])
    first = _assets(tmp_path)
    write_report(tmp_path, _verdicts())
    second = _assets(tmp_path)
    assert len(first) == len(second) == 1 and first != second
    assert (tmp_path / "verdict.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report-tmp-")]


def test_a_crash_while_writing_leaves_the_old_report(tmp_path, monkeypatch):
    write_report(tmp_path, _verdicts()[:1])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assets = _assets(tmp_path)

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "render_html", boom)
    with pytest.raises(HarnessError, match="cannot write report into .*disk full"):
        write_report(tmp_path, _verdicts())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert _assets(tmp_path) == assets
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report-tmp-")]


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(HarnessError, match="nothing to report"):
        write_report(tmp_path, [])
    with pytest.raises(HarnessError, match=r"verdicts\[1\]: verdict lacks key"):
        write_report(tmp_path, [sample_verdict("qwen3-0.6b"), {"schema": 1}])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(HarnessError, match="cannot write report into"):
        write_report(blocker / "sub", [sample_verdict("qwen3-0.6b")])


def test_trends_alone_make_a_report():
    content = build_content([], [_trend()])
    assert not content.sections and len(content.images) == 1


# Appended to a copy of the page: reports the load state of every image into the DOM.
_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const d = document.createElement("div");
  d.id = "img-check";
  d.textContent = `images ${ok}/${imgs.length}`;
  document.body.appendChild(d);
});
</script>"""


def _chromium_dom(page: Path, tmp_path: Path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000",
           "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium_with_every_image(report, tmp_path):
    check = report.with_name("check.html")
    check.write_text(report.read_text().replace("</body>", _CHECK + "</body>"))
    dom = _chromium_dom(check, tmp_path)
    assert "<h1>npu-harness report</h1>" in dom
    assert 'id="img-check">images 3/3<' in dom
    # The check can fail: a missing image is reported as not loaded.
    (assets,) = _assets(report.parent)
    victim = next(assets.iterdir())
    saved = victim.read_bytes()
    victim.unlink()
    try:
        assert 'id="img-check">images 2/3<' in _chromium_dom(check, tmp_path)
    finally:
        victim.write_bytes(saved)
        check.unlink()

"""The book builds with warnings as errors, and a real headless browser renders its pages with their plots."""
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

from .conftest import NOTEBOOKS, ROOT

pytestmark = pytest.mark.slow
BUILD = Path(os.environ.get("LABKIT_BOOK_BUILD", ROOT / "_build" / "test-book"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


# The chapters the build executes, so that the browser test sees their plots. nbval (the `notebooks` part of
# `make test`) already runs every chapter with the network blocked; executing all of them a second time here
# would double the suite's longest part. LABKIT_BOOK_EXECUTE=all executes every chapter, as `make book` does.
EXECUTED = NOTEBOOKS[:1]


def book_config(build: Path) -> Path:
    """_config.yml with the chapters outside EXECUTED excluded from execution (unless LABKIT_BOOK_EXECUTE=all)."""
    import yaml

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    if os.environ.get("LABKIT_BOOK_EXECUTE") != "all":
        config["execute"]["exclude_patterns"] = [f"*{nb.name}" for nb in NOTEBOOKS if nb not in EXECUTED]
    build.mkdir(parents=True, exist_ok=True)
    path = build / "_config.test.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def html():
    """Build once per session (executing the EXECUTED chapters at the tiny size, network blocked)."""
    env = dict(os.environ, LABKIT_SIZE="tiny", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", LABKIT_STATIC="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests" / "offline"), os.environ.get("PYTHONPATH")])))
    env.pop("MPLBACKEND", None)
    from labkit.notebook import strip

    for nb in NOTEBOOKS:                  # the learner copies the chapter pages link (as `make book` writes them)
        strip(nb)
    jb = Path(sys.executable).parent / "jupyter-book"
    proc = subprocess.run([str(jb), "build", str(ROOT), "--path-output", str(BUILD), "--config", str(book_config(BUILD)),
                           "-W", "-n", "--keep-going"], capture_output=True, text=True, env=env, timeout=2400)
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, f"jupyter-book build failed:\n{log}"
    return BUILD / "_build" / "html"


def test_every_page_is_built(html):
    assert (html / "book" / "intro.html").exists()
    for nb in NOTEBOOKS:
        page = html / "notebooks" / f"{nb.stem}.html"
        assert page.exists(), f"{page} missing"
        text = page.read_text()
        assert "Traceback" not in text, f"{page.name} shows a traceback"
    assert "2026" in (html / "book" / "intro.html").read_text()   # copyright set


PROBE = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="f" src="{page}" style="width:1280px;height:900px"></iframe>
<script>
document.getElementById('f').addEventListener('load', () => {{
  const doc = document.getElementById('f').contentDocument;
  const imgs = Array.from(doc.querySelectorAll('main img'));
  const wait = imgs.map(i => i.complete ? Promise.resolve() : new Promise(r => {{ i.onload = r; i.onerror = r; }}));
  Promise.all(wait).then(() => {{
    document.getElementById('result').textContent = JSON.stringify({{
      title: doc.title, h1: (doc.querySelector('main h1') || {{}}).textContent || '',
      images: imgs.length, loaded: imgs.filter(i => i.naturalWidth > 0).length }});
  }});
}});
</script></body></html>"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):          # one line per request would bury the test's output
        pass


def browse(html: Path, probe: str, profile: Path, budget_ms: int = 8000, shot: tuple[str, Path] | None = None):
    """Serve the book on loopback, open the ``probe`` page (HTML whose <pre id="result"> ends up holding JSON) in
    headless Chromium and return that JSON; ``shot=(page, png)`` also takes a screenshot of a page."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required under CI (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed: `apt-get install chromium` to render the book")
    (html / "_probe.html").write_text(probe)
    handler = functools.partial(_QuietHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
    try:
        dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", f"{base}/_probe.html"], capture_output=True,
                             text=True, timeout=600).stdout
        if shot is not None:
            subprocess.run([CHROMIUM, *flags, f"--screenshot={shot[1]}", "--window-size=1280,900",
                            f"{base}/{shot[0]}"], capture_output=True, timeout=180)
    finally:
        server.shutdown()
    m = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    assert m and m.group(1) != "pending", f"the page did not finish loading in the browser: {dom[:500]}"
    import html as html_lib

    return json.loads(html_lib.unescape(m.group(1)))


def render(html: Path, page: str, shot: Path) -> dict:
    """What headless Chromium saw of one page (title, h1, images loaded), and a screenshot of it."""
    return browse(html, PROBE.format(page=page), shot.parent / "chromium-profile", shot=(page, shot))


def test_browser_renders_the_intro(html, tmp_path):
    seen = render(html, "book/intro.html", BUILD / "intro.png")
    print(seen)
    assert "from scratch" in seen["h1"]
    assert (BUILD / "intro.png").stat().st_size > 10_000


@pytest.mark.parametrize("nb", EXECUTED, ids=[nb.stem for nb in EXECUTED])
def test_browser_renders_a_chapter_with_its_plots(html, nb):
    seen = render(html, f"notebooks/{nb.stem}.html", BUILD / f"{nb.stem}.png")
    print(seen)
    assert seen["h1"].strip(), "the chapter has no title"
    assert seen["images"] >= 2, "the executed chapter shows fewer than 2 images (plots)"
    assert seen["loaded"] == seen["images"], f"{seen['images'] - seen['loaded']} images failed to load"


def toc_pages() -> list[str]:
    """Every page of the table of contents, as its path in the built site."""
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [f"{f}.html" for f in files]


PROBE_ALL = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="f" style="width:1280px;height:900px"></iframe>
<script>
const pages = {pages};
const seen = [];
const frame = document.getElementById('f');
function next() {{
  if (seen.length === pages.length) {{
    document.getElementById('result').textContent = JSON.stringify(seen);
    return;
  }}
  const page = pages[seen.length];
  frame.onload = () => {{
    const doc = frame.contentDocument;
    const imgs = Array.from(doc.querySelectorAll('main img'));
    const wait = imgs.map(i => i.complete ? Promise.resolve() : new Promise(r => {{ i.onload = r; i.onerror = r; }}));
    Promise.all(wait).then(() => {{
      seen.push({{page: page, title: doc.title, h1: (doc.querySelector('main h1') || {{}}).textContent || '',
                 images: imgs.length, loaded: imgs.filter(i => i.naturalWidth > 0).length}});
      next();
    }});
  }};
  frame.src = page;
}}
next();
</script></body></html>"""


def test_every_page_renders_in_the_browser(html, tmp_path):
    """Each page of the table of contents, opened in headless Chromium: it loads, has its title and a heading,
    and every image on it loads."""
    pages = toc_pages()
    seen = browse(html, PROBE_ALL.format(pages=json.dumps(pages)), tmp_path / "chromium-profile",
                  budget_ms=8000 * len(pages))
    for page in seen:
        print(page)
    assert [p["page"] for p in seen] == pages
    for p in seen:
        assert p["title"].strip() and p["h1"].strip(), f"{p['page']} has no title or heading: {p}"
        assert p["loaded"] == p["images"], f"{p['page']}: {p['images'] - p['loaded']} of {p['images']} images failed"


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        for key in ("href", "src"):
            if attrs.get(key) and tag in ("a", "img", "link", "script"):
                self.hrefs.append(attrs[key])


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(errors="replace"))
    return parser


def test_no_internal_link_is_broken(html):
    """Every relative link, image and script of every page points to a file of the built site, and a link to
    `page.html#anchor` to an id on that page."""
    from urllib.parse import unquote, urlsplit

    parsed = {}
    broken = []
    for page in toc_pages():
        links = parsed[page] = parsed.get(page) or _parse(html / page)
        for href in links.hrefs:
            url = urlsplit(href)
            if url.scheme or url.netloc or href.startswith(("mailto:", "javascript:")):
                continue
            target = (html / page).parent / unquote(url.path) if url.path else html / page
            target = target.resolve()
            if not target.exists():
                broken.append(f"{page}: {href} (no file {target.relative_to(html.resolve()) if target.is_relative_to(html.resolve()) else target})")
            elif url.fragment and target.suffix == ".html":
                key = str(target.relative_to(html.resolve()))
                if key not in parsed:
                    parsed[key] = _parse(target)
                ids = parsed[key].ids
                if url.fragment not in ids:
                    broken.append(f"{page}: {href} (no id {url.fragment!r} on {key})")
    assert not broken, "broken internal links:\n" + "\n".join(broken[:40])


def test_every_chapter_page_links_its_learner_copy(html):
    """The line under each chapter's Exercises heading downloads that chapter's learner copy (solutions stubbed)."""
    import nbformat

    for nb in NOTEBOOKS:
        page = html / "notebooks" / f"{nb.stem}.html"
        hrefs = [h for h in _parse(page).hrefs if h.endswith(f"{nb.stem}_exercises.ipynb")]
        assert hrefs, f"{page.name} does not link {nb.stem}_exercises.ipynb"
        copy = nbformat.read((page.parent / hrefs[0]).resolve(), as_version=4)
        stubs = [c for c in copy.cells if "exercise" in c.metadata.get("tags", [])]
        assert stubs and all("NotImplementedError" in c.source for c in stubs), f"{hrefs[0]} holds solutions"


def test_hints_are_collapsed_and_explorations_are_still_figures(html):
    """Every chapter page holds its hints as closed <details> blocks; on the executed chapter the exploration is the
    figure at its defaults (LABKIT_STATIC=1), with its caption."""
    for nb in NOTEBOOKS:
        text = (html / "notebooks" / f"{nb.stem}.html").read_text()
        assert text.count("<details><summary>Hint") >= 3, f"{nb.stem}: fewer than 3 collapsed hints on the page"
        assert "<details open" not in text
    for nb in EXECUTED:
        text = (html / "notebooks" / f"{nb.stem}.html").read_text()
        assert "in Jupyter or Colab the controls change them" in text, f"{nb.stem}: no exploration's still figure"

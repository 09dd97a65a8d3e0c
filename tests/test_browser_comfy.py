"""The shipped workflows in a real browser: ComfyUI's own frontend (the comfyui-frontend-package that ComfyUI pins) in
headless Chromium, driven by Playwright, against a real ComfyUI server with this pack and tests/comfy_test_pack.

- Each workflows/*.json is loaded the way a drag-and-drop loads it (`app.handleFile(new File([json], name))`): no
  "missing nodes" dialog, no node the frontend failed to build (red placeholder), no console error mentioning the
  pack, the frontend's own prompt (`app.graphToPrompt()`) equal to tests/workflow_api.py's, and the Note (top left)
  visible at the saved view; for the demo workflows also their result previews (Before, After, Surrogate) inside the
  visible canvas at the saved view, at a zoom >= 100% (a screenshot of that view is kept).
- erase_style.json is then edited in the page into the tiny prompt of tests/test_server_comfy.py (Load Checkpoint ->
  SPARETestTinyCheckpoint, 64 px, 1 sample, 3 distill steps, 2 sampler steps) and queued with the Run path
  (`app.queuePrompt(0)`); the page must show the five previews (concept samples, saliency heatmap, timestep profile,
  loss curve, and the final image) and the LoRA file must be written.

Skipped, with the reason printed, when COMFYUI_PATH, Playwright, Chromium or the frontend package is missing. Set up:
    COMFYUI_PATH=/work/comfyui bash scripts/setup_browser.sh
Run:
    COMFYUI_PATH=/work/comfyui OMP_NUM_THREADS=1 .venv-comfy/bin/python -m pytest tests/test_browser_comfy.py -q -s

SPARE_SCREENSHOTS=1 also writes the screenshots into the repository: workflows/<name>.jpg (the template browser's
thumbnail of each workflow: a 512x512 JPEG of the saved view, UI hidden -- for the demo, the Note and its result
previews framed; the card shows it in a 256x256 box), docs/screenshots/<demo>_saved_view.png (each demo workflow,
demo_minicanvas and demo_minicanvas_flux, at its saved view in a 1280x800 window) and docs/screenshots/erase_style_run.png (the previews after the tiny run). Without it they go to the pytest temp folder.
Chromium: $SPARE_CHROMIUM, else /usr/bin/chromium, else `chromium` on PATH (Playwright's own browser download is never
used).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import workflow_api as wa
from comfy_fixtures import comfy_server
from test_server_comfy import (ROOT, STYLE_LORA, WORKFLOWS, _skip_reason,
                               check_lora_file, load_workflow, nodes_of, tiny_prompt)

PAGE_TIMEOUT = 60_000  # ms until the frontend is up
VIEWPORT = {"width": 1280, "height": 800}  # a laptop window: the workflow tabs sit in a 2nd row over the canvas
RUN_SHOT = {"width": 1920, "height": 1080}  # docs/screenshots/erase_style_run.png
THUMB_PX = 512  # the template card shows <workflow>.jpg in a 256x256 CSS px box (w-64 h-64, object-contain): 2x
SCREENSHOTS = os.environ.get("SPARE_SCREENSHOTS", "") not in ("", "0")
# The test's own user settings: no first-run template browser, no minimap or fps text in the screenshots.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}
MISSING_NODES_TEXT = ("Some Nodes Are Missing", "the following node types were not found")
# Workflows whose result must be on screen at the saved view: the titles (prefixes) of their result previews. Their
# thumbnail frames the Note and these previews (the template card is square; the saved view is a laptop window).
RESULT_PREVIEWS = {"demo_minicanvas.json": ("Before", "After", "Surrogate"),
                   "demo_minicanvas_flux.json": ("Before", "After", "Surrogate"),
                   "demo_minicanvas_flux_dev.json": ("Before", "After", "Surrogate")}
MIN_TEXT_SCALE = 1.0  # the saved view of a workflow with result previews: node text at >= 100% (Note text >= 10 px)


def _chromium() -> str | None:
    for cand in (os.environ.get("SPARE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _browser_skip_reason() -> str | None:
    reason = _skip_reason()
    if reason:
        return reason
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (run scripts/setup_browser.sh)"
    if not _chromium():
        return "no Chromium at /usr/bin/chromium or $SPARE_CHROMIUM (run scripts/setup_browser.sh)"
    server_python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    found = subprocess.run([server_python, "-c", "import comfyui_frontend_package"], capture_output=True)
    if found.returncode:
        return f"comfyui_frontend_package is not installed for {server_python} (run scripts/setup_browser.sh)"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The server (as in test_server_comfy, but serving the installed frontend) and the page

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = _browser_skip_reason()
    if reason:
        print("SKIP:", reason)
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("comfy_browser_base")
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS), encoding="utf-8")
    with comfy_server(base) as srv:  # no --front-end-root: the installed frontend package
        yield srv


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


class Console:
    """The page's console errors and uncaught exceptions, and the failed requests."""

    def __init__(self):
        self.errors: list[str] = []

    def on_console(self, msg):
        if msg.type == "error":
            loc = msg.location or {}
            self.errors.append(f"console.error: {msg.text} ({loc.get('url', '')})")

    def on_pageerror(self, exc):
        stack = " | ".join(ln.strip() for ln in (getattr(exc, "stack", "") or "").splitlines()[1:4])
        self.errors.append(f"pageerror: {exc} [{stack}]")

    def on_response(self, response):
        if response.status >= 400:
            self.errors.append(f"HTTP {response.status}: {response.url}")

    def take(self) -> list[str]:
        out, self.errors = self.errors, []
        return out


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=_chromium(), headless=True)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, server):
    """A fresh browser context (no stored workflows or tabs) on the frontend, its console errors collected in
    page.console; fails on a start-up console error that mentions the pack."""
    t = time.monotonic()
    pg = browser.new_context(viewport=VIEWPORT).new_page()
    console = Console()
    pg.on("console", console.on_console)
    pg.on("pageerror", console.on_pageerror)
    pg.on("response", console.on_response)
    pg.console = console
    pg.goto(server.url)
    pg.wait_for_function("window.app && window.app.graph && window.app.canvas && window.app.vueAppReady",
                         timeout=PAGE_TIMEOUT)
    pg.wait_for_timeout(500)
    print(f"[browser] frontend {pg.evaluate('window.__COMFYUI_FRONTEND_VERSION__ ?? null')} up after "
          f"{time.monotonic() - t:.1f}s")
    startup = console.take()
    bad = [e for e in startup if "spare" in e.lower()]
    assert not bad, "console errors mentioning the pack while the frontend started:\n" + "\n".join(bad)
    if startup:
        print("[browser] console errors at start-up (not the pack's):\n  " + "\n  ".join(startup))
    return pg


@pytest.fixture(scope="module")
def page(browser, server):
    pg = open_page(browser, server)
    yield pg
    pg.context.close()


# ---------------------------------------------------------------------------------------------------------------------
# In-page helpers

# handleFile is what a drop on the canvas calls; in this frontend it reads the file with a FileReader whose onload it
# does not await, so the graph is replaced some time after the promise resolves: wait (10 s at most) until the
# graph holds the file's nodes, else the test would read the previous workflow's graph (seen once in CI).
JS_LOAD = """async ([text, name]) => {
    const want = JSON.stringify(JSON.parse(text).nodes.map(n => [n.id, n.type]).sort());
    const have = () => JSON.stringify(app.graph.nodes.map(n => [n.id, n.type]).sort());
    await app.handleFile(new File([text], name, {type: "application/json"}));
    for (let t = 0; t < 100 && have() !== want; t++) await new Promise(r => setTimeout(r, 100));
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    app.canvas.draw(true, true);
    const broken = app.graph.nodes.filter(n => n.has_errors || !LiteGraph.registered_node_types[n.type])
        .map(n => `${n.id} ${n.type || n.last_serialization?.type}`);
    return {nodes: app.graph.nodes.map(n => [n.id, n.type]), broken,
            ds: [app.canvas.ds.scale, ...app.canvas.ds.offset]};
}"""

JS_DIALOGS = """() => Array.from(document.querySelectorAll('.p-dialog, [role=dialog]'))
    .filter(d => d.offsetParent !== null || d.getClientRects().length).map(d => d.innerText)"""

JS_CLOSE_DIALOGS = """() => { for (const b of document.querySelectorAll('.p-dialog .p-dialog-close-button')) b.click(); }"""

# Where the Note node is on screen, and which of its points show the canvas (not a panel, tab bar or menu on top).
JS_NOTE_VISIBILITY = """() => {
    const note = app.graph.nodes.find(n => n.type === "Note");
    const th = LiteGraph.NODE_TITLE_HEIGHT;
    const [x0, y0] = app.canvasPosToClientPos([note.pos[0], note.pos[1] - th]);
    const [x1, y1] = app.canvasPosToClientPos([note.pos[0] + note.size[0], note.pos[1] + note.size[1]]);
    const canvasEl = app.canvas.canvas;
    // the canvas, or the Note's own text box (a DOM widget over the canvas)
    const own = e => e === canvasEl || (note.widgets || []).some(w => w.element && w.element.contains(e));
    const shown = (x, y) => x >= 0 && y >= 0 && x < innerWidth && y < innerHeight
        && own(document.elementFromPoint(x, y));
    const grid = (ya, yb) => { let n = 0, ok = 0;
        for (let i = 0; i < 8; i++) for (let j = 0; j < 8; j++) {
            n++; ok += shown(x0 + (x1 - x0) * (i + 0.5) / 8, ya + (yb - ya) * (j + 0.5) / 8) ? 1 : 0; }
        return ok / n; };
    const titleY = y0 + th * app.canvas.ds.scale / 2;
    const bodyTop = y0 + th * app.canvas.ds.scale;
    const cover = (x, y) => { const e = document.elementFromPoint(x, y);
        return own(e) ? null : (e ? (e.className?.baseVal ?? e.className ?? e.tagName).toString().slice(0, 80) : "outside"); };
    return {rect: [x0, y0, x1, y1].map(Math.round), window: [innerWidth, innerHeight],
            title: grid(y0, bodyTop), body: grid(bodyTop, y1),
            firstLines: grid(bodyTop, Math.min(y1, bodyTop + 60)),
            titleCoveredBy: cover((x0 + x1) / 2, titleY), topLeftCoveredBy: cover(x0 + 10, bodyTop + 10)};
}"""

# Client rectangles (title bar included) of the PreviewImage nodes whose titles start with these prefixes.
JS_NODE_BOXES = """(prefixes) => {
    const th = LiteGraph.NODE_TITLE_HEIGHT;
    return prefixes.map(p => {
        const n = app.graph.nodes.find(n => n.type === "PreviewImage" && (n.title || "").startsWith(p));
        if (!n) return {prefix: p, title: null};
        const [x0, y0] = app.canvasPosToClientPos([n.pos[0], n.pos[1] - th]);
        const [x1, y1] = app.canvasPosToClientPos([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
        return {prefix: p, title: n.title, type: n.type, rect: [x0, y0, x1, y1].map(Math.round)};
    });
}"""

# Every node's box as the frontend laid it out (title bar included; a node grows to fit its widgets when loaded).
JS_LAYOUT = """() => {
    const th = LiteGraph.NODE_TITLE_HEIGHT;
    return app.graph.nodes.map(n => ({id: n.id, type: n.type, title: n.title || n.type, collapsed: !!n.flags?.collapsed,
        box: [n.pos[0], n.pos[1] - th, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]}));
}"""


def overlaps(layout: list[dict]) -> list[str]:
    """Pairs of (expanded) nodes whose boxes intersect: one hides the other's widgets or title."""
    found = []
    for i, a in enumerate(layout):
        for b in layout[i + 1:]:
            if a["collapsed"] or b["collapsed"]:
                continue
            w = min(a["box"][2], b["box"][2]) - max(a["box"][0], b["box"][0])
            h = min(a["box"][3], b["box"][3]) - max(a["box"][1], b["box"][1])
            if w > 0 and h > 0:
                found.append(f"{a['title']} (#{a['id']}) and {b['title']} (#{b['id']}): {w:.0f} x {h:.0f} px")
    return found


JS_SETTINGS = """async (values) => {
    const s = app.extensionManager.setting, before = {};
    for (const [k, v] of Object.entries(values)) { before[k] = s.get(k); await s.set(k, v); }
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    return before;
}"""

# The client rectangle where the canvas shows (menus, side bar and tab rows cut into it), found along the middle lines.
JS_FREE_AREA = """() => {
    const c = app.canvas.canvas, r = c.getBoundingClientRect();
    // the canvas, or a node's DOM widget over it (a text box): part of the canvas, not a panel
    const at = (x, y) => { const e = document.elementFromPoint(x, y);
        return e === c || !!(e && e.closest && e.closest('.dom-widget, textarea')); };
    const mx = innerWidth / 2, my = innerHeight / 2, fr = [0.1, 0.3, 0.5, 0.7];  // not the bottom corners' buttons
    let left = 0, top = 0, right = innerWidth - 1, bottom = innerHeight - 1;
    for (const f of fr) { const y = innerHeight * f; while (left < mx && !at(left, y)) left++; }
    for (const f of [0.1, 0.3, 0.5, 0.7, 0.9]) { const x = innerWidth * f; while (top < my && !at(x, top)) top++; }
    for (const f of fr) { const y = innerHeight * f; while (right > mx && !at(right, y)) right--; }
    while (bottom > my && !at(mx, bottom)) bottom--;
    return {left, top, right, bottom, canvasLeft: r.left, canvasTop: r.top};
}"""

# Focus mode keeps one button (leave focus mode) in the top right corner: hidden for the thumbnail.
JS_HIDE_CORNER_BUTTON = """() => {
    const c = app.canvas.canvas, e = document.elementFromPoint(innerWidth - 16, 16);
    window.__spareHidden = [];
    if (e && e !== c) { const b = e.closest('button') || e; b.style.visibility = 'hidden'; window.__spareHidden.push(b); }
    return window.__spareHidden.map(b => b.outerHTML.slice(0, 120));
}"""

JS_SET_VIEW = """([scale, ox, oy]) => {
    app.canvas.ds.scale = scale; app.canvas.ds.offset[0] = ox; app.canvas.ds.offset[1] = oy;
    app.canvas.setDirty(true, true); app.canvas.draw(true, true);
}"""

# Turns the loaded workflow into a prompt of test_server_comfy.tiny_prompt: a node whose class differs is replaced by
# one of the prompt's class (same id, position and output links), and every widget takes the prompt's value.
JS_MAKE_TINY = """(prompt) => {
    const graph = app.graph, replaced = [], set = [];
    for (const [id, {class_type, inputs}] of Object.entries(prompt)) {
        let node = graph.getNodeById(Number(id));
        if (!node) throw new Error(`node ${id} not in the graph`);
        if (node.type !== class_type) {
            const targets = node.outputs.map(o => (o.links || []).map(l => {
                const link = graph.links.get ? graph.links.get(l) : graph.links[l];
                return [link.target_id, link.target_slot];
            }));
            const pos = [...node.pos];
            graph.remove(node);
            const nn = LiteGraph.createNode(class_type);
            if (!nn) throw new Error(`cannot create ${class_type}`);
            nn.id = Number(id);
            nn.pos = pos;
            graph.add(nn);
            targets.forEach((ts, slot) => ts.forEach(([tid, tslot]) => nn.connect(slot, graph.getNodeById(tid), tslot)));
            replaced.push(`${id}: ${node.type} -> ${class_type}`);
            node = nn;
        }
        for (const [name, value] of Object.entries(inputs)) {
            if (Array.isArray(value)) continue;  // a link
            const w = (node.widgets || []).find(w => w.name === name);
            if (!w) throw new Error(`${class_type} ${id}: no widget ${name}`);
            if (w.value !== value) { w.value = value; w.callback?.(value); set.push(`${id}.${name}=${value}`); }
        }
    }
    app.canvas.setDirty(true, true);
    return {replaced, set};
}"""

# What the page shows on each output node: the image URLs it holds and whether they were loaded.
JS_SHOWN_OUTPUTS = """(ids) => Object.fromEntries(ids.map(id => {
    const node = app.graph.getNodeById(Number(id));
    const out = app.nodeOutputs?.[String(id)];
    const imgs = node?.imgs || [];
    return [id, {title: node?.title, images: (out?.images || []).map(i => i.filename),
                 loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).map(i => [i.naturalWidth, i.naturalHeight])}];
}))"""


def _load(page, name: str) -> dict:
    return page.evaluate(JS_LOAD, [(WORKFLOWS / name).read_text(encoding="utf-8"), name])


def _frame(page, nodes: list[dict], margin: float = 20) -> float:
    """Sets the view so that these nodes (workflow JSON dicts, their titles included) fill the part of the canvas that
    no panel covers; returns the scale."""
    th = 30
    x0 = min(n["pos"][0] for n in nodes) - margin
    y0 = min(n["pos"][1] - th for n in nodes) - margin
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes) + margin
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes) + margin
    area = page.evaluate(JS_FREE_AREA)
    w, h = area["right"] - area["left"], area["bottom"] - area["top"]
    scale = min(w / (x1 - x0), h / (y1 - y0))
    ox = (area["left"] - area["canvasLeft"] + (w - scale * (x1 - x0)) / 2) / scale - x0
    oy = (area["top"] - area["canvasTop"]) / scale - y0
    page.evaluate(JS_SET_VIEW, [scale, ox, oy])
    return scale


def _screenshot_dir(tmp_path_factory) -> tuple[Path, Path]:
    if SCREENSHOTS:
        return WORKFLOWS, ROOT / "docs" / "screenshots"
    d = tmp_path_factory.mktemp("screenshots")
    return d, d


def _save_thumbnail(page, wf: dict, path: Path, frame: list[dict] | None = None) -> None:
    """The saved view of the loaded workflow (or, with `frame`, the view that fits these nodes), UI hidden (focus
    mode), as a THUMB_PX square JPEG."""
    from PIL import Image

    old = page.viewport_size
    page.set_viewport_size({"width": 2 * THUMB_PX, "height": 2 * THUMB_PX})
    # focus mode hides the menus and panels, but not the 2nd-row workflow tabs nor the canvas menu (zoom buttons)
    hide = {"Comfy.Workflow.WorkflowTabsPosition": "Sidebar", "Comfy.Graph.CanvasMenu": False}
    before = page.evaluate(JS_SETTINGS, hide)
    page.evaluate("() => app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
    ds = wf.get("extra", {}).get("ds", {"scale": 1, "offset": [0, 0]})
    try:
        page.wait_for_timeout(300)
        if frame:
            _frame(page, frame)
        else:
            page.evaluate(JS_SET_VIEW, [ds["scale"], *ds["offset"]])
        page.evaluate(JS_HIDE_CORNER_BUTTON)
        png = page.screenshot()
    finally:
        page.evaluate("() => (window.__spareHidden || []).forEach(e => { e.style.visibility = ''; })")
        page.evaluate("() => app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
        page.evaluate(JS_SETTINGS, before)
        page.set_viewport_size(old)
        page.evaluate(JS_SET_VIEW, [ds["scale"], *ds["offset"]])
    im = Image.open(io.BytesIO(png)).convert("RGB").resize((THUMB_PX, THUMB_PX), Image.LANCZOS)
    im.save(path, "JPEG", quality=85, optimize=True)


# ---------------------------------------------------------------------------------------------------------------------
# Tests

@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_workflow_loads_in_the_frontend(server, object_info, page, name, tmp_path_factory):
    wf = load_workflow(name)
    page.console.take()
    t = time.monotonic()
    loaded = _load(page, name)
    page.wait_for_timeout(300)
    dialogs = page.evaluate(JS_DIALOGS)
    errors = page.console.take()
    print(f"\n[{name}] loaded in {time.monotonic() - t:.1f}s: {len(loaded['nodes'])} nodes, view {loaded['ds']}")

    missing = [d for d in dialogs if any(s.lower() in d.lower() for s in MISSING_NODES_TEXT)]
    page.evaluate(JS_CLOSE_DIALOGS)
    assert not missing, f"{name}: missing-nodes dialog:\n" + "\n".join(missing)
    assert not loaded["broken"], f"{name}: nodes the frontend could not build: {loaded['broken']}\n" + "\n".join(errors)
    ours = [e for e in errors if "spare" in e.lower()]
    assert not ours, f"{name}: console errors mentioning the pack:\n" + "\n".join(ours)
    if errors:
        print(f"[{name}] other console errors:\n  " + "\n  ".join(errors))
    assert sorted(loaded["nodes"]) == sorted([n["id"], n["type"]] for n in wf["nodes"])
    ds = wf["extra"]["ds"]
    assert loaded["ds"] == pytest.approx([ds["scale"], *ds["offset"]]), "the saved view was not restored"

    # the frontend's own API prompt is the one tests/workflow_api.py builds (what test_server_comfy runs)
    frontend = page.evaluate("async () => (await app.graphToPrompt()).output")
    ours_prompt = wa.ui_to_api(wf, object_info)
    for prompt in (frontend, ours_prompt):
        for node in prompt.values():
            node.pop("_meta", None)
    assert frontend == ours_prompt, (f"{name}: graphToPrompt differs from workflow_api.ui_to_api:\n"
                                     f"frontend {json.dumps(frontend)[:3000]}\nours {json.dumps(ours_prompt)[:3000]}")

    crowded = overlaps(page.evaluate(JS_LAYOUT))  # every widget of every node can be seen and clicked
    assert not crowded, f"{name}: nodes overlap as the frontend lays them out:\n" + "\n".join(crowded)

    note = page.evaluate(JS_NOTE_VISIBILITY)
    print(f"[{name}] Note at {note['rect']} in {note['window']}: title {note['title']:.0%} visible "
          f"(covered by {note['titleCoveredBy']}), body {note['body']:.0%}, first lines {note['firstLines']:.0%}")
    # its text must show (at 1280 px the 2nd-row workflow tabs cover the title bar and a sliver under it)
    assert note["body"] >= 0.9 and note["firstLines"] >= 0.75 and not note["topLeftCoveredBy"], \
        f"{name}: the Note is not visible at the saved view: {note}"

    thumbs, docs = _screenshot_dir(tmp_path_factory)
    frame = None
    if name in RESULT_PREVIEWS:
        # the result previews lie inside the part of the canvas no panel covers, at a zoom where text is readable
        area = page.evaluate(JS_FREE_AREA)
        boxes = page.evaluate(JS_NODE_BOXES, list(RESULT_PREVIEWS[name]))
        docs.mkdir(parents=True, exist_ok=True)
        shot = docs / f"{Path(name).stem}_saved_view.png"
        page.screenshot(path=str(shot))  # what a user sees on opening it (VIEWPORT, panels and tabs included)
        print(f"[{name}] screenshot of the saved view: {shot}")
        print(f"[{name}] free canvas area {area}; result previews: " +
              "; ".join(f"{b['title']} at {b.get('rect')}" for b in boxes))
        for b in boxes:
            assert b["title"] and b["type"] == "PreviewImage", f"{name}: no PreviewImage titled '{b['prefix']}...'"
            x0, y0, x1, y1 = b["rect"]
            assert (x0 >= area["left"] and y0 >= area["top"] and x1 <= area["right"] and y1 <= area["bottom"]), \
                f"{name}: preview '{b['title']}' {b['rect']} is not inside the visible canvas {area} at the saved view"
        assert ds["scale"] >= MIN_TEXT_SCALE, f"{name}: saved zoom {ds['scale']:.0%} < {MIN_TEXT_SCALE:.0%}"
        titles = {n.get("title", "") for n in wf["nodes"]}
        frame = [n for n in wf["nodes"] if n["type"] == "Note"
                 or n["type"] == "PreviewImage"
                 and any(n.get("title", "").startswith(p) for p in RESULT_PREVIEWS[name])]
        assert len(frame) == 1 + len(RESULT_PREVIEWS[name]), titles

    shipped = WORKFLOWS / (Path(name).stem + ".jpg")  # the template browser's card image, if there is one
    if shipped.is_file():
        url = f"{server.url}/api/workflow_templates/spare/{shipped.name}"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff", url

    path = thumbs / (Path(name).stem + ".jpg")
    _save_thumbnail(page, wf, path, frame)
    print(f"[{name}] thumbnail {path} ({path.stat().st_size // 1024} KiB)")


def test_a_missing_node_is_caught(server, page):
    """The checks above can fail: a node type the server does not know opens the dialog and is left unbuilt."""
    wf = load_workflow("reuse_lora_stock_loader.json")
    next(n for n in wf["nodes"] if n["type"] == "LoraLoader")["type"] = "SPARENoSuchNode"
    page.console.take()
    loaded = page.evaluate(JS_LOAD, [json.dumps(wf), "missing_node.json"])
    page.wait_for_timeout(300)
    dialogs = page.evaluate(JS_DIALOGS)
    page.evaluate(JS_CLOSE_DIALOGS)
    page.console.take()
    print(f"\n[missing node] broken {loaded['broken']}; dialog {[d[:120] for d in dialogs]}")
    assert any("SPARENoSuchNode" in b for b in loaded["broken"]), loaded
    assert any(all(s.lower() in d.lower() for s in MISSING_NODES_TEXT[1:]) and "SPARENoSuchNode" in d
               for d in dialogs), dialogs


def test_erase_style_tiny_run_shows_the_previews(server, object_info, browser, tmp_path_factory):
    page = open_page(browser, server)  # its own page: only this workflow's tab in the screenshot
    try:
        _tiny_run(server, object_info, page, tmp_path_factory)
    finally:
        page.context.close()


def _tiny_run(server, object_info, page, tmp_path_factory):
    name = "erase_style.json"
    wf = load_workflow(name)
    prompt = tiny_prompt(wf, object_info, "sd15")
    page.console.take()
    loaded = _load(page, name)
    assert not loaded["broken"], loaded
    edits = page.evaluate(JS_MAKE_TINY, prompt)
    print(f"\n[run] replaced {edits['replaced']}; set {len(edits['set'])} widgets")
    assert edits["replaced"] == [f"{i}: CheckpointLoaderSimple -> SPARETestTinyCheckpoint"
                                 for i in nodes_of(prompt, "SPARETestTinyCheckpoint")]

    assert server.get("/history") == {}, "the server ran something before"
    t = time.monotonic()
    # What the Run button does. Its return value is no use: `!executionStore.lastNodeErrors` is false for the {}
    # node_errors of an accepted prompt too (frontend 1.27.10); a refused prompt opens a dialog.
    page.evaluate("async () => { await app.queuePrompt(0); }")
    prompt_id = None
    while prompt_id is None:
        assert time.monotonic() - t < 30, \
            f"the queued prompt did not show up in /history or /queue; dialogs: {page.evaluate(JS_DIALOGS)}"
        queue = server.get("/queue")
        items = queue["queue_running"] + queue["queue_pending"]
        prompt_id = items[0][1] if items else next(iter(server.get("/history")), None)
        time.sleep(0.2)
    entry = server.wait(prompt_id)
    print(f"[run] finished in {time.monotonic() - t:.1f}s: {entry['status']['status_str']}")
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]

    # the page queued exactly the tiny prompt (the frontend's serialization of the edited SPARE nodes)
    queued, expected = entry["prompt"][2], json.loads(json.dumps(prompt))
    for node in [*queued.values(), *expected.values()]:
        node.pop("_meta", None)
    assert queued == expected, f"queued {json.dumps(queued)[:3000]}\nexpected {json.dumps(prompt)[:3000]}"

    outputs = {**nodes_of(prompt, "PreviewImage"), **nodes_of(prompt, "SaveImage")}
    # The page gets the outputs over its websocket; it loads a node's images from /view when it draws the node: show
    # them all (the Save Image node lies right of the saved view).
    _frame(page, [n for n in wf["nodes"] if str(n["id"]) in outputs])
    deadline = time.monotonic() + 30
    while True:
        shown = page.evaluate(JS_SHOWN_OUTPUTS, sorted(outputs))
        if all(s["loaded"] for s in shown.values()) or time.monotonic() > deadline:
            break
        page.wait_for_timeout(250)
    for node_id, s in sorted(shown.items()):
        print(f"[run] node {node_id} '{s['title']}': {s['images']} shown at {s['loaded']}")
    titles = {s["title"] for s in shown.values()}
    for want in ("Concept samples", "Saliency heatmap", "Timestep profile"):
        assert want in titles, (want, titles)
    assert any("loss" in t.lower() for t in titles), titles
    for node_id, s in shown.items():
        assert s["images"] and s["loaded"], (node_id, s)
        assert s["images"] == [im["filename"] for im in entry["outputs"][node_id]["images"]], (node_id, s)

    kept = tmp_path_factory.mktemp("previews")  # the images as the page fetched them, to look at
    for node_id, s in shown.items():
        for im in entry["outputs"][node_id]["images"]:
            query = urllib.parse.urlencode({k: im[k] for k in ("filename", "subfolder", "type")})
            with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as r:
                (kept / f"{node_id}_{s['title'].replace(' ', '_')}.png").write_bytes(r.read())
    print(f"[run] previews kept in {kept}")

    keys, _ = check_lora_file(server.loras / STYLE_LORA, "comfyui")
    print(f"[run] {STYLE_LORA}: {len(keys)} tensors")
    errors = page.console.take()
    ours = [e for e in errors if "spare" in e.lower()]
    assert not ours, "console errors mentioning the pack during the run:\n" + "\n".join(ours)
    if errors:
        print("[run] other console errors:\n  " + "\n  ".join(errors))

    _, docs = _screenshot_dir(tmp_path_factory)
    docs.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size(RUN_SHOT)  # >= 1536 px wide: the workflow tabs move into the top bar
    try:
        ids = {int(i) for i in outputs if outputs[i]["class_type"] == "PreviewImage"}
        page.wait_for_timeout(300)
        scale = _frame(page, [n for n in wf["nodes"] if n["id"] in ids])
        page.wait_for_timeout(300)
        path = docs / "erase_style_run.png"
        page.screenshot(path=str(path))
        print(f"[run] screenshot {path} (zoom {scale:.0%})")
    finally:
        page.set_viewport_size(VIEWPORT)

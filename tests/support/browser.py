"""What an annotator sees: Label Studio's labeling UI in a real browser (Debian's chromium, driven by
Playwright for Python through ``executable_path``; no browser is downloaded).

``Annotator.open_task`` logs in as the user once, opens a task as an annotator does (the project shows
predictions), waits until the prediction is drawn, and reads back what is on the screen: the rows of the
regions panel, each drawn shape's geometry on the image canvas (as fractions of the drawn image, read
from the canvas library's nodes, not from the stored JSON), the highlighted text of each span, the
checked choices and the texts shown in per-region text areas. Each opened task leaves a screenshot.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
DRAW_TIMEOUT_MS = 30_000
FIRST_DRAW_TIMEOUT_MS = 90_000  # a page's first drawing: the editor's scripts are not in the browser's cache yet


class BrowserUnavailable(Exception):
    """No chromium or no Playwright here; the message says which and how to install it."""


def chromium_path() -> str:
    found = os.environ.get("LSBACKEND_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise BrowserUnavailable("no chromium here: apt-get install -y chromium (.ci/run does, as root)")
    return found


@dataclass
class Drawn:
    """One task as the labeling UI shows it."""

    regions: list[str]  # the regions panel, one row per region: its label(s) as shown
    shapes: list[dict[str, Any]]  # {"kind": Rect/Line/Circle/Image..., "box": [x, y, w, h] as fractions of the image}
    spans: list[str]  # text highlighted as entities, in order
    choices: list[str]  # checked choices
    texts: list[str]  # what text areas show (a per-region one: once its region is selected, ``select_region``)
    image_size: tuple[float, float] | None  # the drawn image, in canvas pixels
    screenshot: Path
    raw: dict[str, Any] = field(default_factory=dict)

    def boxes(self, kind: str) -> list[list[float]]:
        return [shape["box"] for shape in self.shapes if shape["kind"] == kind]


# Runs in the page: what is drawn, read from Konva's nodes (image tags) and the DOM (text, choices, panels).
READ_SCREEN = r"""() => {
  const out = {regions: [], shapes: [], spans: [], choices: [], texts: [], image: null};
  for (const row of document.querySelectorAll('.lsf-outliner-item__title')) out.regions.push(row.innerText.trim());
  const K = window.Konva;
  for (const stage of (K ? K.stages : [])) {
    const image = stage.findOne('Image');
    if (!image) continue;
    const frame = image.getClientRect({relativeTo: stage});
    out.image = [frame.width, frame.height];
    for (const node of stage.find(n => /_transformable|keypoint|brush/i.test(n.name() || ''))) {
      if (!node.isVisible()) continue;
      const r = node.getClientRect({relativeTo: stage, skipStroke: true, skipShadow: true});
      out.shapes.push({kind: node.getClassName(), name: node.name(),
                       box: [(r.x - frame.x) / frame.width, (r.y - frame.y) / frame.height,
                             r.width / frame.width, r.height / frame.height]});
    }
    for (const group of stage.find(n => n.name() === 'segmentation')) {  // brushes: masks painted on a canvas
      for (const node of group.find('Image')) {
        const picture = node.image();
        if (!picture || node.name() === 'highlight' || !picture.width || !picture.height) continue;
        const canvas = document.createElement('canvas');
        canvas.width = picture.width; canvas.height = picture.height;
        canvas.getContext('2d').drawImage(picture, 0, 0);
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let x0 = Infinity, y0 = Infinity, x1 = -1, y1 = -1;
        for (let y = 0; y < canvas.height; y++) for (let x = 0; x < canvas.width; x++) {
          if (pixels[(y * canvas.width + x) * 4 + 3] > 0) { x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x); y1 = Math.max(y1, y); }
        }
        if (x1 < 0) continue;
        out.shapes.push({kind: 'Brush', name: group.name(), box: [x0 / canvas.width, y0 / canvas.height,
                         (x1 + 1 - x0) / canvas.width, (y1 + 1 - y0) / canvas.height]});
      }
    }
  }
  for (const span of document.querySelectorAll('.htx-highlight')) out.spans.push(span.innerText);
  for (const input of document.querySelectorAll('.lsf-choices input:checked, .ant-checkbox-checked input, .ant-radio-checked input')) {
    const label = input.closest('label');
    if (label) out.choices.push(label.innerText.trim().replace(/\s*\[\w+\]$/, ''));  // without the hotkey
  }
  for (const box of document.querySelectorAll('[data-testid="htx-textbox-content"]')) out.texts.push(box.innerText.trim());
  return out;
}"""

# Ready once the image is drawn at its size (a first frame can be a few pixels wide) and what is wanted is on it:
# then the screen as read at that moment (the canvas may be redrawn a moment later, a brush repainted).
DRAWN_ENOUGH = f"""(want) => {{
  const screen = ({READ_SCREEN})();
  const imageReady = !window.Konva || !window.Konva.stages.length || (screen.image && screen.image[0] > 100);
  const shapes = screen.shapes.filter(shape => !want.kind || shape.kind === want.kind);
  const ready = imageReady && screen.regions.length >= want.regions && shapes.length >= want.shapes
                && screen.spans.length >= want.spans;
  return ready ? screen : null;
}}"""


class Annotator:
    """A logged-in chromium page on one Label Studio; screenshots go to ``artifacts``."""

    def __init__(self, label_studio: Any, artifacts: Path) -> None:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as exc:
            raise BrowserUnavailable("Playwright for Python is missing: make setup installs requirements-dev.txt") from exc
        self.label_studio, self.artifacts = label_studio, artifacts
        artifacts.mkdir(parents=True, exist_ok=True)
        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        except Exception as exc:
            self._playwright.stop()
            raise BrowserUnavailable(f"chromium did not start: {exc}") from exc
        self.page = self._browser.new_page(viewport={"width": 1400, "height": 900})
        self.console_errors: list[str] = []
        self.failed_requests: list[str] = []  # what the page asked for and did not get: said when a wait fails
        self._opened = "page"
        self._drawn_once = False
        self.page.on("pageerror", lambda error: self.console_errors.append(str(error)))
        self.page.on("requestfailed", lambda request: self.failed_requests.append(f"{request.url}: {request.failure}"))
        self.page.on("response", self._note_refusal)
        self._log_in()

    def _log_in(self) -> None:
        from harness.label_studio import PASSWORD, USER

        self.page.goto(self.label_studio.url + "/user/login/")
        self.page.fill("input[name=email]", USER)
        self.page.fill("input[name=password]", PASSWORD)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(lambda url: "/user/login" not in url, timeout=DRAW_TIMEOUT_MS)

    def open_task(self, project: int, task_id: int, name: str, regions: int = 0, shapes: int = 0, spans: int = 0,
                  wait_for: str = "", kind: str = "") -> Drawn:
        """Open a task in the labeling UI and read what is drawn once the panel lists ``regions`` regions, the
        image holds ``shapes`` shapes (of ``kind``, where given: a brush's mask is painted after its node is
        there), the text ``spans`` highlights, and ``wait_for`` (a selector) is on the page; past the deadline
        the wait fails saying what is there (``_wait_drawn``)."""
        self.page.goto(f"{self.label_studio.url}/projects/{project}/data?task={task_id}")
        want = {"regions": regions, "shapes": shapes, "spans": spans, "kind": kind}
        self._wait_drawn(want, name)
        if wait_for:
            self.page.wait_for_selector(wait_for, state="attached", timeout=DRAW_TIMEOUT_MS)
        self.page.wait_for_load_state("networkidle")
        self._opened = name
        # What is wanted, read in the same moment it is there (after the network settled, as an annotator sees it).
        return self._drawn(self._wait_drawn(want, name), name)

    def smart_click(self, project: int, task_id: int, name: str, label: str, x: float, y: float) -> Drawn:
        """Open a task and click it as an annotator does with a promptable model: Auto-Annotation on, the
        smart keypoint tool and ``label`` taken, one click at (``x``, ``y``), fractions of the image; read
        what is drawn once the answer's brush is there."""
        page = self.page
        page.goto(f"{self.label_studio.url}/projects/{project}/data?task={task_id}")
        self._wait_drawn({"regions": 0, "shapes": 0, "spans": 0, "kind": ""}, name)
        page.locator("text=Auto-Annotation").first.click()
        page.locator(".lsf-tool_smart").first.click()  # the smart tools' group, at the toolbar's end
        page.locator('button.lsf-tool[aria-label="key-point-tool"]').first.click(timeout=DRAW_TIMEOUT_MS)
        page.locator(".lsf-label__text", has_text=label).first.click()
        canvas = page.locator(".konvajs-content canvas").first.bounding_box(timeout=DRAW_TIMEOUT_MS)
        assert canvas is not None, "the image canvas is not on the page"
        page.mouse.click(canvas["x"] + canvas["width"] * x, canvas["y"] + canvas["height"] * y)
        screen = self._wait_drawn({"regions": 1, "shapes": 1, "spans": 0, "kind": "Brush"}, name)
        self._opened = name
        return self._drawn(screen, name)

    def select_region(self, index: int = 0) -> Drawn:
        """Click a row of the regions panel, as an annotator does to see a region's text area; read again."""
        self.page.locator(".lsf-outliner-item").nth(index).click()
        self.page.wait_for_selector('[data-testid="htx-textbox-content"]', timeout=DRAW_TIMEOUT_MS)
        return self._read(f"{self._opened}-region-{index}-selected")

    def _note_refusal(self, response: Any) -> None:
        if response.status >= 400:
            self.failed_requests.append(f"{response.url}: HTTP {response.status}")

    def _wait_drawn(self, want: dict[str, Any], name: str) -> dict[str, Any]:
        """The screen once ``want`` is drawn. Past the deadline (longer for the first page: a cold cache loads
        the editor's scripts), a screenshot is kept as ``name``-not-drawn.png and the failure says what the
        page showed then, what it logged as errors and which of its requests failed: CI keeps only the log."""
        from playwright.sync_api import Error as PlaywrightError

        timeout = DRAW_TIMEOUT_MS if self._drawn_once else FIRST_DRAW_TIMEOUT_MS
        try:
            screen = self.page.wait_for_function(DRAWN_ENOUGH, arg=want, timeout=timeout, polling=200).json_value()
        except PlaywrightError as exc:
            self.page.screenshot(path=str(self.artifacts / f"{name}-not-drawn.png"))
            try:
                shown: Any = self.page.evaluate(READ_SCREEN)
            except PlaywrightError as read_error:
                shown = f"unreadable ({read_error})"
            raise AssertionError(
                f"{name}: not drawn within {timeout / 1000:g} s at {self.page.url}; wanted {want}, the page showed "
                f"{shown}; page errors {self.console_errors[-5:]}; failed requests {self.failed_requests[-10:]}"
            ) from exc
        self._drawn_once = True
        return screen

    def _read(self, name: str) -> Drawn:
        """What the page shows now, and its screenshot as ``name``.png."""
        return self._drawn(self.page.evaluate(READ_SCREEN), name)

    def _drawn(self, screen: dict, name: str) -> Drawn:
        shot = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(shot))
        image = tuple(screen["image"]) if screen["image"] else None
        return Drawn(screen["regions"], screen["shapes"], screen["spans"], screen["choices"], screen["texts"],
                     image, shot, screen)

    def close(self) -> None:
        self._browser.close()
        self._playwright.stop()

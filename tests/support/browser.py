"""Drive headless Chromium through chromedriver's W3C WebDriver HTTP API (standard library only).

`Browser` starts chromedriver on 127.0.0.1, opens a session with a throwaway profile and offers
what the frontend tests need: open a page, run (async) JavaScript, take a screenshot.
`drop_workflow` loads a workflow file into ComfyUI's frontend the way drag-and-drop does: a
`drop` event carrying a File, handled by the app's own drop handler; it also reads what the
frontend then tells the user about missing nodes and models. Frontend 1.35 (ComfyUI 0.8) opens
dialogs ("This workflow has missing nodes", "Missing Models"); since the Errors tab (frontend 1.40,
setting Comfy.RightSidePanel.ShowErrorsTab) an error overlay appears instead, and its "View details"
opens the Errors tab of the right side panel ("Missing Node Packs", "Missing Models").
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from .net import free_port

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER_CANDIDATES = ("chromedriver",)
# What the frontend tests run Chromium with: no sandbox (containers), nothing that goes online.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1600,1000"]


def find_browser() -> tuple[Optional[str], Optional[str], str]:
    """(chromium, chromedriver, why not) found on PATH."""
    chromium = next(filter(None, map(shutil.which, CHROMIUM_CANDIDATES)), None)
    driver = next(filter(None, map(shutil.which, CHROMEDRIVER_CANDIDATES)), None)
    if chromium and driver:
        return chromium, driver, ""
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path]
    return chromium, driver, (f"{' and '.join(missing)} not installed (Debian: apt-get install chromium "
                              "chromium-driver)")


class WebDriverError(RuntimeError):
    pass


class Browser:
    def __init__(self, chromium: str, driver: str, profile: Path, log: Path):
        self.port = free_port()
        self.log_file = open(log, "w")
        self.driver = subprocess.Popen([driver, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
                                       stdout=self.log_file, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 30
        while True:
            try:
                if self._call("GET", "/status")["value"].get("ready"):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline or self.driver.poll() is not None:
                self.quit()
                raise WebDriverError(f"chromedriver did not start (log: {log})")
            time.sleep(0.2)
        capabilities = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}}
        self.session = self._call("POST", "/session", capabilities)["value"]["sessionId"]
        self._call("POST", f"/session/{self.session}/timeouts", {"script": 120_000, "pageLoad": 120_000})

    def _call(self, method: str, path: str, payload: Optional[dict] = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=180) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = json.loads(error.read() or b"{}")
            value = body.get("value", {})
            raise WebDriverError(f"{method} {path}: {value.get('error')}: {str(value.get('message'))[:2000]}") from None

    def open(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """Run a function body; `return` gives the result."""
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)})["value"]

    def run_async(self, script: str, *args: Any) -> Any:
        """Run a function body that ends by calling `arguments[arguments.length - 1](result)`."""
        return self._call("POST", f"/session/{self.session}/execute/async", {"script": script, "args": list(args)})["value"]

    def wait_for(self, expression: str, timeout: float = 120) -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.run(f"try {{ return {expression}; }} catch (e) {{ return null; }}")
            if value:
                return value
            time.sleep(0.5)
        raise WebDriverError(f"timed out waiting for: {expression}")

    def screenshot(self, path: Path) -> Path:
        png = base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot")["value"])
        path.write_bytes(png)
        return path

    def console(self) -> list[dict]:
        try:
            return self._call("POST", f"/session/{self.session}/se/log", {"type": "browser"})["value"]
        except WebDriverError:
            return []

    def quit(self) -> None:
        if getattr(self, "session", None):
            try:
                self._call("DELETE", f"/session/{self.session}")
            except (WebDriverError, OSError):
                pass
            self.session = None
        if self.driver.poll() is None:
            self.driver.terminate()
            try:
                self.driver.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.driver.kill()
        self.log_file.close()


# An extension that records what the app reports after each graph load (the missing node
# types it found), installed once per page.
RECORDER_SCRIPT = """
if (!window.__layerdiffuseLoads) {
  window.__layerdiffuseLoads = [];
  window.app.registerExtension({
    name: 'layerdiffuse.tests.loadRecorder',
    async afterConfigureGraph(missingNodeTypes) {
      window.__layerdiffuseLoads.push(
        (missingNodeTypes || []).map((m) => (typeof m === 'string' ? m : m.type)));
    },
  });
}
return window.__layerdiffuseLoads.length;
"""

# Waits for the next recorded load, then reports the graph.
LOADED_SCRIPT = """
const [before, done] = arguments;
(async () => {
  const start = Date.now();
  while (window.__layerdiffuseLoads.length === before) {
    if (Date.now() - start > 60000) { done({ error: 'the app did not load the workflow within 60 s' }); return; }
    await new Promise((r) => setTimeout(r, 100));
  }
  const nodes = window.app.graph.nodes;
  done({
    missing: window.__layerdiffuseLoads[window.__layerdiffuseLoads.length - 1],
    node_count: nodes.length,
    types: nodes.map((n) => n.type),
    widgets: Object.fromEntries(nodes.map((n) => [String(n.id), (n.widgets || []).map((w) => w.value)])),
  });
})();
"""

# What the user is told about missing nodes and models after a load: `ui` ('dialogs' or
# 'errors_tab'), `missing_nodes` (the text of the UI that lists them, with the accessible labels of
# its buttons; '' when none is shown) and `models`, one [folder, file, offered for download] per
# listed file (folder null when the frontend names none).
REPORT_SCRIPT = """
const done = arguments[arguments.length - 1];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const textWithLabels = (e) =>
  [e.innerText, ...[...e.querySelectorAll('[aria-label]')].map((b) => b.getAttribute('aria-label'))].join('\\n');

function fromDialogs() {
  const dialogs = [...document.querySelectorAll('.p-dialog')];
  return {
    missing_nodes: dialogs.filter((d) => /missing nodes/i.test(d.innerText)).map(textWithLabels).join('\\n'),
    models: [...document.querySelectorAll('.p-dialog .comfy-missing-models [role=option]')].map((row) => {
      const [folder, file] = row.querySelector('span[title]').innerText.split(' / ');
      const download = row.querySelector('button');  // disabled when the URL or folder is refused
      return [folder, file, !!download && !download.disabled];
    }),
  };
}

function fromErrorsTab() {
  const panel = document.querySelector('[data-testid=properties-panel]');
  const nodes = panel && panel.querySelector('[data-testid=missing-node-card]');
  const rows = panel ? [...panel.querySelectorAll('[data-testid=missing-model-importable-rows] > *')] : [];
  return {
    missing_nodes: nodes ? textWithLabels(nodes) : '',
    models: rows.map((row) => {
      const name = row.querySelector('[title]');
      // Under the file name: its folder ("Unknown" when the frontend knows none), then " · size".
      const folder = name.parentElement.nextElementSibling.innerText.split(' · ')[0].trim();
      return [folder === 'Unknown' ? null : folder, name.getAttribute('title'),
              !!row.querySelector('[data-testid=missing-model-download]')];
    }),
  };
}

// The report once it has not changed for a second (the frontend fills it in asynchronously).
async function settled(read) {
  let last = JSON.stringify(read());
  let since = Date.now();
  const start = since;
  while (Date.now() - since < 1000 && Date.now() - start < 20000) {
    await sleep(100);
    const now = JSON.stringify(read());
    if (now !== last) { last = now; since = Date.now(); }
  }
  return JSON.parse(last);
}

(async () => {
  if (window.app.extensionManager.setting.get('Comfy.RightSidePanel.ShowErrorsTab') === undefined) {
    done({ ui: 'dialogs', ...(await settled(fromDialogs)) });
    return;
  }
  // The overlay comes once the missing-model scan has finished; nothing to report makes none.
  const start = Date.now();
  let details;
  while (!(details = document.querySelector('[data-testid=error-overlay-see-errors]')) && Date.now() - start < 5000) {
    await sleep(100);
  }
  if (details) details.click();
  done({ ui: 'errors_tab', ...(await settled(fromErrorsTab)) });
})();
"""

# Drops a file on the document: the browser's drag-and-drop, handled by the app's drop handler.
DROP_SCRIPT = """
const [fileName, text] = arguments;
const transfer = new DataTransfer();
transfer.items.add(new File([text], fileName, { type: 'application/json' }));
document.dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }));
"""

# The template browser: labelled by its key up to frontend 1.49, keyed by a data attribute since
# the dialogs moved to Reka UI (1.58).
TEMPLATE_DIALOG = ("document.querySelector('[aria-labelledby=global-workflow-template-selector], "
                   "[data-dialog-key=global-workflow-template-selector]')")

CLOSE_DIALOGS_SCRIPT = """
const done = arguments[arguments.length - 1];
(async () => {
  for (let i = 0; i < 10 && document.querySelector('.p-dialog'); i++) {
    const close = document.querySelector('.p-dialog .p-dialog-close-button, .p-dialog [aria-label="Close"]');
    if (close) close.click();
    else document.dispatchEvent(new KeyboardEvent('keydown', { key: 'Escape', bubbles: true }));
    await new Promise((r) => setTimeout(r, 300));
  }
  const overlay = document.querySelector('[data-testid=error-overlay-dismiss]');
  if (overlay) overlay.click();
  if (document.querySelector('[data-testid=properties-panel]')) {
    await window.app.extensionManager.setting.set('Comfy.RightSidePanel.IsOpen', false);
  }
  await new Promise((r) => setTimeout(r, 300));
  done(document.querySelectorAll('.p-dialog, [data-testid=error-overlay], [data-testid=properties-panel]').length);
})();
"""


def _loaded(browser: Browser, before: int, what: str) -> dict:
    result = browser.run_async(LOADED_SCRIPT, before)
    if result.get("error"):
        raise WebDriverError(f"{what}: {result['error']}")
    result["reported"] = browser.run_async(REPORT_SCRIPT)
    return result


def drop_workflow(browser: Browser, path: Path, text: Optional[str] = None) -> dict:
    """Load a workflow file as drag-and-drop does; returns what the app reported: `missing`
    node types (as extensions are told), node `types`, `widgets` values by node id, and what the
    user is shown about missing nodes and models (`reported`, see REPORT_SCRIPT)."""
    before = browser.run(RECORDER_SCRIPT)
    browser.run(DROP_SCRIPT, path.name, text if text is not None else path.read_text())
    return _loaded(browser, before, path.name)


def open_template_category(browser: Browser, label: str) -> dict:
    """Open the template browser (Workflow > Browse Templates) and the category `label`; returns
    the card names and the card images as the browser decoded them ([src, naturalWidth])."""
    browser.run_async("const done = arguments[0]; "
                      "window.app.extensionManager.command.execute('Comfy.BrowseTemplates').then(() => done(true));")
    browser.wait_for(f"{TEMPLATE_DIALOG}.innerText.includes({json.dumps(label)})")
    browser.run(f"[...{TEMPLATE_DIALOG}.querySelectorAll('div, span, a, button')]"
                f".filter((e) => e.innerText && e.innerText.trim() === {json.dumps(label)}).pop().click();")
    browser.wait_for(f"{TEMPLATE_DIALOG}.querySelector('[data-testid^=template-workflow-]') && "
                     f"[...{TEMPLATE_DIALOG}.querySelectorAll('img')].some((i) => i.complete && i.naturalWidth > 0)")
    return browser.run(f"""
        const dialog = {TEMPLATE_DIALOG};
        return {{
          cards: [...dialog.querySelectorAll('[data-testid^=template-workflow-]')]
                   .map((e) => e.getAttribute('data-testid').slice('template-workflow-'.length)),
          images: [...dialog.querySelectorAll('img')].filter((i) => i.complete).map((i) => [i.src, i.naturalWidth]),
        }};""")


def load_template(browser: Browser, name: str) -> dict:
    """Click a card of the open template browser; returns what the app reported (as drop_workflow)."""
    before = browser.run(RECORDER_SCRIPT)
    browser.run(f"{TEMPLATE_DIALOG}.querySelector({json.dumps(f'[data-testid=template-workflow-{name}]')}).click();")
    return _loaded(browser, before, f"template {name}")


def close_dialogs(browser: Browser) -> int:
    return browser.run_async(CLOSE_DIALOGS_SCRIPT)

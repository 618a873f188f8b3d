"""Headless Chromium for tests that check what a user sees in a page."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# Reports each image's decoded width into the DOM once the page has loaded.
PROBE = """<script>
window.addEventListener('load', () => {
  for (const img of document.images) img.setAttribute('data-natural-width', img.naturalWidth);
  document.body.setAttribute('data-probed', document.images.length);
});
</script>"""


def chromium(profile: Path, *args: str, window: str = "1200,900") -> str:
    """Run headless Chromium with a private ``profile`` dir; returns its stdout."""
    flags = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000", f"--window-size={window}"]
    return subprocess.run([*flags, *args], capture_output=True, text=True, timeout=120).stdout


def probed_dom(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after load, with :data:`PROBE`'s image widths in it."""
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    try:
        return chromium(profile, "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()

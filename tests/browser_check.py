"""Open an HTML page in headless Chromium and check it as a reader's browser shows it.

    python tests/browser_check.py report.html --screenshot out.png

Chromium (Debian's package ``chromium``) is driven over the DevTools protocol, through a
WebSocket written here on Python's standard library. The check fails (exit status 1)
when:

- the page asked for anything but itself and ``data:`` URIs (any http(s) or other
  request: the report must open offline);
- an ``<img>`` did not load (not complete, or naturalWidth 0);
- an inline ``<svg>`` has no area on the page (every ``<details>`` is opened first);
- the console logged an error, or a script threw.

It prints one line per finding and a closing line with the counts, and with
``--screenshot`` writes a PNG of the page's first screen (``--full`` for the whole
page). Exit status 2: Chromium is missing or did not start.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH, HEIGHT = 1280, 1000  # the page's viewport, and the first screen's screenshot
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """The path of a Chromium-like browser on PATH (or in $CHROMIUM), or None."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return shutil.which(explicit)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class WebSocket:
    """A WebSocket client (RFC 6455) of text messages: as much as the DevTools
    protocol needs, and no more."""

    def __init__(self, url: str, timeout: float):
        m = re.match(r"ws://([^/:]+):(\d+)(/.*)", url)
        if not m:
            raise ValueError(f"not a ws:// URL: {url}")
        host, port, path = m.group(1), int(m.group(2)), m.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the browser closed the DevTools connection")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            answer = status.decode(errors="replace")
            raise ConnectionError(f"the DevTools handshake failed: {answer}")
        self.buffer = head.split(b"\r\n\r\n", 1)[1]

    def send(self, text: str) -> None:
        data = text.encode()
        n = len(data)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(header + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buffer)))
            if not chunk:
                raise ConnectionError("the browser closed the DevTools connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def receive(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read(8))
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("the browser closed the DevTools connection")
            if opcode == 0x9:  # ping: answer, keep reading
                continue
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if b0 & 0x80:
                    return message.decode()

    def close(self) -> None:
        self.sock.close()


class DevTools:
    """One page of a headless Chromium, and the events it sent."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    def call(
        self, method: str, timeout: float = 60, session_id: str | None = None, **params
    ) -> dict:
        """Send ``method`` (to the page of ``session_id``, else to the browser) and wait for
        its answer, keeping the events that come before it."""
        self.next_id += 1
        ident = self.next_id
        request = {"id": ident, "method": method, "params": params}
        if session_id is not None:
            request["sessionId"] = session_id
        self.ws.send(json.dumps(request))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.receive())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)
        raise TimeoutError(f"no answer to {method} in {timeout} s")

    def wait_for(self, method: str, timeout: float) -> dict:
        for event in self.events:
            if event["method"] == method:
                return event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.receive())
            if "method" in message:
                self.events.append(message)
                if message["method"] == method:
                    return message
        raise TimeoutError(f"no {method} in {timeout} s")


# Run in the page after it loaded: every <details> opened, then each <img> and <svg>.
PAGE_CHECK = """(() => {
  document.querySelectorAll('details').forEach(d => { d.open = true; });
  const images = Array.from(document.images).map((img, i) => ({
    what: 'img #' + i + ' (' + (img.alt || img.src.slice(0, 40)) + ')',
    ok: img.complete && img.naturalWidth > 0,
    size: img.naturalWidth + 'x' + img.naturalHeight }));
  const svgs = Array.from(document.querySelectorAll('svg')).filter(
      s => !s.parentElement.closest('svg')).map((s, i) => {
    const box = s.getBoundingClientRect();
    return { what: 'svg #' + i + ' (' + (s.querySelector('title') || {}).textContent + ')',
             ok: box.width > 0 && box.height > 0,
             size: Math.round(box.width) + 'x' + Math.round(box.height) };
  });
  return JSON.stringify({ images, svgs, title: document.title,
    height: document.documentElement.scrollHeight,
    sections: Array.from(document.querySelectorAll('section')).map(s => s.id) });
})()"""


def _start(chromium: str, profile: str, timeout: float) -> tuple[subprocess.Popen, str]:
    """Start a headless Chromium on a free port; it and its DevTools' browser URL."""
    args = [
        chromium,
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--hide-scrollbars",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Chromium writes the port it listens on into the profile folder.
    port_file = Path(profile) / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{chromium} exited at start (status {process.returncode})")
        if port_file.exists():
            lines = port_file.read_text().split("\n")
            if len(lines) >= 2 and lines[1]:
                return process, f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{chromium} did not open its DevTools port in {timeout} s")


def check(
    page: Path,
    screenshot: Path | None = None,
    full: bool = False,
    chromium: str | None = None,
    timeout: float = 60,
    evaluate: str | None = None,
) -> dict:
    """Load ``page`` in headless Chromium and return the findings: ``problems`` (a list
    of lines; empty when the page passed), ``images``, ``svgs``, ``requests``,
    ``console_errors``, ``sections``, and ``evaluated``: the value of the JavaScript
    expression ``evaluate`` run in the page after the checks (then any error it
    causes is a problem too)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (apt-get install -y chromium)")
    url = Path(page).resolve().as_uri()
    # Chromium's helper processes may still write to the profile while it is removed:
    # what is left then is not the check's business.
    with tempfile.TemporaryDirectory(
        prefix="cnnc-chromium-", ignore_cleanup_errors=True
    ) as profile:
        process, browser_url = _start(chromium, profile, timeout)
        ws = None
        try:
            ws = WebSocket(browser_url, timeout)
            browser = DevTools(ws)
            target = browser.call("Target.createTarget", url="about:blank")["targetId"]
            session = browser.call("Target.attachToTarget", targetId=target, flatten=True)
            tools = _Session(browser, session["sessionId"])
            for domain in ("Page", "Runtime", "Log", "Network"):
                tools.call(f"{domain}.enable")
            tools.call(
                "Emulation.setDeviceMetricsOverride",
                width=WIDTH,
                height=HEIGHT,
                deviceScaleFactor=1,
                mobile=False,
            )
            tools.call("Page.navigate", url=url)
            tools.wait_for("Page.loadEventFired", timeout)
            time.sleep(0.3)  # let late console messages arrive
            found = json.loads(
                tools.call("Runtime.evaluate", expression=PAGE_CHECK, returnByValue=True)["result"][
                    "value"
                ]
            )
            evaluated, thrown = None, None
            if evaluate is not None:
                answer = tools.call("Runtime.evaluate", expression=evaluate, returnByValue=True)
                evaluated = answer["result"].get("value")
                thrown = answer.get("exceptionDetails")
            if screenshot is not None:
                params = {"format": "png"}
                if full:
                    params["captureBeyondViewport"] = True
                    params["clip"] = {
                        "x": 0,
                        "y": 0,
                        "width": WIDTH,
                        "height": min(found["height"], 16000),
                        "scale": 1,
                    }
                shot = tools.call("Page.captureScreenshot", **params)
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            tools.drain()
            events = browser.events
        finally:
            if ws is not None:
                ws.close()
            browser_close(process)
    result = _findings(found, events, url)
    if thrown is not None:
        text = thrown.get("exception", {}).get("description") or thrown.get("text")
        result["problems"].append(f"the evaluated expression threw: {text}")
    return {**result, "evaluated": evaluated}


class _Session:
    """The DevTools calls of one attached page (flat sessions over the browser's socket)."""

    def __init__(self, browser: DevTools, session_id: str):
        self.browser = browser
        self.session_id = session_id

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        return self.browser.call(method, timeout, session_id=self.session_id, **params)

    def wait_for(self, method: str, timeout: float) -> dict:
        return self.browser.wait_for(method, timeout)

    def drain(self) -> None:
        """Collect the events sent so far (a round trip: all before its answer)."""
        self.call("Runtime.evaluate", expression="0")


def browser_close(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _findings(found: dict, events: list[dict], url: str) -> dict:
    problems = []
    requests, errors = [], []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Network.requestWillBeSent":
            requested = params["request"]["url"]
            requests.append(requested)
            if requested != url and not requested.startswith("data:"):
                problems.append(f"request for {requested[:120]}")
        elif method == "Runtime.exceptionThrown":
            detail = params["exceptionDetails"]
            text = detail.get("exception", {}).get("description") or detail.get("text")
            errors.append(text)
            problems.append(f"script error: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            errors.append(text)
            problems.append(f"console error: {text}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            text = params["entry"].get("text", "")
            errors.append(text)
            problems.append(f"console error: {text}")
    for item in found["images"] + found["svgs"]:
        if not item["ok"]:
            problems.append(f"{item['what']} did not render ({item['size']})")
    return {
        "problems": problems,
        "images": found["images"],
        "svgs": found["svgs"],
        "requests": requests,
        "console_errors": errors,
        "sections": found["sections"],
        "title": found["title"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="the HTML file to check")
    parser.add_argument("--screenshot", type=Path, metavar="OUT.png", help="save a screenshot")
    parser.add_argument(
        "--full", action="store_true", help="screenshot the whole page, not the first screen"
    )
    parser.add_argument("--chromium", help="the browser to run (default: chromium on PATH)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds (default 60)")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        print(f"{args.page}: error: no such file", file=sys.stderr)
        return 2
    try:
        result = check(args.page, args.screenshot, args.full, args.chromium, args.timeout)
    except (FileNotFoundError, RuntimeError, ConnectionError, TimeoutError, OSError) as e:
        print(f"browser_check: error: {e}", file=sys.stderr)
        return 2
    for line in result["problems"]:
        print(f"FAIL {line}")
    images = [i for i in result["images"] if i["ok"]]
    svgs = [s for s in result["svgs"] if s["ok"]]
    print(
        f"{args.page}: {len(images)}/{len(result['images'])} images loaded, "
        f"{len(svgs)}/{len(result['svgs'])} SVGs rendered, "
        f"{len(result['requests'])} request(s) (the page itself"
        f"{' and data: URIs' if len(result['requests']) > 1 else ''}), "
        f"{len(result['console_errors'])} console error(s)"
        + (f"; screenshot {args.screenshot}" if args.screenshot else "")
    )
    print("ok" if not result["problems"] else f"{len(result['problems'])} problem(s)")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

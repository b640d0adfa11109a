"""A headless Chromium driven over the DevTools protocol, for tests of the web page.

Just enough of the protocol for a page test: open a tab, navigate, evaluate JavaScript, type,
wait for a condition, screenshot. Console errors and uncaught exceptions are collected in
`errors`, so a test can assert the page threw none. Failed image loads (a 404 before the first
frame) are network log entries, not console errors, and are not collected.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import websockets

CHROMIUM = "/usr/lib/chromium/chromium"  # the /usr/bin wrapper prints a shell warning first
FLAGS = ("--headless=new", "--no-sandbox", "--remote-debugging-port=0", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-quic")


class Browser:
    def __init__(self, proc: subprocess.Popen, ws, profile: str):
        self.proc, self.ws, self.profile = proc, ws, profile
        self.session: str | None = None
        self.errors: list[str] = []
        self._ids = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._waiters: list[tuple[str, asyncio.Future]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, width: int = 1280, height: int = 900) -> Browser:
        assert os.path.exists(CHROMIUM), f"no {CHROMIUM}: `make test` installs Debian's chromium package"
        profile = tempfile.mkdtemp(prefix="chromium-")
        # its own process group: close() ends its helpers (zygote, renderers) with it
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                                 "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 20
            while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start (exit {proc.poll()})")
                await asyncio.sleep(0.05)
            port, path = port_file.read_text().splitlines()[:2]
            ws = await websockets.connect(f"ws://127.0.0.1:{port}{path}", max_size=None)
        except BaseException:
            _end(proc, profile, grace=0)
            raise
        self = cls(proc, ws, profile)
        target = await self.send("Target.createTarget", {"url": "about:blank"}, browser=True)
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True},
                                   browser=True)
        self.session = attached["sessionId"]
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        # --window-size includes the browser's frame (the page got 1280x813): pin the page's own size
        await self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                               "deviceScaleFactor": 1, "mobile": False})
        return self

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.send("Browser.close", browser=True), 5)
        except Exception:  # already gone, or hung: killed below either way
            pass
        self._reader.cancel()
        await self.ws.close()
        await asyncio.to_thread(_end, self.proc, self.profile)

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg:
                fut = self._pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    if "error" in msg:
                        fut.set_exception(RuntimeError(f"DevTools: {msg['error']}"))
                    else:
                        fut.set_result(msg.get("result", {}))
                continue
            method, params = msg.get("method"), msg.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                d = params["exceptionDetails"]
                self.errors.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
            for name, fut in list(self._waiters):
                if name == method and not fut.done():
                    fut.set_result(params)
                    self._waiters.remove((name, fut))

    async def send(self, method: str, params: dict | None = None, *, browser: bool = False) -> dict:
        self._ids += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._ids] = fut
        msg = {"id": self._ids, "method": method, "params": params or {}}
        if not browser:
            msg["sessionId"] = self.session
        await self.ws.send(json.dumps(msg))
        return await asyncio.wait_for(fut, 30)

    async def navigate(self, url: str, timeout: float = 30) -> None:
        loaded = asyncio.get_running_loop().create_future()
        self._waiters.append(("Page.loadEventFired", loaded))
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise RuntimeError(f"navigation to {url} failed: {result['errorText']}")
        if "loaderId" in result:  # else a fragment change within the page: no load event follows
            await asyncio.wait_for(loaded, timeout)
        else:
            self._waiters.remove(("Page.loadEventFired", loaded))

    async def evaluate(self, expression: str):
        """The expression's value (JSON-able; a promise is awaited); a JS exception raises."""
        result = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                      "returnByValue": True})
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise RuntimeError(f"JS error in {expression!r}: {d.get('exception', {}).get('description') or d}")
        return result["result"].get("value")

    async def wait_for(self, predicate: str, timeout: float = 30, what: str = "") -> object:
        """Poll a JS expression until it is truthy; its value, or TimeoutError naming `what`."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(predicate)
            if value:
                return value
            if time.monotonic() > deadline:
                page = await self.evaluate("document.body.innerText.slice(0, 3000)")
                raise TimeoutError(f"waited {timeout} s for {what or predicate}; the page says:\n{page}")
            await asyncio.sleep(0.1)

    async def type(self, selector: str, text: str) -> None:
        """Focus the element and type into it as a user does (real input events)."""
        await self.evaluate(f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
                            f" el.focus(); el.select?.(); }})()")
        await self.send("Input.insertText", {"text": text})

    async def click(self, selector: str) -> None:
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    async def screenshot(self, path: Path) -> Path:
        data = await self.send("Page.captureScreenshot", {"format": "png"})
        Path(path).write_bytes(base64.b64decode(data["data"]))
        return Path(path)


def _end(proc: subprocess.Popen, profile: str, grace: float = 5) -> None:
    """Wait `grace` seconds for a clean exit, then kill the whole group; remove the profile."""
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group chromium leads: helpers still writing the profile
    except ProcessLookupError:
        pass
    proc.wait()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
async def browser():
    b = await Browser.start()
    try:
        yield b
    finally:
        await b.close()

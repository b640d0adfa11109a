"""The web page as a user sees it: a real `streamprune run` with `[http]`, loaded in headless
Chromium (tests/browser.py). The live frame shows, the health badge says streaming, a question
typed into the ask box gets its answer and evidence, the watch is listed, the page threw no
JavaScript error, and the process still stops cleanly on SIGTERM. With a token, the page asks for it."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from PIL import Image

from browser import browser  # noqa: F401  (fixture: headless Chromium)

CARD = ".camera[data-camera='cam']"


def _config(tmp_path: Path, token: str = "") -> Path:
    cfg = tmp_path / "web.toml"
    cfg.write_text(f"""
name = "cam"

[source]
kind = "synthetic"
width = 160
height = 120
fps = 4.0
duration_s = 600.0
realtime = true

[model]
name = "tiny-random"

[query]
max_new_tokens = 8

[output]
status_interval_s = 1.0
jsonl = ""

[[watches]]
name = "door"
question = "Is anyone at the door?"
every_s = 2.0

[http]
enabled = true
port = 0
token = {json.dumps(token)}
""")
    return cfg


class Service:
    """`streamprune run CONFIG` as a subprocess; its output is drained in threads (a full pipe
    would stall it) and `url` is read from the line it prints once serving."""

    def __init__(self, cfg: Path, model_cache: Path):
        env = {**os.environ, "STREAMPRUNE_CACHE": str(model_cache)}
        self.proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "run", str(cfg)], cwd=cfg.parent, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.url: str | None = None
        self.serving = threading.Event()
        threading.Thread(target=self._drain, args=(self.proc.stdout, self.out), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.err), daemon=True).start()

    def _drain(self, pipe, lines: list[str]) -> None:
        for line in pipe:
            lines.append(line)
            m = re.search(r"HTTP: web page and API on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                self.serving.set()
        self.serving.set()  # the process ended: stop waiting

    async def wait_serving(self, timeout: float = 90) -> str:
        await asyncio.to_thread(self.serving.wait, timeout)
        assert self.url, f"no HTTP line; stdout: {''.join(self.out)[-2000:]}\nstderr: {''.join(self.err)[-4000:]}"
        return self.url

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 20)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _not_blank(path: Path) -> int:
    """Distinct colours in the screenshot: a blank or one-colour page has one or two."""
    colors = Image.open(path).convert("RGB").getcolors(maxcolors=1 << 20)
    return len(colors)


async def test_page_shows_the_camera_answers_a_question_and_lists_its_watch(tmp_path, model_cache, browser):  # noqa: F811
    svc = Service(_config(tmp_path), model_cache)
    try:
        url = await svc.wait_serving()
        await browser.navigate(url)
        await browser.wait_for(f"document.querySelector(\"{CARD} .live-img\")?.naturalWidth > 0", 60,
                               "the live frame")
        await browser.wait_for(f"document.querySelector(\"{CARD} .health\").textContent === 'streaming'", 30,
                               "the health badge to say streaming")
        await browser.wait_for(f"document.querySelector(\"{CARD} [data-stat=memory]\").textContent !== '–'", 30,
                               "status numbers")
        latency = await browser.evaluate(f"document.querySelector(\"{CARD} [data-stat=latency]\").textContent")
        assert re.fullmatch(r"\d+\.\d\d s", latency), latency  # how far behind the camera the memory is
        for picture in ("sheet", "timeline"):  # shown once the memory holds video (404 before)
            await browser.wait_for(f"(() => {{ const i = document.querySelector(\"{CARD} img.{picture}\");"
                                   " return !i.hidden && i.naturalWidth > 0; })()", 60, f"the {picture} picture")
        assert await browser.evaluate(f"document.querySelector(\"{CARD} .memory-empty\").hidden")

        await browser.type(f"{CARD} .ask-input", "What do you see?")
        await browser.click(f"{CARD} .ask-button")
        evidence = await browser.wait_for(
            f"(() => {{ const e = document.querySelector(\"{CARD} .evidence\"); return !e.hidden && e.innerText; }})()",
            60, "the answer's evidence")
        assert re.search(r"video seen\s+\d+\.\d–\d+\.\d s", evidence), evidence
        assert re.search(r"visual tokens\s+[\d,]+ of [\d,]+ in memory", evidence), evidence
        assert await browser.evaluate(f"document.querySelector(\"{CARD} .answer-question\").textContent") \
            == "What do you see?"
        assert await browser.evaluate(f"document.querySelector(\"{CARD} .answer-error\").hidden")

        watch = await browser.wait_for(f"document.querySelector(\"{CARD} .watch[data-watch=door]\")?.innerText", 30,
                                       "the watch listed")
        assert "Is anyone at the door?" in watch and "every 2 s" in watch
        await browser.wait_for(f"!!document.querySelector(\"{CARD} .watch[data-watch=door] .watch-last\")", 60,
                               "the watch's first check")  # watch_check events reach the page

        shot = await browser.screenshot(tmp_path / "page.png")
        assert Image.open(shot).size == (1280, 900)
        assert _not_blank(shot) > 50
        assert await browser.evaluate("document.title") == "streamprune"
        assert (await browser.evaluate("document.querySelector('h1').textContent")).startswith("streamprune")
        from importlib.metadata import version

        assert await browser.evaluate("document.querySelector('#version').textContent") == f"v{version('streamprune')}"
        assert await browser.evaluate("document.querySelector('#conn').dataset.state") == "live"
        assert browser.errors == []

        assert await svc.stop() == 0, "".join(svc.err)[-4000:]
    finally:
        svc.kill()


async def test_page_asks_for_the_token_and_then_loads_the_camera(tmp_path, model_cache, browser):  # noqa: F811
    svc = Service(_config(tmp_path, token="s3cret"), model_cache)
    try:
        url = await svc.wait_serving()
        await browser.navigate(url)
        await browser.wait_for("!document.querySelector('#token-form').hidden", 30, "the token prompt")
        assert await browser.evaluate(f"document.querySelector(\"{CARD}\")") is None

        await browser.type("#token-input", "s3cret")
        await browser.click("#token-form button")
        await browser.wait_for(f"document.querySelector(\"{CARD} .live-img\")?.naturalWidth > 0", 60,
                               "the live frame with the token")
        await browser.wait_for("document.querySelector('#conn').dataset.state === 'live'", 30, "the event stream")
        assert await browser.evaluate("document.querySelector('#token-form').hidden")
        assert await browser.evaluate("localStorage.getItem('streamprune.token')") == "s3cret"

        # a link carrying the token opens the page without the prompt, and leaves the address bar
        await browser.evaluate("localStorage.clear()")
        await browser.navigate("about:blank")
        await browser.navigate(f"{url}#token=s3cret")
        await browser.wait_for(f"document.querySelector(\"{CARD} .live-img\")?.naturalWidth > 0", 60,
                               "the live frame from #token=")
        assert await browser.evaluate("location.hash") == ""
        assert await browser.evaluate("document.querySelector('#token-form').hidden")
        assert browser.errors == []

        assert await svc.stop() == 0, "".join(svc.err)[-4000:]
    finally:
        svc.kill()

// The streamprune web page: a card per camera (live frame, health, ask box, memory pictures,
// watches), kept current by the server's event stream. Plain DOM, no build step, no network
// beyond this server. Text from the server only ever goes in through textContent / append,
// never innerHTML. Paths are relative, so the page also works behind a proxy under a prefix.
"use strict";

const TOKEN_KEY = "streamprune.token";
const FRAME_MS = 1000;
const VISUALS_MS = 5000;
const RETRY_MS = 3000;
const HISTORY = 5; // answers kept per camera
const EVENTS = 20; // watch events kept per camera

const state = { token: "", cameras: new Map(), events: null, dropped: false };

class AuthNeeded extends Error {}

// ---- small helpers ------------------------------------------------------------------------

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) el.append(c); // strings become text nodes
  return el;
}

function num(v, digits = 0) {
  if (typeof v !== "number" || !Number.isFinite(v)) return "–";
  return v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function duration(s) {
  if (typeof s !== "number" || !Number.isFinite(s)) return "–";
  const t = Math.floor(s);
  const hh = Math.floor(t / 3600), mm = Math.floor((t % 3600) / 60), ss = t % 60;
  const two = (n) => String(n).padStart(2, "0");
  return hh ? `${hh}:${two(mm)}:${two(ss)}` : `${mm}:${two(ss)}`;
}

function ms(s) {
  return typeof s === "number" && Number.isFinite(s) ? (s < 1 ? `${num(s * 1000)} ms` : `${num(s, 2)} s`) : "–";
}

function clock(iso) {
  const d = iso ? new Date(iso) : null;
  return d && !Number.isNaN(d.getTime()) ? d.toLocaleTimeString([], { hour12: false }) : "–";
}

function span(a) {
  return `${num(a.t_start, 1)}–${num(a.t_end, 1)} s`;
}

// ---- the server ---------------------------------------------------------------------------

function readToken() {
  try {
    const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (m) {
      localStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search); // out of the address bar
    }
    return localStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return ""; // storage refused (private mode): ask for it
  }
}

// <img> and EventSource cannot send headers: they carry the token in the query
function withToken(url) {
  return state.token ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(state.token)}` : url;
}

function camUrl(name, rest) {
  return `api/cameras/${encodeURIComponent(name)}/${rest}`;
}

async function api(method, path, body) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (resp.status === 401) {
    askForToken();
    throw new AuthNeeded("this server needs an access token");
  }
  return resp;
}

async function errorMessage(resp) {
  try {
    const err = (await resp.json()).error;
    if (err && (err.message || err.code)) return String(err.message || err.code);
  } catch {
    // not JSON: say the status instead
  }
  return `the server answered ${resp.status} ${resp.statusText}`.trim();
}

async function* readSse(body) {
  // Server-sent events from a fetch() body (EventSource cannot POST): yields {event, data}.
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "", event = "", data = [];
  for (;;) {
    const { value, done } = await reader.read();
    buf += decoder.decode(value, { stream: !done });
    if (done) buf += "\n\n"; // ends a last event the server left unterminated
    let m;
    // a "\r" at the end of the buffer may be half of "\r\n": it waits for the next chunk
    while ((m = /\r\n|\n|\r(?=[^\n])/.exec(buf))) {
      const line = buf.slice(0, m.index);
      buf = buf.slice(m.index + m[0].length);
      if (line === "") {
        if (data.length) yield { event: event || "message", data: data.join("\n") };
        event = "";
        data = [];
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") event = val;
        else if (field === "data") data.push(val);
      }
    }
    if (done) return;
  }
}

function parse(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

// ---- the page -----------------------------------------------------------------------------

const $ = (sel, root = document) => root.querySelector(sel);

function setConn(s, label = s) {
  const el = $("#conn");
  el.dataset.state = s;
  el.textContent = label;
}

function askForToken() {
  const form = $("#token-form");
  if (!form.hidden) return;
  form.hidden = false;
  $("#token-error").textContent = state.token ? "That token was refused." : "";
  $("#loading").hidden = true;
  setConn("locked", "token needed");
  if (state.events) {
    state.events.close();
    state.events = null;
  }
  $("#token-input").focus();
}

$("#token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = $("#token-input").value.trim();
  try {
    localStorage.setItem(TOKEN_KEY, state.token);
  } catch {
    // kept for this page only
  }
  $("#token-form").hidden = true;
  $("#token-input").value = "";
  start();
});

async function loadCameras() {
  // Cameras and their state now; true when the server answered.
  const loading = $("#loading");
  let data;
  try {
    const resp = await api("GET", "api/cameras");
    if (!resp.ok) throw new Error(await errorMessage(resp));
    data = await resp.json();
  } catch (e) {
    if (e instanceof AuthNeeded) return false;
    loading.hidden = false;
    loading.textContent = `Cannot reach the server (${e.message}); retrying…`;
    setConn("offline");
    return false;
  }
  if (data.version) $("#version").textContent = `v${data.version}`;
  const cams = data.cameras || [];
  loading.hidden = cams.length > 0;
  if (!cams.length) loading.textContent = "This server has no cameras.";
  for (const cam of cams) {
    let card = state.cameras.get(cam.name);
    if (!card) {
      card = new CameraCard(cam.name);
      state.cameras.set(cam.name, card);
      $("#cameras").append(card.root);
    }
    card.update(cam);
  }
  return true;
}

async function start() {
  if (await loadCameras()) openEvents();
  else if ($("#token-form").hidden) setTimeout(start, RETRY_MS);
}

const HANDLERS = {
  status: (card, d) => card.setStatus(d),
  source_state: (card, d) => card.setHealth(d.new, d.health && d.health.last_error),
  group: (card, d) => card.groupAdded(d),
  answer: (card, d) => card.addHistory(d),
  error: (card, d) => card.addHistory(d, true),
  watches: (card, d) => card.setWatches(d.watches || []),
  watch_check: (card, d) => card.watchChecked(d),
  event: (card, d) => card.watchFired(d),
};

function openEvents() {
  if (state.events) return;
  const es = new EventSource(withToken("api/events"));
  state.events = es;
  es.onopen = () => {
    setConn("live");
    if (state.dropped) loadCameras(); // catch up on what happened while the stream was down
    state.dropped = false;
  };
  es.onerror = () => {
    state.dropped = true;
    setConn("reconnecting", "reconnecting…");
    if (es.readyState === EventSource.CLOSED) {
      // refused outright (a bad token, too many clients): EventSource gives up, so start over
      state.events = null;
      setTimeout(start, RETRY_MS);
    }
  };
  for (const [name, handle] of Object.entries(HANDLERS)) {
    es.addEventListener(name, (ev) => {
      const d = parse(ev.data);
      const card = d && state.cameras.get(d.camera);
      if (card) handle(card, d);
    });
  }
}

// ---- one camera ---------------------------------------------------------------------------

class CameraCard {
  constructor(name) {
    this.name = name;
    this.root = $("#camera-template").content.firstElementChild.cloneNode(true);
    this.root.dataset.camera = name;
    this.q(".camera-name").textContent = name;
    this.watches = [];
    this.asking = false;

    this.q(".ask").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const input = this.q(".ask-input");
      if (this.asking) return; // one question at a time per card; the text stays in the box
      this.ask(input.value);
      input.value = ""; // the question shows above its answer
    });
    this.q(".watch-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.addWatch(ev.target);
    });
    this.liveImg = this.q(".live-img");
    this.liveImg.addEventListener("load", () => this.frameLoaded(true));
    this.liveImg.addEventListener("error", () => this.frameLoaded(false));
    this.visuals = [...this.root.querySelectorAll("img[data-visual]")];
    for (const img of this.visuals) {
      img.addEventListener("load", () => this.visualLoaded(img, true));
      img.addEventListener("error", () => this.visualLoaded(img, false));
    }
    this.refreshFrame();
    this.refreshVisuals();
  }

  q(sel) {
    return this.root.querySelector(sel);
  }

  update(cam) {
    if (cam.status && Object.keys(cam.status).length) this.setStatus(cam.status);
    if (cam.health) this.setHealth(cam.health);
    this.setWatches(cam.watches || []);
  }

  // -- live view and memory pictures: one request in flight each, the next after it settles

  refreshFrame() {
    if (document.hidden) {
      setTimeout(() => this.refreshFrame(), FRAME_MS);
      return;
    }
    this.liveImg.src = withToken(`${camUrl(this.name, "frame.jpg")}?t=${Date.now()}`);
  }

  frameLoaded(ok) {
    // the img keeps showing the last frame while the next loads; a 404 means no frame yet
    this.liveImg.hidden = !ok;
    this.q(".live-wait").hidden = ok;
    setTimeout(() => this.refreshFrame(), FRAME_MS);
  }

  refreshVisuals() {
    clearTimeout(this.visualsTimer);
    this.visualsTimer = setTimeout(() => this.refreshVisuals(), VISUALS_MS);
    if (document.hidden) return;
    const t = Date.now();
    for (const img of this.visuals) img.src = withToken(`${camUrl(this.name, img.dataset.visual)}?t=${t}`);
  }

  visualLoaded(img, ok) {
    img.hidden = !ok; // 404 while the memory is empty
    this.q(".memory-empty").hidden = this.visuals.some((i) => !i.hidden);
  }

  groupAdded(d) {
    this.stat("memory", num(d.memory_tokens));
    if (!this.q(".memory-empty").hidden) this.refreshVisuals(); // the first group: show it now
  }

  // -- health

  setHealth(s, why) {
    const badge = this.q(".health");
    badge.dataset.state = s;
    badge.textContent = s;
    badge.title = why ? String(why) : "";
  }

  stat(key, text) {
    this.q(`[data-stat="${key}"]`).textContent = text;
  }

  setStatus(s) {
    this.stat("stream", duration(s.stream_s));
    this.stat("fps", num(s.fps_in, 1));
    this.stat("memory", num(s.memory_tokens));
    this.stat("dropped", num(s.dropped));
    this.stat("latency", typeof s.ingest_latency_ms === "number" ? `${num(s.ingest_latency_ms / 1000, 2)} s` : "–");
    this.stat("answers", num(s.answers));
    const cache = s.prompt_cache && typeof s.prompt_cache.tokens === "number";
    this.q('[data-stat-box="cache"]').hidden = !cache;
    if (cache) this.stat("cache", num(s.prompt_cache.tokens));
    if (s.source && s.source.state) this.setHealth(s.source.state, s.source.last_error);
  }

  // -- asking

  async ask(question) {
    if (this.asking) return;
    this.asking = true;
    const button = this.q(".ask-button");
    button.disabled = true;
    const box = this.q(".answer");
    const text = this.q(".answer-text");
    box.hidden = false;
    box.classList.add("streaming");
    this.q(".answer-question").textContent = question;
    text.textContent = "";
    this.q(".answer-error").hidden = true;
    this.q(".evidence").hidden = true;
    let finished = false;
    try {
      const resp = await api("POST", camUrl(this.name, "ask"), { question, stream: true });
      if (!resp.ok) {
        this.answerError(await errorMessage(resp));
        return;
      }
      for await (const { event, data } of readSse(resp.body)) {
        const d = parse(data);
        if (!d) continue;
        if (event === "text") {
          text.textContent += String(d.text ?? "");
        } else if (event === "answer") {
          text.textContent = String(d.text ?? "");
          this.showEvidence(d);
          finished = true;
        } else if (event === "error") {
          this.answerError(d.message || d.code, d.code);
          finished = true;
        }
      }
      if (!finished) this.answerError("the answer stream ended before the answer");
    } catch (e) {
      this.answerError(e instanceof AuthNeeded ? "this server needs an access token" : e.message);
    } finally {
      this.asking = false;
      button.disabled = false;
      box.classList.remove("streaming");
    }
  }

  answerError(message, code) {
    const el = this.q(".answer-error");
    el.hidden = false;
    el.textContent = code && code !== message ? `${code}: ${message}` : String(message);
  }

  showEvidence(a) {
    const dl = this.q(".evidence");
    const row = (term, value) => h("div", null, h("dt", null, term), h("dd", null, value));
    const prompt = `${a.prompt_path || "–"}, ${num(a.prefilled_tokens)} of ${num(a.prompt_tokens)} tokens prefilled`;
    dl.replaceChildren(
      row("video seen", span(a)),
      row("groups", num(a.groups)),
      row("visual tokens", `${num(a.tokens_used)} of ${num(a.memory_tokens)} in memory`),
      row("first token", ms(a.ttft_s)),
      row("total", ms(a.total_s)),
      row("prompt", prompt),
    );
    dl.hidden = false;
  }

  addHistory(d, failed = false) {
    const list = this.q(".history");
    const head = h("div", { class: "history-head" }, h("time", null, clock(d.timestamp)),
      h("span", { class: "origin" }, d.origin || ""), failed ? null : h("span", { class: "span" }, span(d)));
    const body = failed
      ? h("p", { class: "error-text" }, `${d.code}: ${d.message}`)
      : h("p", { class: "history-answer" }, String(d.text ?? ""));
    list.prepend(h("li", { class: failed ? "failed" : "" }, head, h("p", { class: "history-q" }, d.question || ""), body));
    while (list.children.length > HISTORY) list.lastElementChild.remove();
    this.q(".history-box").hidden = false;
  }

  // -- watches

  setWatches(watches) {
    this.watches = watches;
    this.renderWatches();
  }

  watchChecked(d) {
    const w = this.watches.find((x) => x.name === d.watch);
    if (!w) return;
    Object.assign(w, { last_answer: d.answer, matches: d.matches, last_checked: d.timestamp || w.last_checked });
    if (d.outcome === "fire") w.active = true;
    else if (d.outcome === "clear") w.active = false;
    this.renderWatches();
  }

  renderWatches() {
    const list = this.q(".watches");
    list.replaceChildren(...this.watches.map((w) => this.watchItem(w)));
    this.q(".no-watches").hidden = this.watches.length > 0;
  }

  watchItem(w) {
    const holds = w.matches === true ? ["yes", "holds now"]
      : w.matches === false ? ["no", "does not hold"]
        : w.last_answer != null ? ["unclear", "unclear"] : ["none", "not checked yet"];
    const remove = h("button", { type: "button", class: "remove", title: `remove watch ${w.name}` }, "Remove");
    remove.addEventListener("click", () => this.removeWatch(w.name, remove));
    const when = [];
    if (w.every_s > 0) {
      when.push(`every ${+w.every_s.toFixed(2)} s`);
      if (w.slowed && w.effective_every_s) when.push(`slowed to ${num(w.effective_every_s, 1)} s`);
    }
    if (w.on_scene_change) when.push("on scene change");
    when.push(`fires on ${w.trigger}`, `checked ${clock(w.last_checked)}`);
    return h("li", { class: "watch", dataset: { watch: w.name } },
      h("div", { class: "watch-head" },
        h("strong", { class: "watch-name" }, w.name),
        h("span", { class: "badge match", dataset: { match: holds[0] } }, holds[1]),
        w.active ? h("span", { class: "badge active" }, "active") : null,
        remove),
      h("p", { class: "watch-q" }, w.question),
      h("p", { class: "watch-meta" }, when.join(" · ")),
      w.last_answer != null ? h("p", { class: "watch-last" }, "last answer: ", h("q", null, String(w.last_answer))) : null);
  }

  watchError(message) {
    this.q(".watch-error").textContent = message || "";
  }

  async addWatch(form) {
    const f = new FormData(form);
    const spec = { name: f.get("name").trim(), question: f.get("question").trim(), every_s: Number(f.get("every_s")),
      trigger: f.get("trigger") };
    this.watchError("");
    try {
      const resp = await api("POST", camUrl(this.name, "watches"), spec);
      if (!resp.ok) return this.watchError(await errorMessage(resp));
      const body = await resp.json();
      if (body.watches) this.setWatches(body.watches);
      form.reset();
    } catch (e) {
      this.watchError(e.message);
    }
  }

  async removeWatch(name, button) {
    button.disabled = true;
    this.watchError("");
    try {
      const resp = await api("DELETE", camUrl(this.name, `watches/${encodeURIComponent(name)}`));
      if (!resp.ok) {
        button.disabled = false;
        return this.watchError(await errorMessage(resp));
      }
      this.setWatches(this.watches.filter((w) => w.name !== name)); // the `watches` event confirms it
    } catch (e) {
      button.disabled = false;
      this.watchError(e.message);
    }
  }

  watchFired(d) {
    const list = this.q(".events");
    let thumb = null;
    if (d.snapshot_url) {
      const url = new URL(d.snapshot_url, location.href);
      if (url.origin === location.origin) { // only this server's pictures
        thumb = h("img", { class: "thumb", alt: `snapshot when ${d.watch} fired`, loading: "lazy" });
        thumb.src = withToken(url.pathname + url.search);
      }
    }
    list.prepend(h("li", { class: "event" }, thumb,
      h("div", null,
        h("div", { class: "history-head" }, h("time", null, clock(d.timestamp)), h("strong", null, d.watch || ""),
          h("span", { class: "span" }, span(d))),
        h("p", { class: "history-q" }, d.question || ""),
        h("p", { class: "history-answer" }, String(d.answer ?? "")))));
    while (list.children.length > EVENTS) list.lastElementChild.remove();
    this.q(".events-box").hidden = false;
  }
}

window.addEventListener("hashchange", () => {
  // a #token=... pasted into an open page: use it from now on
  if (!/token=/.test(location.hash)) return;
  state.token = readToken();
  $("#token-form").hidden = true;
  if (state.events) state.events.close();
  state.events = null;
  start();
});

state.token = readToken();
start();

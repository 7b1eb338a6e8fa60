// The ollama-proxy dashboard: one stream of snapshots (/-/events), the admin drain paths, and a
// chat playground through the proxy's own /api/chat. No dependencies, nothing from elsewhere.
"use strict";

const TOKEN_KEY = "ollama-proxy-token";
const NODE_HEADER = "X-Ollama-Proxy-Node";
const QUEUE_HISTORY = 300; // snapshots of queue depth kept for its chart (about 5 minutes)
const COLORS = ["#2f7de1", "#e8590c", "#2b8a3e", "#ae3ec9", "#c92a2a", "#5c940d"];

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  stream: null, // the AbortController of the open /-/events request
  retry: null, // the timer of the next connection attempt
  queueHistory: [], // {at, byKey: {name: waiting}}
  cards: new Map(), // node name → its card's elements
  chat: [], // the playground's messages, sent whole each turn
  generation: null, // the AbortController of the chat answer under way
  firstSnapshot: true, // the playground is set up on the first snapshot after signing in
  isKey: false, // the token signed in with is a client key
};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function authHeaders(secret) {
  return secret ? { Authorization: `Bearer ${secret}` } : {};
}

// -- signing in ---------------------------------------------------------------------------

async function checkAccess() {
  let answer;
  try {
    const response = await fetch("/-/access", { headers: authHeaders(state.token), cache: "no-store" });
    answer = await response.json();
  } catch (error) {
    setStatus("the proxy does not answer; trying again");
    scheduleRetry(checkAccess, 2000);
    return;
  }
  if (answer.admin) {
    state.isKey = !!answer.key;
    showDashboard();
  } else {
    showLogin(state.token ? "That token does not open the admin paths." : answer.message || "");
  }
}

function showLogin(message) {
  stopStream();
  $("dashboard").hidden = true;
  $("sign-out").hidden = true;
  $("login").hidden = false;
  $("login-message").textContent = message;
  setStatus("signed out");
  $("token").focus();
}

function showDashboard() {
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("sign-out").hidden = !state.token;
  state.firstSnapshot = true;
  connect();
}

// Signed in with a client key (one with `admin`), the playground chats with it unless told
// otherwise. Signed in with admin.token it sends no key: that token is for the proxy alone,
// and without keys configured it would go on to the node.
function playgroundReady() {
  if (state.isKey && !$("key").value) $("key").value = state.token;
  if (!$("model").options.length) refreshModels();
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  $("token").value = "";
  sessionStorage.setItem(TOKEN_KEY, state.token);
  checkAccess();
});

$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  if ($("key").value === state.token) $("key").value = "";
  state.token = "";
  showLogin("");
});

// -- the event stream ---------------------------------------------------------------------

function setStatus(text) {
  $("status").textContent = text;
}

function scheduleRetry(action, delay) {
  clearTimeout(state.retry);
  state.retry = setTimeout(action, delay);
}

function stopStream() {
  clearTimeout(state.retry);
  if (state.stream) state.stream.abort();
  state.stream = null;
}

// EventSource cannot send a header: the stream is read with fetch, so the token stays out of
// URLs and logs.
async function connect() {
  stopStream();
  const control = (state.stream = new AbortController());
  try {
    const response = await fetch("/-/events", {
      headers: authHeaders(state.token),
      signal: control.signal,
      cache: "no-store",
    });
    if (response.status === 401 || response.status === 403) {
      showLogin("Signed out: the token no longer opens the admin paths.");
      return;
    }
    if (!response.ok || !response.body) throw new Error(`status ${response.status}`);
    setStatus("live");
    await readEvents(response.body, control);
    setStatus("the proxy ended the stream; reconnecting");
  } catch (error) {
    if (control.signal.aborted) return;
    setStatus("disconnected; reconnecting");
  }
  if (state.stream === control) scheduleRetry(checkAccess, 1000);
}

// The pieces of a streamed body between separators, as they complete, until it ends or
// the control is aborted (a piece may arrive split over several reads).
async function* pieces(body, separator, control) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  while (!control.signal.aborted) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf(separator)) >= 0) {
      yield buffer.slice(0, end);
      buffer = buffer.slice(end + separator.length);
    }
  }
}

async function readEvents(body, control) {
  for await (const block of pieces(body, "\n\n", control)) {
    const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6));
    if (data.length) render(JSON.parse(data.join("\n")));
  }
}

// -- rendering a snapshot -----------------------------------------------------------------

function render(snapshot) {
  if (state.firstSnapshot) {
    state.firstSnapshot = false;
    playgroundReady();
  }
  if (snapshot.proxy.shutting_down) setStatus("live; the proxy is stopping");
  renderNodes(snapshot.nodes);
  renderTraffic(snapshot);
  renderRequests(snapshot.recent);
  renderUsage(snapshot.usage);
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
}

function clock(wallSeconds) {
  return new Date(wallSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

function renderNodes(nodes) {
  const seen = new Set();
  for (const node of nodes) {
    seen.add(node.name);
    let card = state.cards.get(node.name);
    if (!card) {
      card = makeCard(node.name);
      state.cards.set(node.name, card);
    }
    $("nodes").append(card.root); // in the snapshot's order
    updateCard(card, node);
  }
  for (const [name, card] of state.cards) {
    if (!seen.has(name)) {
      card.root.remove();
      state.cards.delete(name);
    }
  }
}

function makeCard(name) {
  const card = {
    root: el("article", { class: "card", "data-node": name }),
    badge: el("span", { class: "badge" }),
    url: el("p", { class: "url" }),
    fill: el("span", { class: "fill" }),
    slots: el("p", { class: "slots-text" }),
    models: el("ul", { class: "models" }),
    errors: el("p", { class: "errors" }),
    drain: el("button", { type: "button", class: "drain" }),
  };
  card.bar = el("div", { class: "bar", role: "meter", "aria-valuemin": "0", "aria-label": `slots in use on ${name}` }, card.fill);
  card.drain.addEventListener("click", () => toggleDrain(name, card));
  card.root.append(
    el("header", {}, el("h3", { text: name }), card.badge),
    card.url, card.bar, card.slots, card.models, card.errors, card.drain,
  );
  return card;
}

function updateCard(card, node) {
  const status = !node.up ? "down" : node.state;
  card.root.dataset.state = status;
  card.badge.textContent = status;
  card.badge.className = `badge ${status}`;
  card.url.textContent = `${node.url}${node.version ? ` · Ollama ${node.version}` : ""}`;
  const max = node.max_concurrency;
  card.bar.setAttribute("aria-valuemax", String(max));
  card.bar.setAttribute("aria-valuenow", String(node.in_flight));
  card.fill.style.width = `${Math.min(100, (100 * node.in_flight) / max)}%`;
  const queued = node.queued_for_it ? ` · ${node.queued_for_it} queued for it` : "";
  card.slots.textContent = `${node.in_flight} / ${max} slots${queued}`;
  card.models.replaceChildren(...modelItems(node));
  const rate = node.requests ? ` (${Math.round((100 * node.errors) / node.requests)} %)` : "";
  let errors = `errors, 5 min: ${node.errors} of ${node.requests}${rate}`;
  const last = node.recent_errors[node.recent_errors.length - 1];
  if (last && (!node.up || node.errors)) errors += ` · last: ${last.error} (${last.at})`;
  card.errors.textContent = errors;
  card.errors.classList.toggle("bad", !node.up || node.errors > 0);
  card.drain.textContent = node.state === "draining" ? "Undrain" : "Drain";
  card.drain.disabled = node.state === "removed";
  card.drain.setAttribute("aria-label", `${card.drain.textContent} ${node.name}`);
}

function modelItems(node) {
  const names = new Set([...(node.models || []), ...Object.keys(node.resident_until)]);
  if (!names.size) return [el("li", { class: "hint", text: node.models ? "no models" : "models not listed yet" })];
  return [...names].sort().map((model) => {
    const item = el("li", { class: "model" }, el("span", { class: "model-name", text: model }));
    const until = node.resident_until[model];
    if (until) item.append(el("span", { class: "memory", text: `in memory until ${clock(until)}` }));
    const speed = node.tokens_per_second[model];
    const load = node.load_seconds[model];
    const learned = [speed ? `${speed.toFixed(1)} tok/s` : "", load ? `load ${seconds(load)}` : ""];
    const text = learned.filter(Boolean).join(" · ");
    if (text) item.append(el("span", { class: "learned", text }));
    return item;
  });
}

async function toggleDrain(name, card) {
  const undrain = card.drain.textContent === "Undrain";
  const path = `/-/nodes/${encodeURIComponent(name)}/${undrain ? "ready" : "drain"}`;
  card.drain.disabled = true;
  try {
    const response = await fetch(path, { method: "POST", headers: authHeaders(state.token) });
    if (!response.ok) throw new Error((await response.json()).error || `status ${response.status}`);
    notice("");
  } catch (error) {
    notice(`${undrain ? "Undrain" : "Drain"} of ${name} failed: ${error.message}`);
  }
  card.drain.disabled = false; // the next snapshot, sent at once, shows the new state
}

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function renderTraffic(snapshot) {
  const { queue, traffic } = snapshot;
  const pair = (p) => `${seconds(p.p50)} / ${seconds(p.p99)}`;
  $("fig-queue").textContent = String(queue.depth);
  $("fig-wait").textContent = pair(traffic.queue_wait);
  $("fig-ttfb").textContent = pair(traffic.ttfb);
  $("fig-tokens").textContent = traffic.tokens_per_second.toFixed(1);
  const byKey = {};
  for (const [name, counts] of Object.entries(queue.by_key)) byKey[name || "(no key)"] = counts.waiting;
  state.queueHistory.push({ at: snapshot.at, byKey });
  if (state.queueHistory.length > QUEUE_HISTORY) state.queueHistory.shift();
  const keys = [...new Set(state.queueHistory.flatMap((h) => Object.keys(h.byKey)))].slice(0, COLORS.length);
  const queueSeries = keys.map((key) => ({ name: key, points: state.queueHistory.map((h) => [h.at, h.byKey[key] || 0]) }));
  drawChart($("chart-queue"), queueSeries.length ? queueSeries : [{ name: "queued", points: state.queueHistory.map((h) => [h.at, 0]) }]);
  const points = (field) => traffic.series.map((p) => [p.at, p[field]]);
  drawChart($("chart-ttfb"), [{ name: "p50", points: points("ttfb_p50") }, { name: "p99", points: points("ttfb_p99") }]);
  drawChart($("chart-wait"), [{ name: "p50", points: points("queue_p50") }, { name: "p99", points: points("queue_p99") }]);
  drawChart($("chart-tokens"), [{ name: "tokens/s", points: points("tokens_per_second") }]);
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

// A small line chart: each series' [x, y] points (y null: no value there), scaled to the box.
function drawChart(target, series) {
  const [width, height, left, top, bottom] = [300, 120, 34, 14, 16];
  const all = series.flatMap((s) => s.points).filter(([, y]) => y !== null && y !== undefined);
  const xs = series.flatMap((s) => s.points.map(([x]) => x));
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const peak = Math.max(0, ...all.map(([, y]) => y));
  const scaleX = (x) => left + ((x - x0) / Math.max(1e-9, x1 - x0)) * (width - left - 4);
  const scaleY = (y) => height - bottom - (peak > 0 ? y / peak : 0) * (height - top - bottom);
  const parts = [
    svg("line", { x1: left, y1: height - bottom, x2: width - 4, y2: height - bottom, class: "axis" }),
    label(2, top + 4, peak > 0 ? shortNumber(peak) : ""),
    label(2, height - bottom, "0"),
  ];
  if (xs.length) parts.push(label(left, height - 2, clock(x0)), label(width - 50, height - 2, clock(x1)));
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    let path = "";
    let pen = "M";
    for (const [x, y] of s.points) {
      if (y === null || y === undefined) { pen = "M"; continue; }
      path += `${pen}${scaleX(x).toFixed(1)},${scaleY(y).toFixed(1)} `;
      pen = "L";
    }
    if (path) parts.push(svg("path", { d: path, fill: "none", stroke: color, "stroke-width": 1.6 }));
    if (s.points.length <= 60) { // a point alone draws no line: each one is marked
      for (const [x, y] of s.points) {
        if (y !== null && y !== undefined) parts.push(svg("circle", { cx: scaleX(x).toFixed(1), cy: scaleY(y).toFixed(1), r: 1.8, fill: color }));
      }
    }
    const legend = label(left + 4 + i * 70, 10, s.name);
    legend.setAttribute("fill", color);
    parts.push(legend);
  });
  target.replaceChildren(...parts);
}

function label(x, y, text) {
  const node = svg("text", { x, y, class: "chart-label" });
  node.textContent = text;
  return node;
}

function shortNumber(value) {
  if (value >= 1000) return `${(value / 1000).toFixed(1)}k`;
  return value >= 10 ? value.toFixed(0) : String(Number(value.toPrecision(2)));
}

function cell(text) {
  return el("td", { text: text === null || text === undefined ? "–" : String(text) });
}

function renderRequests(recent) {
  const rows = recent.map((r) => {
    const row = el("tr", {},
      cell(clock(r.at)), cell(r.method), cell(r.path), cell(r.model), cell(r.key), cell(r.node),
      cell(r.status), cell(seconds(r.ttfb_s)), cell(r.tokens_out === null ? null : `${r.tokens_in ?? "–"} / ${r.tokens_out}`));
    if (r.status >= 400) row.className = r.status >= 500 ? "bad" : "warn";
    return row;
  });
  $("requests").tBodies[0].replaceChildren(...rows);
}

function renderUsage(keys) {
  $("usage-none").hidden = keys.length > 0;
  $("usage-wrap").hidden = keys.length === 0;
  const windowCell = (w) => {
    const td = el("td", { text: w.limit === null ? `${w.used}` : `${w.used} / ${w.limit}` });
    if (w.limit) {
      const fill = el("span", { class: "fill" });
      fill.style.width = `${Math.min(100, (100 * w.used) / w.limit)}%`;
      td.append(el("div", { class: "bar small", role: "meter", "aria-valuemin": "0", "aria-valuemax": String(w.limit), "aria-valuenow": String(w.used) }, fill));
    }
    return td;
  };
  const rows = keys.map((k) => el("tr", {},
    cell(k.name),
    cell(Object.values(k.requests).reduce((a, b) => a + b, 0)),
    cell(`${k.tokens.prompt} / ${k.tokens.completion}`),
    windowCell(k.windows.requests_per_minute),
    windowCell(k.windows.tokens_per_minute),
    windowCell(k.windows.tokens_per_day)));
  $("usage").tBodies[0].replaceChildren(...rows);
}

// -- the playground -----------------------------------------------------------------------

function chatHeaders() {
  return { "Content-Type": "application/json", ...authHeaders($("key").value.trim()) };
}

async function refreshModels() {
  const select = $("model");
  const chosen = select.value;
  try {
    const response = await fetch("/api/tags", { headers: chatHeaders(), cache: "no-store" });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `status ${response.status}`);
    const names = body.models.map((m) => m.name).sort();
    select.replaceChildren(...names.map((name) => el("option", { value: name, text: name })));
    if (names.includes(chosen)) select.value = chosen;
    $("chat-stats").textContent = names.length ? "" : "No node lists a model.";
  } catch (error) {
    $("chat-stats").textContent = `Models could not be listed: ${error.message}`;
  }
}

$("refresh-models").addEventListener("click", refreshModels);
$("key").addEventListener("change", refreshModels);
$("play-settings").addEventListener("submit", (event) => {
  event.preventDefault(); // Enter in the key field: list the models that key may use
  refreshModels();
});

$("new-chat").addEventListener("click", () => {
  if (state.generation) state.generation.abort();
  state.chat = [];
  $("transcript").replaceChildren();
  $("chat-stats").textContent = "";
  $("prompt").focus();
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

$("stop").addEventListener("click", () => {
  if (state.generation) state.generation.abort();
});

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.generation || !$("model").value) return;
  $("prompt").value = "";
  state.chat.push({ role: "user", content: text });
  $("transcript").append(el("li", { class: "turn user" }, el("p", { text })));
  answer($("model").value);
});

function generating(control) {
  state.generation = control;
  $("stop").disabled = !control;
  $("send").disabled = !!control;
}

async function answer(model) {
  const text = el("p", { class: "answer-text" });
  const meta = el("p", { class: "meta", text: "waiting…" });
  const turn = el("li", { class: "turn assistant" }, text, meta);
  $("transcript").append(turn);
  const control = new AbortController();
  const history = state.chat; // "New chat" meanwhile starts another: this answer stays here
  generating(control);
  const started = performance.now();
  const run = { node: "–", first: null, tokens: 0, final: null, content: "" };
  try {
    const response = await fetch("/api/chat", {
      method: "POST",
      headers: chatHeaders(),
      body: JSON.stringify({ model, messages: history, stream: true }),
      signal: control.signal,
    });
    run.node = response.headers.get(NODE_HEADER) || "–";
    if (!response.ok) throw new Error((await response.json()).error || `status ${response.status}`);
    meta.textContent = `node ${run.node} · generating…`;
    await readAnswer(response.body, run, text, started, control);
    if (run.final && run.final.error) throw new Error(run.final.error);
    meta.textContent = summary(run, started);
  } catch (error) {
    meta.textContent = control.signal.aborted ? `stopped · ${summary(run, started)}` : `error: ${error.message}`;
    turn.classList.add(control.signal.aborted ? "stopped" : "failed");
  } finally {
    generating(null);
  }
  if (run.content) history.push({ role: "assistant", content: run.content });
  else history.pop(); // no answer: the question goes, so the next turn is not two in a row
  $("chat-stats").textContent = meta.textContent;
  text.scrollIntoView({ block: "nearest" });
}

async function readAnswer(body, run, text, started, control) {
  for await (const piece of pieces(body, "\n", control)) {
    const line = piece.trim();
    if (line) take(JSON.parse(line), run, text, started);
  }
}

function take(chunk, run, text, started) {
  if (chunk.error) { run.final = chunk; return; }
  const piece = (chunk.message && chunk.message.content) || "";
  if (piece) {
    if (run.first === null) run.first = performance.now() - started;
    run.tokens += 1;
    run.content += piece;
    text.textContent = run.content;
  }
  if (chunk.done) run.final = chunk;
}

function summary(run, started) {
  const parts = [`node ${run.node}`];
  if (run.first !== null) parts.push(`first token ${seconds(run.first / 1000)}`);
  const final = run.final;
  if (final && final.eval_count && final.eval_duration) {
    parts.push(`${(final.eval_count / (final.eval_duration / 1e9)).toFixed(1)} tokens/s`, `${final.eval_count} tokens`);
  } else if (run.tokens && run.first !== null) {
    const elapsed = (performance.now() - started - run.first) / 1000;
    if (elapsed > 0) parts.push(`${(run.tokens / elapsed).toFixed(1)} tokens/s`);
    parts.push(`${run.tokens} tokens`);
  }
  return parts.join(" · ");
}

checkAccess();

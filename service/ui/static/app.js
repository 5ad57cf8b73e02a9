/* limbic live view: plain JS on limbic's public HTTP API (same origin). Server data only ever reaches the
   page through textContent and attributes, never parsed as markup. */
"use strict";

(function () {
  const HEADLINE = ["desperate", "panicked", "calm"];
  const LINE_COLOURS = { desperate: "#c0262d", panicked: "#e07b00", calm: "#1f6fd1" };
  const SVG_NS = "http://www.w3.org/2000/svg";
  const POLL_MS = 5000;
  const KEY_STORAGE = "limbic.apiKey";

  const $ = (id) => document.getElementById(id);

  const state = {
    model: null,
    messages: [], // the running history sent each turn
    busy: false,
    controller: null,
    reply: null, // the current reply: {tokens: [{index, scores, text}], alertIds: Set}
    alertIds: new Set(),
    actionKeys: new Set(),
    trajectoryId: null,
    turnsKnown: false, // whether the chat's conversation has at least one turn on the server
  };

  /* ---------- small helpers ---------- */

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else node.setAttribute(k, String(v));
    }
    return node;
  }

  function fmt(z, digits = 2) {
    if (typeof z !== "number" || !Number.isFinite(z)) return "–";
    return (z >= 0 ? "+" : "") + z.toFixed(digits);
  }

  function timeOf(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleTimeString([], { hour12: false });
  }

  function newConversationId() {
    const bytes = new Uint8Array(6);
    crypto.getRandomValues(bytes);
    return "c-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  /* Diverging scale: blue at -3 and below, white at 0, red at +3 and above. */
  function colourFor(z) {
    if (typeof z !== "number" || !Number.isFinite(z)) return "";
    const t = Math.max(-1, Math.min(1, z / 3));
    const end = t >= 0 ? [214, 39, 40] : [44, 105, 200];
    const a = Math.abs(t);
    const mix = (c) => Math.round(255 + (c - 255) * a);
    return `rgb(${mix(end[0])}, ${mix(end[1])}, ${mix(end[2])})`;
  }

  function inkFor(z) {
    return typeof z === "number" && Math.abs(z) > 2.2 ? "#fff" : "";
  }

  /* ---------- errors ---------- */

  let lastError = "";
  function showError(message) {
    lastError = String(message);
    $("error-text").textContent = lastError;
    $("error").hidden = false;
  }
  function clearError() {
    lastError = "";
    $("error").hidden = true;
  }

  class APIError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  function describeError(body, status) {
    let message = describeBody(body, status);
    if (status === 401) message += " (enter an API key at the top right)";
    if (status === 403) message += " (the alerts, conversations and reviews panels need an admin key)";
    return message;
  }

  function describeBody(body, status) {
    const e = body && body.error;
    if (e && typeof e === "object") {
      let m = e.message || JSON.stringify(e);
      if (e.param) m += ` (param: ${e.param})`;
      return status ? `HTTP ${status}: ${m}` : m;
    }
    if (typeof e === "string") return status ? `HTTP ${status}: ${e}` : e;
    if (body && body.detail) return `HTTP ${status}: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`;
    return `HTTP ${status}`;
  }

  /* ---------- HTTP ---------- */

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    if (opts.json !== undefined) {
      opts.body = JSON.stringify(opts.json);
      opts.headers["Content-Type"] = "application/json";
      delete opts.json;
    }
    let response;
    try {
      response = await fetch(path, opts);
    } catch (err) {
      throw new APIError(`cannot reach limbic (${path}): ${err.message}`, 0);
    }
    if (!response.ok) {
      let body = null;
      try {
        body = await response.json();
      } catch (_) {
        /* not JSON */
      }
      throw new APIError(describeError(body, response.status), response.status);
    }
    return response.json();
  }

  /* ---------- model ---------- */

  async function loadModel() {
    try {
      const models = await api("/v1/models");
      state.model = models.data && models.data.length ? models.data[0].id : null;
      $("model").textContent = state.model || "none served";
    } catch (err) {
      $("model").textContent = "unavailable";
      showError(err.message);
    }
  }

  /* ---------- chat ---------- */

  function requestedEmotions() {
    const chosen = $("emotion").value;
    const all = Array.from($("emotion").options, (o) => o.value);
    // The headline three and the colouring emotion first; the other choices too, so recolouring works.
    return Array.from(new Set([...HEADLINE, chosen, ...all]));
  }

  function scoresTitle(token) {
    const head = `${token.phase} token ${token.index}`;
    if (!token.scores) return `${head}\nattention sink: not scored`;
    const lines = Object.entries(token.scores).map(([e, z]) => `${e}: ${fmt(z)}`);
    return `${head}\n${lines.join("\n")}`;
  }

  function paintToken(span) {
    const emotion = $("emotion").value;
    const raw = span.dataset.scores;
    const scores = raw && raw !== "null" ? JSON.parse(raw) : null;
    const z = scores ? scores[emotion] : undefined;
    span.style.backgroundColor = colourFor(z);
    span.style.color = inkFor(z);
    span.classList.toggle("unscored", !scores || typeof z !== "number");
  }

  function tokenSpan(token, text, extraClass) {
    const span = el("span", {
      class: "token" + (extraClass ? " " + extraClass : ""),
      title: scoresTitle(token),
      dataset: { index: String(token.index), phase: token.phase, scores: JSON.stringify(token.scores) },
    });
    span.textContent = text;
    paintToken(span);
    return span;
  }

  function recolourAll() {
    document.querySelectorAll(".token").forEach(paintToken);
    drawTimeline();
  }

  function addBubble(role, text) {
    $("chat-empty").hidden = true;
    const body = el("div", { class: "bubble-body" });
    if (text !== undefined) body.textContent = text;
    const bubble = el("div", { class: "bubble " + role }, el("div", { class: "bubble-role", text: role }), body);
    $("chat").append(bubble);
    $("chat").scrollTop = $("chat").scrollHeight;
    return { bubble, body };
  }

  function resetChat() {
    state.messages = [];
    state.alertIds.clear();
    state.actionKeys.clear();
    state.turnsKnown = false;
    state.reply = null;
    $("chat").querySelectorAll(".bubble").forEach((b) => b.remove());
    $("chat-empty").hidden = false;
    $("alerts").replaceChildren();
    $("actions").replaceChildren();
    $("finish").textContent = "–";
    $("finish").className = "mono";
    $("reply-summary").textContent = "";
    drawTimeline();
    showTrajectory(null, $("conversation-id").value.trim());
  }

  function setBusy(busy) {
    state.busy = busy;
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("message").readOnly = busy;
  }

  async function send(event) {
    if (event) event.preventDefault();
    if (state.busy) return;
    const text = $("message").value;
    if (!text.trim()) return;
    const conversation = $("conversation-id").value.trim();
    if (!conversation) {
      showError("A conversation id is needed (or press New conversation).");
      return;
    }
    clearError();
    if (!state.model) await loadModel();
    if (!state.model) return;

    const old = document.getElementById("reply");
    if (old) old.removeAttribute("id");
    const user = addBubble("user", text);
    const assistant = addBubble("assistant");
    assistant.body.id = "reply";
    assistant.bubble.classList.add("streaming");
    $("message").value = "";
    $("finish").textContent = "…";
    $("finish").className = "mono";
    $("reply-summary").textContent = "";

    const history = state.messages.concat([{ role: "user", content: text }]);
    const reply = { tokens: [], alerts: [], content: "", promptTokens: [], userBubble: user, body: assistant.body };
    state.reply = reply;
    drawTimeline();

    const body = {
      model: state.model,
      messages: history,
      stream: true,
      limbic: { token_scores: true, emotions: requestedEmotions() },
    };
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (Number.isFinite(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;

    setBusy(true);
    state.controller = new AbortController();
    let finish = null;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json", "X-Limbic-Conversation": conversation }),
        body: JSON.stringify(body),
        signal: state.controller.signal,
      });
      if (!response.ok) {
        let err = null;
        try {
          err = await response.json();
        } catch (_) {
          /* not JSON */
        }
        throw new APIError(describeError(err, response.status), response.status);
      }
      finish = await readStream(response, reply);
      if (finish === null && !reply.failed) showError("The stream ended without a finish reason.");
    } catch (err) {
      reply.failed = true;
      if (err.name === "AbortError") {
        $("finish").textContent = "stopped by you";
      } else {
        showError(err.message);
        $("finish").textContent = "error";
        $("finish").className = "mono bad";
      }
    } finally {
      setBusy(false);
      state.controller = null;
      assistant.bubble.classList.remove("streaming");
    }
    if (reply.content || reply.tokens.length) {
      state.messages = history.concat([{ role: "assistant", content: reply.content }]);
    } else {
      // Nothing came back: the turn is not part of the history sent next time.
      assistant.body.append(el("span", { class: "hint", text: "(no reply)" }));
      user.bubble.classList.add("failed");
    }
    if (finish !== null) state.turnsKnown = true;
    refreshAfterReply(conversation);
  }

  /* Reads an SSE body with fetch + ReadableStream; returns the finish reason (null if none came). */
  async function readStream(response, reply) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finish = null;
    let done = false;
    while (!done) {
      const result = await reader.read();
      if (result.done) {
        buffer += decoder.decode();
        done = true;
      } else {
        buffer += decoder.decode(result.value, { stream: true });
      }
      buffer = buffer.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0 || (done && buffer.trim())) {
        let block;
        if (cut >= 0) {
          block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
        } else {
          block = buffer;
          buffer = "";
        }
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return finish;
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch (_) {
          showError("Unreadable stream chunk: " + data.slice(0, 200));
          continue;
        }
        const f = handleChunk(chunk, reply);
        if (f) finish = f;
      }
    }
    return finish;
  }

  function handleChunk(chunk, reply) {
    if (chunk.error) {
      reply.failed = true;
      showError("limbic: " + describeError(chunk, 0));
      $("finish").textContent = "error";
      $("finish").className = "mono bad";
      return null;
    }
    const choice = (chunk.choices || []).find((c) => (c.index || 0) === 0);
    const delta = (choice && choice.delta) || {};
    const content = typeof delta.content === "string" ? delta.content : "";
    reply.content += content;
    const ext = chunk.limbic || {};
    const tokens = Array.isArray(ext.tokens) ? ext.tokens : [];
    const generated = tokens.filter((t) => t.phase === "generation");
    const prompt = tokens.filter((t) => t.phase === "prompt");
    if (prompt.length) addPromptTokens(reply, prompt);
    if (generated.length) {
      const withText = generated.some((t) => typeof t.text === "string");
      generated.forEach((t, i) => {
        let text = t.text;
        if (typeof text !== "string") text = withText ? "" : i === generated.length - 1 ? content : "";
        reply.tokens.push({ index: t.index, scores: t.scores, text });
        reply.body.append(tokenSpan(t, text));
      });
      scheduleTimeline();
    } else if (content) {
      reply.body.append(el("span", { class: "plain", text: content }));
    }
    if (Array.isArray(ext.alerts)) ext.alerts.forEach(addAlert);
    if (Array.isArray(ext.actions)) ext.actions.forEach(addAction);
    $("chat").scrollTop = $("chat").scrollHeight;
    const finish = choice && choice.finish_reason;
    if (finish) {
      showFinish(finish, ext);
      showSummary(ext);
      return finish;
    }
    return null;
  }

  function addPromptTokens(reply, tokens) {
    if (!reply.promptDetails) {
      const summary = el("summary", { text: "scored prompt" });
      const strip = el("div", { class: "prompt-strip" });
      reply.promptDetails = el("details", { class: "prompt-tokens" }, summary, strip);
      reply.promptStrip = strip;
      reply.promptSummary = summary;
      reply.userBubble.bubble.append(reply.promptDetails);
    }
    for (const t of tokens) {
      reply.promptTokens.push(t);
      reply.promptStrip.append(tokenSpan(t, typeof t.text === "string" ? t.text : "·", "prompt"));
    }
    reply.promptSummary.textContent = `scored prompt (${reply.promptTokens.length} tokens, chat template included)`;
  }

  function showFinish(finish, ext) {
    const node = $("finish");
    node.className = "mono";
    if (finish === "content_filter") {
      const abort = (ext.actions || []).find((a) => a.action === "abort");
      node.textContent = "content_filter: limbic aborted the generation" + (abort ? ` (${abort.emotion} ${abort.severity})` : "");
      node.classList.add("bad");
    } else {
      node.textContent = finish;
      if (finish === "length") node.classList.add("warn");
    }
  }

  function showSummary(ext) {
    const gen = ext.generation || {};
    const parts = HEADLINE.filter((e) => gen[e]).map((e) => `${e} ${fmt(gen[e].mean)} / ${fmt(gen[e].max)}`);
    $("reply-summary").textContent = parts.length ? "generation mean / max: " + parts.join(" · ") : "";
  }

  /* ---------- alerts and actions ---------- */

  function severityBadge(severity) {
    return el("span", { class: "badge sev-" + (severity || "none"), text: severity || "?" });
  }

  function alertItem(a, compact) {
    const where = a.phase === "conversation" ? `conversation ${a.conversation_id || ""}`.trim() : `${a.phase || "?"} token ${a.token_index ?? "?"}`;
    const head = el(
      "div",
      { class: "row" },
      severityBadge(a.severity),
      el("strong", { text: a.emotion || "?" }),
      el("span", { class: "mono", text: `${fmt(a.score)} ≥ ${fmt(a.threshold, 1)}` }),
      a.action && a.action !== "observe" ? el("span", { class: "badge action", text: a.action }) : null,
      a.kind ? el("span", { class: "badge kind", text: a.kind }) : null,
    );
    const meta = el("div", { class: "meta", text: [where, timeOf(a.time), compact ? a.request_id : null].filter(Boolean).join(" · ") });
    return el("li", { class: "alert sev-" + (a.severity || "none"), dataset: { id: a.id || "" }, title: JSON.stringify(a, null, 1) }, head, meta);
  }

  function compactAlert(a, withTime) {
    let where = a.phase === "conversation" ? "conversation" : `${a.phase || "?"}@${a.token_index ?? "?"}`;
    if (withTime === true) where = `${timeOf(a.time)} · ${where}`;
    return el(
      "li",
      { class: "alert compact sev-" + (a.severity || "none"), dataset: { id: a.id || "" }, title: JSON.stringify(a, null, 1) },
      severityBadge(a.severity),
      " ",
      el("strong", { text: a.emotion || "?" }),
      el("span", { class: "mono", text: ` ${fmt(a.score)} ≥ ${fmt(a.threshold, 1)} ` }),
      el("span", { class: "meta", text: where }),
      a.action && a.action !== "observe" ? el("span", { class: "badge action", text: a.action }) : null,
    );
  }

  function addAlert(a) {
    if (!a || typeof a !== "object") return;
    const id = a.id || JSON.stringify(a);
    if (state.alertIds.has(id)) return;
    state.alertIds.add(id);
    if (state.reply) state.reply.alerts.push(a);
    $("alerts").prepend(alertItem(a, false));
    scheduleTimeline();
  }

  function addAction(a) {
    if (!a || typeof a !== "object") return;
    const key = `${a.action}|${a.alert_id}|${a.token_index}`;
    if (state.actionKeys.has(key)) return;
    state.actionKeys.add(key);
    $("actions").prepend(
      el(
        "li",
        { class: "action-item", dataset: { action: a.action || "" } },
        el("span", { class: "badge action", text: a.action || "?" }),
        ` ${a.emotion || "?"} `,
        severityBadge(a.severity),
        el("span", { class: "meta", text: ` at token ${a.token_index ?? "?"}` }),
      ),
    );
  }

  async function loadServerAlerts() {
    try {
      const listed = await api("/v1/alerts?limit=20");
      const list = $("server-alerts");
      list.replaceChildren(...(listed.data || []).map((a) => compactAlert(a, true)));
      if (!list.children.length) list.append(el("li", { class: "hint", text: "No alerts yet." }));
    } catch (err) {
      reportPollError(err);
    }
  }

  function reportPollError(err) {
    if (err.message !== lastError) showError(err.message);
  }

  /* ---------- timeline ---------- */

  let timelineQueued = false;
  function scheduleTimeline() {
    if (timelineQueued) return;
    timelineQueued = true;
    requestAnimationFrame(() => {
      timelineQueued = false;
      drawTimeline();
    });
  }

  function legend(node, items) {
    node.replaceChildren(
      ...items.map(([label, colour, dashed]) =>
        el("span", { class: "legend-item" }, el("span", { class: "swatch" + (dashed ? " dashed" : ""), style: `border-color: ${colour}` }), label),
      ),
    );
  }

  function axes(root, box, lo, hi, xLabel) {
    const { left, right, top, bottom, width, height } = box;
    const y = (v) => top + ((hi - v) / (hi - lo)) * (height - top - bottom);
    for (let v = Math.ceil(lo); v <= Math.floor(hi); v++) {
      if (v % (hi - lo > 8 ? 2 : 1)) continue;
      root.append(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: v === 0 ? "zero" : "grid" }));
      root.append(svg("text", { x: left - 6, y: y(v) + 3.5, class: "tick", "text-anchor": "end", text: v }));
    }
    root.append(svg("text", { x: left - 6, y: height - 6, class: "tick", "text-anchor": "end", text: xLabel }));
    return y;
  }

  /* Tick values for an integer axis from a to b, about `count` of them. */
  function xTicks(a, b, count) {
    const raw = Math.max(1, (b - a) / count);
    const step = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000].find((s) => s >= raw) || raw;
    const ticks = [];
    for (let v = Math.ceil(a / step) * step; v <= b; v += step) ticks.push(v);
    return ticks;
  }

  function drawTimeline() {
    const host = $("timeline");
    const tokens = state.reply ? state.reply.tokens : [];
    const width = Math.max(300, host.clientWidth || 420);
    const height = 190;
    const box = { left: 30, right: 8, top: 8, bottom: 22, width, height };
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "per-token scores of the reply" });
    const scored = tokens.filter((t) => t.scores);
    const values = scored.flatMap((t) => HEADLINE.map((e) => t.scores[e]).filter((v) => typeof v === "number"));
    const lo = Math.min(-3, Math.floor(Math.min(...values, 0)));
    const hi = Math.max(4, Math.ceil(Math.max(...values, 0)));
    const y = axes(root, box, lo, hi, "token");
    const first = tokens.length ? tokens[0].index : 0;
    const last = tokens.length ? tokens[tokens.length - 1].index : 1;
    const span = Math.max(1, last - first);
    const x = (i) => box.left + ((i - first) / span) * (width - box.left - box.right);
    if (tokens.length) {
      for (const v of xTicks(first, last, 8)) {
        root.append(svg("text", { x: x(v), y: height - 6, class: "tick", "text-anchor": "middle", text: v }));
      }
    }

    // Alert markers for generation alerts of the current reply.
    if (state.reply) {
      for (const a of state.reply.alerts) {
        if (a.phase !== "generation" || typeof a.token_index !== "number") continue;
        root.append(svg("line", { x1: x(a.token_index), x2: x(a.token_index), y1: box.top, y2: height - box.bottom, class: "marker sev-" + a.severity }));
      }
    }
    let points = 0;
    for (const emotion of HEADLINE) {
      const pts = scored.filter((t) => typeof t.scores[emotion] === "number").map((t) => `${x(t.index).toFixed(1)},${y(t.scores[emotion]).toFixed(1)}`);
      points = Math.max(points, pts.length);
      if (pts.length === 1) {
        const [px, py] = pts[0].split(",");
        root.append(svg("circle", { cx: px, cy: py, r: 3, fill: LINE_COLOURS[emotion], "data-emotion": emotion }));
      } else if (pts.length > 1) {
        root.append(svg("polyline", { points: pts.join(" "), fill: "none", stroke: LINE_COLOURS[emotion], "stroke-width": 1.8, "data-emotion": emotion, class: "series" }));
      }
    }
    if (!tokens.length) {
      root.append(svg("text", { x: width / 2, y: height / 2, class: "empty", "text-anchor": "middle", text: "waiting for a reply" }));
    }
    host.replaceChildren(root);
    host.dataset.points = String(points);
  }

  /* ---------- trajectory ---------- */

  function showTrajectory(conversation, id) {
    state.trajectoryId = id || null;
    $("trajectory-id").textContent = id || "";
    const turns = (conversation && conversation.turns) || [];
    $("trajectory").dataset.turns = String(turns.length);
    state.lastTurns = turns;
    drawTrajectory(turns);
    const rows = turns.map((t) => {
      const gen = t.generation || {};
      const cell = (e) =>
        el(
          "td",
          { class: "mono", title: gen[e] ? `${e}: generation mean ${fmt(gen[e].mean)}, max ${fmt(gen[e].max)}` : "" },
          gen[e] ? fmt(gen[e].mean) : "–",
          gen[e] ? el("span", { class: "max", text: " " + fmt(gen[e].max) }) : null,
        );
      const alerts = t.alerts || [];
      const worst = alerts.some((a) => a.severity === "critical") ? "critical" : alerts.length ? "warning" : "none";
      const alertCell = el(
        "td",
        { title: alerts.map((a) => `${a.severity} ${a.emotion} ${a.phase} ${fmt(a.score)}${a.action ? " → " + a.action : ""}`).join("\n") },
        alerts.length ? el("span", { class: "badge sev-" + worst, text: String(alerts.length) }) : "–",
      );
      return el(
        "tr",
        { dataset: { turn: String(t.turn) } },
        el("td", { text: t.turn }),
        el("td", { class: "mono", text: timeOf(t.time), title: t.request_id || "" }),
        cell("desperate"),
        cell("panicked"),
        cell("calm"),
        alertCell,
        el("td", { class: "mono" + (t.finish_reason === "content_filter" ? " bad" : ""), text: t.finish_reason || "–" }),
      );
    });
    $("turns").tBodies[0].replaceChildren(...rows);
    $("turns").hidden = !turns.length;
    $("trajectory-flag").hidden = !(conversation && conversation.flagged);
  }

  function drawTrajectory(turns) {
    const host = $("trajectory-chart");
    const width = Math.max(300, host.clientWidth || 420);
    const height = 150;
    const box = { left: 30, right: 12, top: 8, bottom: 22, width, height };
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "per-turn generation scores" });
    const values = turns.flatMap((t) => HEADLINE.flatMap((e) => (t.generation && t.generation[e] ? [t.generation[e].mean, t.generation[e].max] : [])).filter((v) => typeof v === "number"));
    const lo = Math.min(-2, Math.floor(Math.min(...values, 0)));
    const hi = Math.max(3, Math.ceil(Math.max(...values, 0)));
    const y = axes(root, box, lo, hi, "turn");
    const n = turns.length;
    const x = (i) => (n <= 1 ? (box.left + width - box.right) / 2 : box.left + 10 + (i / (n - 1)) * (width - box.left - box.right - 20));
    turns.forEach((t, i) => {
      root.append(svg("text", { x: x(i), y: height - 6, class: "tick", "text-anchor": "middle", text: t.turn }));
    });
    for (const emotion of HEADLINE) {
      for (const stat of ["mean", "max"]) {
        const pts = [];
        turns.forEach((t, i) => {
          const s = t.generation && t.generation[emotion];
          if (s && typeof s[stat] === "number") pts.push([x(i), y(s[stat])]);
        });
        if (pts.length > 1) {
          root.append(svg("polyline", { points: pts.map((p) => p.map((v) => v.toFixed(1)).join(",")).join(" "), fill: "none", stroke: LINE_COLOURS[emotion], "stroke-width": stat === "mean" ? 2 : 1.2, "stroke-dasharray": stat === "max" ? "4 3" : "", "data-emotion": emotion, "data-stat": stat }));
        }
        for (const [px, py] of pts) {
          root.append(svg("circle", { cx: px.toFixed(1), cy: py.toFixed(1), r: stat === "mean" ? 3.5 : 2.5, fill: stat === "mean" ? LINE_COLOURS[emotion] : "#fff", stroke: LINE_COLOURS[emotion], "data-emotion": emotion, "data-stat": stat }));
        }
      }
    }
    if (!n) root.append(svg("text", { x: width / 2, y: height / 2, class: "empty", "text-anchor": "middle", text: "no turns yet" }));
    host.replaceChildren(root);
  }

  async function loadTrajectory(id, quietIfMissing) {
    if (!id) return;
    try {
      const conversation = await api("/v1/conversations/" + encodeURIComponent(id));
      showTrajectory(conversation, id);
    } catch (err) {
      if (err.status === 404 && quietIfMissing) showTrajectory(null, id);
      else if (err.status === 404) {
        showTrajectory(null, id);
        showError(`Conversation ${id}: ${err.message}`);
      } else showError(err.message);
    }
  }

  async function loadFlagged() {
    try {
      const listed = await api("/v1/conversations?flagged=true&limit=50");
      const items = (listed.data || []).map((c) =>
        el(
          "li",
          { class: "flagged-item", dataset: { id: c.id } },
          el(
            "button",
            { type: "button", class: "link", title: "Show this conversation's trajectory", onclick: () => loadTrajectory(c.id, false) },
            c.id,
          ),
          el("span", { class: "meta", text: ` ${c.turns ?? "?"} turn${c.turns === 1 ? "" : "s"} · ${Array.isArray(c.alerts) ? c.alerts.length : c.alerts ?? 0} alert(s) · ${timeOf(c.last_time)}` }),
        ),
      );
      $("flagged").replaceChildren(...items);
      if (!items.length) $("flagged").append(el("li", { class: "hint", text: "None flagged." }));
    } catch (err) {
      reportPollError(err);
    }
  }

  /* ---------- reviews ---------- */

  function reviewItem(r) {
    const alerts = el("ul", { class: "review-alerts" }, ...(r.alerts || []).map((a) => compactAlert(a)));
    const gen = r.generation || {};
    const summary = HEADLINE.filter((e) => gen[e]).map((e) => `${e} ${fmt(gen[e].mean)}/${fmt(gen[e].max)}`).join(" · ");
    const item = el(
      "li",
      { class: "review status-" + (r.status || "open"), dataset: { id: r.id, status: r.status || "", conversation: r.conversation_id || "" } },
      el("div", { class: "row" }, el("strong", { class: "mono", text: r.id }), el("span", { class: "meta", text: timeOf(r.time) })),
      el("div", { class: "meta", text: [r.conversation_id ? `conversation ${r.conversation_id}` : "no conversation", r.request_id, r.finish_reason ? `finish ${r.finish_reason}` : null].filter(Boolean).join(" · ") }),
      summary ? el("div", { class: "meta mono", text: "generation mean/max: " + summary }) : null,
      alerts,
    );
    if (r.text || r.prompt_text || r.generation_text) {
      item.append(el("blockquote", { text: r.generation_text || r.text || r.prompt_text }));
    }
    if ((r.status || "open") === "open") {
      const note = el("input", { type: "text", class: "note", placeholder: "note (optional)", maxlength: 2000 });
      const buttons = ["confirmed", "false_positive", "escalated"].map((verdict) =>
        el("button", { type: "button", class: "verdict verdict-" + verdict, onclick: () => resolveReview(r.id, verdict, note, item) }, verdict.replace("_", " ")),
      );
      item.append(el("div", { class: "review-actions" }, note, ...buttons));
    } else if (r.resolution) {
      item.append(el("div", { class: "meta" }, el("span", { class: "badge verdict-" + r.resolution.verdict, text: r.resolution.verdict }), ` ${r.resolution.note || ""} · ${timeOf(r.resolution.time)}`));
    }
    return item;
  }

  async function loadReviews() {
    const status = $("review-status").value;
    try {
      const listed = await api("/v1/reviews?status=" + encodeURIComponent(status) + "&limit=100");
      const list = $("reviews");
      const data = listed.data || [];
      const wanted = new Set(data.map((r) => r.id));
      // Keyed update: items already shown stay (a note being typed survives the poll).
      const shown = new Map();
      list.querySelectorAll(":scope > li").forEach((li) => {
        if (!li.dataset.id || !wanted.has(li.dataset.id) || li.dataset.status !== (data.find((r) => r.id === li.dataset.id) || {}).status) li.remove();
        else shown.set(li.dataset.id, li);
      });
      let previous = null;
      for (const r of data) {
        const li = shown.get(r.id) || reviewItem(r);
        if (previous) previous.after(li);
        else list.prepend(li);
        previous = li;
      }
      if (!data.length) list.append(el("li", { class: "hint", text: status === "open" ? "Nothing to review." : "None." }));
      $("review-count").textContent = String(data.length);
    } catch (err) {
      reportPollError(err);
    }
  }

  async function resolveReview(id, verdict, noteInput, item) {
    item.querySelectorAll("button.verdict").forEach((b) => (b.disabled = true));
    try {
      await api("/v1/reviews/" + encodeURIComponent(id), { method: "POST", json: { verdict, note: noteInput.value } });
      item.remove();
    } catch (err) {
      showError(`Review ${id}: ${err.message}`);
      item.querySelectorAll("button.verdict").forEach((b) => (b.disabled = false));
    }
    loadReviews();
  }

  /* ---------- wiring ---------- */

  function refreshAfterReply(conversation) {
    if (state.turnsKnown) loadTrajectory(conversation, true);
    loadReviews();
    loadServerAlerts();
    loadFlagged();
  }

  function init() {
    $("conversation-id").value = newConversationId();
    $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
    $("key-form").addEventListener("submit", (e) => e.preventDefault());
    $("api-key").addEventListener("change", () => {
      const key = $("api-key").value.trim();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
      clearError();
      loadModel();
      loadReviews();
      loadServerAlerts();
      loadFlagged();
    });
    $("new-conversation").addEventListener("click", () => {
      if (state.busy) return;
      $("conversation-id").value = newConversationId();
      resetChat();
      $("message").focus();
    });
    $("conversation-id").addEventListener("change", () => {
      if (state.busy) return;
      resetChat();
      const id = $("conversation-id").value.trim();
      if (id) loadTrajectory(id, true);
    });
    $("composer").addEventListener("submit", send);
    $("message").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
    });
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());
    $("emotion").addEventListener("change", recolourAll);
    $("error-close").addEventListener("click", clearError);
    $("refresh-alerts").addEventListener("click", loadServerAlerts);
    $("refresh-flagged").addEventListener("click", loadFlagged);
    $("refresh-trajectory").addEventListener("click", () => {
      const id = state.trajectoryId || $("conversation-id").value.trim();
      loadTrajectory(id, id === $("conversation-id").value.trim() && !state.turnsKnown);
    });
    $("review-status").addEventListener("change", () => {
      $("reviews").replaceChildren();
      loadReviews();
    });
    legend($("timeline-legend"), HEADLINE.map((e) => [e, LINE_COLOURS[e], false]));
    legend($("trajectory-legend"), [...HEADLINE.map((e) => [e, LINE_COLOURS[e], false]), ["mean (solid) / max (dashed)", "#888", true]]);
    showTrajectory(null, $("conversation-id").value);
    drawTimeline();
    window.addEventListener("resize", () => {
      drawTimeline();
      drawTrajectory(state.lastTurns || []);
    });
    loadModel();
    loadServerAlerts();
    loadReviews();
    loadFlagged();
    setInterval(() => {
      if (document.hidden) return;
      loadServerAlerts();
      loadReviews();
    }, POLL_MS);
    setInterval(() => {
      if (!document.hidden) loadFlagged();
    }, POLL_MS * 3);
  }

  init();
})();

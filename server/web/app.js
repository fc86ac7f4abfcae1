// ztna-recorder dashboard: plain JS, no build step, embedded in the server binary.
//
// Everything shown comes from users (machine names, metadata, commands), so nothing from the
// API is ever parsed as HTML: elements are built with createElement and textContent.
// The token lives in sessionStorage only (gone with the tab), never in a URL.
"use strict";

(function () {
  const API = "/api/session-recording";
  const CAST = "/api/session-recording/cast";
  const POLL_MS = 2000;
  const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

  const $ = (id) => document.getElementById(id);

  const state = {
    token: sessionStorage.getItem("ztna.token") || "",
    org: sessionStorage.getItem("ztna.org") || "",
    offset: 0,
    total: 0,
    machines: new Map(), // machine_id -> name (or null), from every list page seen
    listSeq: 0,
    player: null, // the open recording: see openRecording
    admin: null, // whether the token's user is an org admin: null until a `list` says
  };

  // ---------------------------------------------------------------- errors and messages

  class ApiError extends Error {
    constructor(code, message, status) {
      super(message);
      this.code = code;
      this.status = status;
    }
  }

  const EXPLAIN = {
    UNAUTHORIZED: "Your token is missing, malformed, expired or not signed by this server. Sign in with a fresh one (an admin makes it with `ztna-recorder-server admin token`).",
    FORBIDDEN: "Not allowed: you are not a member of this org, this needs the admin role, or the recording is not yours.",
    FEATURE_DISABLED: "Session recording is not enabled for this org.",
    RECORDING_DISABLED: "Recording is switched off in this org's settings.",
    NOT_FOUND: "No such recording in this org (it may have been deleted).",
    CONFLICT: "The recording is not in a state that allows this.",
    INVALID_FIELD: "A value was not accepted.",
    MISSING_FIELDS: "A required value is missing.",
    INVALID_JSON: "The request was not understood.",
    UNKNOWN_ACTION: "The server does not know this action (is it an older version?).",
    PAYLOAD_TOO_LARGE: "The request is too large.",
    INTERNAL_ERROR: "The server failed; see its log.",
  };

  function describe(err) {
    if (err instanceof ApiError) {
      const why = EXPLAIN[err.code] || "The server refused the request.";
      return `${why} (${err.code}: ${err.message})`;
    }
    if (err instanceof TypeError) {
      return `Cannot reach the server: ${err.message}`;
    }
    return String((err && err.message) || err);
  }

  function showMessage(text, kind) {
    $("message-text").textContent = text;
    $("message").classList.toggle("info", kind === "info");
    $("message").hidden = false;
  }
  function showError(err) {
    showMessage(describe(err), "error");
  }
  function clearMessage() {
    $("message").hidden = true;
    $("message-text").textContent = "";
  }

  // ---------------------------------------------------------------- API

  async function readError(res) {
    let body = null;
    try {
      body = await res.json();
    } catch (_) {
      // not JSON: fall through
    }
    if (body && body.error && typeof body.error.code === "string") {
      return new ApiError(body.error.code, String(body.error.message || ""), res.status);
    }
    return new ApiError(`HTTP_${res.status}`, `the server answered HTTP ${res.status} ${res.statusText}`, res.status);
  }

  async function api(action, fields) {
    const res = await fetch(API, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${state.token}` },
      body: JSON.stringify(Object.assign({ action, org_id: state.org }, fields || {})),
      cache: "no-store",
    });
    let body;
    try {
      body = await res.json();
    } catch (_) {
      throw new ApiError(`HTTP_${res.status}`, `the server answered HTTP ${res.status} without a JSON body`, res.status);
    }
    if (!body || body.success !== true) {
      const e = (body && body.error) || {};
      throw new ApiError(String(e.code || `HTTP_${res.status}`), String(e.message || "request failed"), res.status);
    }
    return body.data;
  }

  // The whole cast, or (fromChunk) only the chunks from that index on, with what the
  // server says about the recording in its X-Recording-* headers.
  async function fetchCast(sessionId, fromChunk) {
    const q = new URLSearchParams({ org_id: state.org, session_id: sessionId });
    if (fromChunk !== undefined) q.set("from_chunk", String(fromChunk));
    const res = await fetch(`${CAST}?${q}`, {
      headers: { Authorization: `Bearer ${state.token}` },
      cache: "no-store",
    });
    if (!res.ok) throw await readError(res);
    // Read piece by piece: the server cuts the body short when a chunk's object is missing
    // (it has sent the answer's status already), and what came before that still plays.
    let text = "";
    let partial = false;
    const decoder = new TextDecoder();
    const reader = res.body.getReader();
    for (;;) {
      let step;
      try {
        step = await reader.read();
      } catch (_) {
        partial = true;
        break;
      }
      if (step.done) break;
      text += decoder.decode(step.value, { stream: true });
    }
    text += decoder.decode();
    // Whole lines only.
    if (partial) text = text.slice(0, text.lastIndexOf("\n") + 1);
    const num = (h) => Number(res.headers.get(h)) || 0;
    return {
      text,
      partial,
      status: res.headers.get("x-recording-status") || "",
      chunks: num("x-recording-chunks"),
      sent: num("x-recording-chunks-sent"),
      next: num("x-recording-next-chunk"),
    };
  }

  // ---------------------------------------------------------------- formatting

  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null) continue;
        if (k === "class") e.className = v;
        else if (k === "text") e.textContent = v;
        else if (k === "dataset") Object.assign(e.dataset, v);
        else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
        else e.setAttribute(k, v);
      }
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  function fmtTime(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtDuration(secs) {
    if (typeof secs !== "number" || !Number.isFinite(secs) || secs < 0) return "—";
    secs = Math.round(secs);
    const h = Math.floor(secs / 3600);
    const m = Math.floor((secs % 3600) / 60);
    const s = secs % 60;
    if (h > 0) return `${h}h ${pad(m)}m ${pad(s)}s`;
    if (m > 0) return `${m}m ${pad(s)}s`;
    return `${s}s`;
  }

  function durationOf(rec) {
    if (rec.status === "active") {
      const started = Date.parse(rec.started_at);
      if (Number.isNaN(started)) return "—";
      return `${fmtDuration(Math.max(0, (Date.now() - started) / 1000))} so far`;
    }
    return fmtDuration(rec.duration_seconds);
  }

  function machineLabel(rec) {
    if (rec.machine_name !== null && rec.machine_name !== undefined) return String(rec.machine_name);
    const md = rec.metadata || {};
    if (typeof md.machine_name === "string") return `${md.machine_name} (deleted)`;
    return rec.machine_id ? String(rec.machine_id) : "(deleted machine)";
  }

  function userLabel(rec) {
    const md = rec.metadata || {};
    return typeof md.user === "string" && md.user ? md.user : String(rec.user_id || "");
  }

  function badge(status) {
    const known = status === "active" || status === "completed";
    return el("span", { class: `badge ${known ? status : ""}`, text: String(status) });
  }

  // A recording whose recorder died before the session ended holds only what was spooled.
  function interruptedBadge(rec) {
    const md = (rec && rec.metadata) || {};
    if (md.interrupted !== true) return null;
    return el("span", {
      class: "badge interrupted",
      text: "interrupted",
      title: "The recorder stopped before the session ended: this holds what was recorded until then.",
    });
  }

  // Members may not list, delete or change settings: those controls are hidden once a `list`
  // has said FORBIDDEN (the server checks every action anyway).
  function noteRole(admin) {
    state.admin = admin;
    document.body.classList.toggle("member", admin === false);
    for (const id of ["set-enabled", "set-retention", "set-storage"]) $(id).disabled = admin === false;
  }
  function forbidden(e) {
    return e instanceof ApiError && e.code === "FORBIDDEN";
  }

  // ---------------------------------------------------------------- views

  function show(view) {
    for (const v of ["signin-view", "list-view", "player-view"]) $(v).hidden = v !== view;
    $("whoami").hidden = view === "signin-view";
  }

  function rememberOrg(org) {
    let orgs = [];
    try {
      orgs = JSON.parse(sessionStorage.getItem("ztna.orgs") || "[]");
    } catch (_) {
      orgs = [];
    }
    if (!Array.isArray(orgs)) orgs = [];
    orgs = [org, ...orgs.filter((o) => o !== org)].slice(0, 10);
    sessionStorage.setItem("ztna.orgs", JSON.stringify(orgs));
    const dl = $("org-history");
    dl.replaceChildren(...orgs.map((o) => el("option", { value: o })));
  }

  function setOrg(org) {
    state.org = org;
    sessionStorage.setItem("ztna.org", org);
    $("org-switch").value = org;
    state.machines = new Map();
    state.offset = 0;
    $("filter-machine").value = "";
    rememberOrg(org);
  }

  async function signIn(token, org) {
    token = token.trim().replace(/^bearer\s+/i, "");
    org = org.trim().toLowerCase();
    if (!token) throw new Error("Paste a token first.");
    if (!UUID_RE.test(org)) throw new Error("The org id must be a UUID such as 0b6c…-…; ask your admin for it.");
    state.token = token;
    // Check both before keeping them: get_settings needs only membership.
    const prevOrg = state.org;
    state.org = org;
    try {
      await api("get_settings");
    } catch (e) {
      state.org = prevOrg;
      throw e;
    }
    sessionStorage.setItem("ztna.token", token);
    setOrg(org);
  }

  function signOut() {
    stopPlayer();
    sessionStorage.removeItem("ztna.token");
    sessionStorage.removeItem("ztna.org");
    state.token = "";
    state.org = "";
    noteRole(null);
    $("token").value = "";
    clearMessage();
    location.hash = "";
    show("signin-view");
  }

  // ---------------------------------------------------------------- list

  function renderStats(stats, total) {
    const box = $("stats");
    const items = [el("div", { class: "stat", dataset: { status: "all" } },
      el("span", { class: "n", text: String(total) }),
      el("span", { class: "what", text: "recordings" }))];
    for (const s of stats || []) {
      items.push(el("div", { class: "stat", dataset: { status: String(s.status) } },
        el("span", { class: "n", text: String(s.count) }),
        el("span", { class: "what", text: `${s.status} · ${fmtDuration(Number(s.total_duration) || 0)} total` })));
    }
    box.replaceChildren(...items);
  }

  function renderMachineFilter() {
    const sel = $("filter-machine");
    const current = sel.value;
    const opts = [el("option", { value: "", text: "All machines" })];
    const entries = [...state.machines.entries()].sort((a, b) => String(a[1] || a[0]).localeCompare(String(b[1] || b[0])));
    for (const [id, name] of entries) {
      opts.push(el("option", { value: id, text: name === null ? `${id} (deleted)` : `${name}` }));
    }
    sel.replaceChildren(...opts);
    sel.value = state.machines.has(current) ? current : "";
  }

  function noteMachines(recordings) {
    let changed = false;
    for (const r of recordings) {
      if (r.machine_id && !state.machines.has(r.machine_id)) {
        state.machines.set(r.machine_id, r.machine_name === undefined ? null : r.machine_name);
        changed = true;
      }
    }
    if (changed) renderMachineFilter();
  }

  function renderRows(recordings) {
    const rows = recordings.map((r) => {
      const open = () => {
        location.hash = `#/play/${encodeURIComponent(r.id)}`;
      };
      return el("tr", { dataset: { id: String(r.id), status: String(r.status) } },
        el("td", { class: "machine" }, machineLabel(r)),
        el("td", { class: "user", title: String(r.user_id || "") }, userLabel(r)),
        el("td", { class: "type" }, String(r.session_type)),
        el("td", { class: "status" }, badge(r.status), " ", interruptedBadge(r)),
        el("td", { class: "started", title: String(r.started_at) }, fmtTime(r.started_at)),
        el("td", { class: "duration" }, durationOf(r)),
        el("td", { class: "actions" },
          el("button", { type: "button", class: "play", onclick: open, text: r.status === "active" ? "Watch" : "Play" }),
          el("button", { type: "button", class: "danger delete", onclick: () => confirmDelete(r), text: "Delete" })));
    });
    $("recordings").tBodies[0].replaceChildren(...rows);
    $("empty").hidden = recordings.length > 0;
  }

  async function loadList() {
    const seq = ++state.listSeq;
    const limit = Number($("page-size").value) || 50;
    const fields = { limit, offset: state.offset };
    const machine = $("filter-machine").value;
    const status = $("filter-status").value;
    if (machine) fields.machine_id = machine;
    if (status) fields.status = status;
    $("recordings").setAttribute("aria-busy", "true");
    try {
      const data = await api("list", fields);
      if (seq !== state.listSeq) return; // a newer request won
      const recs = Array.isArray(data.recordings) ? data.recordings : [];
      state.total = Number(data.total) || 0;
      if (recs.length === 0 && state.offset > 0 && state.total > 0) {
        state.offset = Math.max(0, Math.floor((state.total - 1) / limit) * limit);
        return loadList();
      }
      noteRole(true);
      noteMachines(recs);
      renderStats(data.stats, state.total);
      renderRows(recs);
      const from = recs.length ? state.offset + 1 : 0;
      $("page-info").textContent = `${from}–${state.offset + recs.length} of ${state.total}`;
      $("prev").disabled = state.offset === 0;
      $("next").disabled = state.offset + recs.length >= state.total;
    } catch (e) {
      if (seq !== state.listSeq) return;
      renderRows([]);
      $("empty").hidden = true;
      $("page-info").textContent = "";
      if (forbidden(e)) {
        noteRole(false);
        showMessage("Only an org admin can list this org's recordings. A member can play their own: paste its session id above, or open its link.", "info");
      } else {
        showError(e);
      }
    } finally {
      if (seq === state.listSeq) $("recordings").removeAttribute("aria-busy");
    }
  }

  // Seeds the machine filter from a first page of everything (there is no list-machines action).
  // The machine filter offers every machine with a recording: pages of the list are read in
  // the background, up to MACHINE_SCAN recordings (an org's busiest machine alone filled the
  // newest 200, and the others were offered only once their page was shown).
  const MACHINE_SCAN = 10000;
  async function seedMachines() {
    const org = state.org;
    try {
      for (let offset = 0; offset < MACHINE_SCAN; offset += 200) {
        const data = await api("list", { limit: 200, offset });
        if (state.org !== org) return;
        noteRole(true);
        const recs = Array.isArray(data.recordings) ? data.recordings : [];
        noteMachines(recs);
        if (recs.length < 200 || offset + 200 >= Number(data.total)) return;
      }
    } catch (e) {
      if (forbidden(e)) noteRole(false);
      // loadList shows the error
    }
  }

  // ---------------------------------------------------------------- delete, settings, cleanup

  function confirmDialog(text) {
    const dlg = $("confirm");
    $("confirm-text").textContent = text;
    return new Promise((resolve) => {
      const done = () => {
        dlg.removeEventListener("close", done);
        resolve(dlg.returnValue === "ok");
      };
      dlg.returnValue = "cancel";
      dlg.addEventListener("close", done);
      dlg.showModal();
    });
  }

  async function confirmDelete(rec) {
    const what = `${machineLabel(rec)}, ${userLabel(rec)}, started ${fmtTime(rec.started_at)}`;
    const ok = await confirmDialog(`Delete this recording (${what})? Its row and every stored chunk are removed; this cannot be undone.`);
    if (!ok) return false;
    try {
      await api("delete", { session_id: rec.id });
      showMessage(`Deleted recording ${rec.id}.`, "info");
      return true;
    } catch (e) {
      showError(e);
      return false;
    } finally {
      if (!$("list-view").hidden) loadList();
    }
  }

  async function loadSettings() {
    $("settings-status").textContent = "";
    try {
      const s = await api("get_settings");
      $("set-enabled").checked = !!s.recording_enabled;
      $("set-retention").value = String(s.retention_days);
      $("set-storage").value = String(s.storage_mode);
    } catch (e) {
      showError(e);
    }
  }

  async function saveSettings(ev) {
    ev.preventDefault();
    const days = Number($("set-retention").value);
    if (!Number.isInteger(days) || days < 1 || days > 365) {
      showMessage("Retention must be a whole number of days from 1 to 365.", "error");
      return;
    }
    $("settings-save").disabled = true;
    try {
      await api("update_settings", {
        recording_enabled: $("set-enabled").checked,
        retention_days: days,
        storage_mode: $("set-storage").value,
      });
      await loadSettings();
      $("settings-status").textContent = `Saved at ${fmtTime(new Date().toISOString())}.`;
    } catch (e) {
      showError(e);
    } finally {
      $("settings-save").disabled = false;
    }
  }

  async function runCleanup() {
    const ok = await confirmDialog("Delete every recording of this org older than its retention period now?");
    if (!ok) return;
    $("cleanup").disabled = true;
    try {
      const d = await api("cleanup");
      const n = Number(d.deleted) || 0;
      $("cleanup-status").textContent = `Cleanup deleted ${n} recording${n === 1 ? "" : "s"}.`;
    } catch (e) {
      showError(e);
    } finally {
      $("cleanup").disabled = false;
    }
  }

  function selectTab(name) {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.tab === name);
    $("recordings-panel").hidden = name !== "recordings";
    $("settings-panel").hidden = name !== "settings";
    if (name === "settings") loadSettings();
    else loadList();
  }

  // ---------------------------------------------------------------- player

  // The largest terminal the player is given: its emulator keeps every cell, and a header
  // of 65535x65535 (valid asciicast) crashes it. Larger recordings are shown cut to this.
  const MAX_COLS = 1000;
  const MAX_ROWS = 500;

  // The player's timeline with the idle time limit applied, as asciinema-player computes it.
  function castTimes(text, idleLimit) {
    const lines = text.split("\n");
    let prev = 0;
    let t = 0;
    let firstOutput = null;
    let cols = 80;
    let rows = 24;
    try {
      const h = JSON.parse(lines[0]);
      cols = Math.min(Number(h.width) || cols, MAX_COLS);
      rows = Math.min(Number(h.height) || rows, MAX_ROWS);
      if (idleLimit === undefined && typeof h.idle_time_limit === "number") idleLimit = h.idle_time_limit;
    } catch (_) {
      // a broken header shows as the player's error
    }
    for (let i = 1; i < lines.length; i++) {
      if (!lines[i]) continue;
      let ev;
      try {
        ev = JSON.parse(lines[i]);
      } catch (_) {
        continue;
      }
      if (!Array.isArray(ev) || typeof ev[0] !== "number") continue;
      let gap = ev[0] - prev;
      if (idleLimit && gap > idleLimit) gap = idleLimit;
      t += Math.max(0, gap);
      prev = ev[0];
      if (firstOutput === null && ev[1] === "o") firstOutput = t;
    }
    return { duration: t, firstOutput: firstOutput === null ? 0 : firstOutput, cols, rows };
  }

  function idleLimit() {
    const v = $("idle").value;
    return v ? Number(v) : undefined;
  }

  // The cast as the player gets it: every size (the header's and each resize's) within
  // MAX_COLS x MAX_ROWS. The player follows resizes only when it is given no size of its own,
  // so a huge resize must be cut here, as the header is.
  function playableCast(text) {
    const lines = text.split("\n");
    const fit = (c, r) => [Math.max(1, Math.min(c, MAX_COLS)), Math.max(1, Math.min(r, MAX_ROWS))];
    try {
      const h = JSON.parse(lines[0]);
      if (h && typeof h === "object" && (Number(h.width) > MAX_COLS || Number(h.height) > MAX_ROWS)) {
        [h.width, h.height] = fit(Number(h.width) || 80, Number(h.height) || 24);
        lines[0] = JSON.stringify(h);
      }
    } catch (_) {
      // a broken header shows as the player's error
    }
    for (let i = 1; i < lines.length; i++) {
      // The code is the only place "r" stands between bare quotes on an event line.
      if (!lines[i].includes('"r"')) continue;
      let ev;
      try {
        ev = JSON.parse(lines[i]);
      } catch (_) {
        continue;
      }
      if (!Array.isArray(ev) || ev[1] !== "r" || typeof ev[2] !== "string") continue;
      const m = /^(\d+)x(\d+)$/.exec(ev[2]);
      if (!m) continue;
      const [c, r] = fit(Number(m[1]), Number(m[2]));
      if (c !== Number(m[1]) || r !== Number(m[2])) {
        ev[2] = `${c}x${r}`;
        lines[i] = JSON.stringify(ev);
      }
    }
    return lines.join("\n");
  }

  // (Re)creates the player on the cast text, at `at` seconds (null: showing the first
  // frame, ready to play from the start).
  function mountPlayer(at, autoPlay) {
    const p = state.player;
    if (!p || typeof AsciinemaPlayer === "undefined") {
      if (typeof AsciinemaPlayer === "undefined") showMessage("The player script did not load.", "error");
      return;
    }
    if (p.obj) {
      try {
        p.obj.dispose();
      } catch (_) {
        // already gone
      }
      p.obj = null;
    }
    const limit = idleLimit();
    const times = castTimes(p.text, limit);
    const where = at === null ? times.firstOutput : Math.max(0, Math.min(at, times.duration));
    // At the recorded size (no `fit`), and no `cols`/`rows`: given a size, the player keeps it
    // and ignores the recording's resizes (sizes are capped in playableCast instead). No
    // poster either: the first seek after a poster drops the output before the poster's time.
    const opts = {
      fit: false,
      preload: true,
      speed: Number($("speed").value) || 1,
      terminalFontSize: "14px",
    };
    if (limit) opts.idleTimeLimit = limit;
    const box = $("player");
    box.replaceChildren();
    const obj = AsciinemaPlayer.create({ data: playableCast(p.text) }, box, opts);
    p.obj = obj;
    p.duration = times.duration;
    p.playing = !!autoPlay;
    obj.addEventListener("play", () => { p.playing = true; });
    obj.addEventListener("playing", () => { p.playing = true; });
    obj.addEventListener("pause", () => { p.playing = false; });
    obj.addEventListener("ended", () => { p.playing = false; });
    // Shows the frame at `where` (a frame includes the events at its exact time, so just
    // past it), and plays on from there when asked.
    obj
      .seek(where + 0.001)
      .then(() => (autoPlay && p.obj === obj ? obj.play() : undefined))
      .catch(() => {});
    box.dataset.cols = String(times.cols);
    box.dataset.rows = String(times.rows);
  }

  function currentTime() {
    const p = state.player;
    if (!p || !p.obj) return 0;
    try {
      const t = p.obj.getCurrentTime();
      return typeof t === "number" && Number.isFinite(t) ? t : 0;
    } catch (_) {
      return 0;
    }
  }

  function renderDetails(rec, integrity) {
    const md = rec.metadata && typeof rec.metadata === "object" ? rec.metadata : {};
    const rows = [
      ["Session", rec.id],
      ["Machine", machineLabel(rec)],
      ["Machine id", rec.machine_id || "—"],
      ["User", userLabel(rec)],
      ["User id", rec.user_id],
      ["Type", rec.session_type],
      ["Status", md.interrupted === true ? `${rec.status}, interrupted (the recorder stopped before the session ended)` : rec.status],
      ["Started", `${fmtTime(rec.started_at)} (${rec.started_at})`],
      ["Ended", rec.ended_at ? `${fmtTime(rec.ended_at)} (${rec.ended_at})` : "—"],
      ["Duration", durationOf(rec)],
      ["Chunks", String(Array.isArray(md.chunks) ? md.chunks.length : 0)],
    ];
    if (integrity) rows.push(["Integrity", String(integrity)]);
    for (const [k, v] of Object.entries(md)) {
      if (k === "chunks" || k === "header") continue;
      rows.push([`metadata.${k}`, typeof v === "string" ? v : JSON.stringify(v)]);
    }
    const items = [];
    for (const [k, v] of rows) items.push(el("dt", { text: k }), el("dd", { text: String(v) }));
    $("player-meta").replaceChildren(...items);
    $("player-title").textContent = `${machineLabel(rec)} · ${userLabel(rec)} · ${fmtTime(rec.started_at)}`;
    $("player-live").hidden = rec.status !== "active";
    $("follow-label").hidden = rec.status !== "active";
  }

  function stopPlayer() {
    const p = state.player;
    if (!p) return;
    p.stopped = true;
    if (p.timer) clearTimeout(p.timer);
    if (p.obj) {
      try {
        p.obj.dispose();
      } catch (_) {
        // already gone
      }
    }
    state.player = null;
    $("player").replaceChildren();
  }

  async function openRecording(id) {
    stopPlayer();
    show("player-view");
    $("player-status").textContent = "Loading…";
    $("player-title").textContent = id;
    $("player-meta").replaceChildren();
    $("player-live").hidden = true;
    $("player-view").classList.remove("failed");
    const p = { id, obj: null, text: "", chunks: 0, next: 0, timer: null, stopped: false, rec: null };
    state.player = p;
    try {
      const data = await api("get", { session_id: id });
      if (p.stopped) return;
      p.rec = data.recording;
      renderDetails(p.rec, data.integrity);
      const c = await fetchCast(id);
      if (p.stopped) return;
      p.text = c.text;
      p.chunks = c.chunks;
      p.next = c.next;
      // A cast cut short before its header line ended has nothing to play.
      if (!c.partial || p.text.includes("\n")) mountPlayer(null, false);
      if (c.partial) {
        // Not "cannot reach the server": it answered, then stopped part-way.
        $("player-status").textContent = "";
        showMessage(
          "Only part of this recording could be read: the server stopped sending it part-way " +
            "(a chunk's object is missing or unreadable; see Integrity, and the server's log). " +
            "What came before that plays.",
          "error");
        return;
      }
      $("player-status").textContent = c.status === "active" ? "Live: showing what has arrived so far." : "";
      if (c.status === "active") schedulePoll(p);
    } catch (e) {
      if (p.stopped) return;
      $("player-status").textContent = "";
      // Nothing to play: no empty player, no buttons for a recording that is not there.
      $("player-view").classList.add("failed");
      showError(e);
    }
  }

  function schedulePoll(p) {
    if (p.stopped) return;
    p.timer = setTimeout(() => pollLive(p), POLL_MS);
  }

  // Follows an active recording: asks for the chunks after the last one it has (cheap when
  // nothing came), appends them (or fetches the whole cast again if one arrived out of
  // order), then either jumps to the newest frame (Follow live) or keeps the viewer's place.
  async function pollLive(p) {
    if (p.stopped) return;
    try {
      let c = await fetchCast(p.id, p.next);
      if (p.stopped) return;
      if (c.partial) throw new Error("the server stopped sending the new chunks part-way");
      if (c.sent > 0 || c.chunks !== p.chunks) {
        if (p.chunks + c.sent === c.chunks) {
          p.text += c.text;
        } else {
          c = await fetchCast(p.id);
          if (p.stopped) return;
          if (c.partial) throw new Error("the server stopped sending the recording part-way");
          p.text = c.text;
        }
        p.chunks = c.chunks;
        p.next = c.next;
        const at = currentTime();
        const wasPlaying = p.playing;
        if ($("follow").checked) mountPlayer(castTimes(p.text, idleLimit()).duration, false);
        else mountPlayer(at, wasPlaying);
        $("player-status").textContent =
          `Live: ${c.chunks} chunk${c.chunks === 1 ? "" : "s"}, updated ${fmtTime(new Date().toISOString())}.`;
      }
      if (c.status === "active") {
        schedulePoll(p);
        return;
      }
      const data = await api("get", { session_id: p.id });
      if (p.stopped) return;
      p.rec = data.recording;
      renderDetails(p.rec, data.integrity);
      $("player-status").textContent = "The session has ended.";
    } catch (e) {
      if (p.stopped) return;
      if (e instanceof ApiError && ["NOT_FOUND", "FORBIDDEN", "UNAUTHORIZED", "FEATURE_DISABLED"].includes(e.code)) {
        $("player-status").textContent = "Live updates stopped.";
        showError(e);
        return;
      }
      $("player-status").textContent = `Live update failed: ${describe(e)} Retrying…`;
      p.timer = setTimeout(() => pollLive(p), POLL_MS * 3);
    }
  }

  async function download() {
    const p = state.player;
    if (!p) return;
    try {
      const { text, partial } = await fetchCast(p.id);
      if (partial) {
        throw new Error("Not downloaded: the server stopped sending the recording part-way " +
          "(a chunk's object is missing or unreadable; see Integrity).");
      }
      const url = URL.createObjectURL(new Blob([text], { type: "application/x-asciicast" }));
      const a = el("a", { href: url, download: `${p.id}.cast` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      showError(e);
    }
  }

  // ---------------------------------------------------------------- routing

  function route() {
    clearMessage();
    if (!state.token || !state.org) {
      stopPlayer();
      show("signin-view");
      return;
    }
    const m = /^#\/play\/([^/]+)$/.exec(location.hash);
    if (m) {
      const id = decodeURIComponent(m[1]);
      if (!state.player || state.player.id !== id) openRecording(id);
      return;
    }
    stopPlayer();
    show("list-view");
    const settings = location.hash === "#/settings";
    selectTab(settings ? "settings" : "recordings");
  }

  function wire() {
    $("message-close").addEventListener("click", clearMessage);
    $("signin-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearMessage();
      $("signin-btn").disabled = true;
      try {
        await signIn($("token").value, $("org").value);
        $("token").value = "";
        // A link to a recording or to the settings opened before signing in is kept.
        if (/^#\/(play\/|settings$|recordings$)/.test(location.hash)) route();
        else location.hash = "#/recordings";
        seedMachines();
      } catch (e) {
        showError(e);
      } finally {
        $("signin-btn").disabled = false;
      }
    });
    $("signout").addEventListener("click", signOut);
    const switchOrg = async () => {
      const org = $("org-switch").value.trim().toLowerCase();
      clearMessage();
      try {
        await signIn(state.token, org);
        stopPlayer();
        if (location.hash === "#/recordings") route();
        else location.hash = "#/recordings";
        seedMachines();
      } catch (e) {
        $("org-switch").value = state.org;
        showError(e);
      }
    };
    $("org-switch-btn").addEventListener("click", switchOrg);
    $("org-switch").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") switchOrg();
    });
    for (const t of document.querySelectorAll(".tab")) {
      t.addEventListener("click", () => {
        location.hash = t.dataset.tab === "settings" ? "#/settings" : "#/recordings";
      });
    }
    const refilter = () => {
      state.offset = 0;
      loadList();
    };
    $("filter-machine").addEventListener("change", refilter);
    $("filter-status").addEventListener("change", refilter);
    $("page-size").addEventListener("change", refilter);
    $("filters").addEventListener("submit", (ev) => ev.preventDefault());
    $("refresh").addEventListener("click", () => loadList());
    $("prev").addEventListener("click", () => {
      state.offset = Math.max(0, state.offset - (Number($("page-size").value) || 50));
      loadList();
    });
    $("next").addEventListener("click", () => {
      state.offset += Number($("page-size").value) || 50;
      loadList();
    });
    const openById = () => {
      const id = $("open-id").value.trim().toLowerCase();
      if (!UUID_RE.test(id)) {
        showMessage("A session id is a UUID.", "error");
        return;
      }
      location.hash = `#/play/${id}`;
    };
    $("open-id-btn").addEventListener("click", openById);
    $("open-id").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") {
        ev.preventDefault();
        openById();
      }
    });
    $("settings-form").addEventListener("submit", saveSettings);
    $("cleanup").addEventListener("click", runCleanup);
    $("back").addEventListener("click", () => {
      location.hash = "#/recordings";
    });
    const remount = () => {
      const p = state.player;
      if (p && p.text) {
        const t = currentTime();
        mountPlayer(t > 0 ? t : null, p.playing);
      }
    };
    $("speed").addEventListener("change", remount);
    $("idle").addEventListener("change", remount);
    $("download").addEventListener("click", download);
    $("player-delete").addEventListener("click", async () => {
      const p = state.player;
      if (!p || !p.rec) return;
      if (await confirmDelete(p.rec)) location.hash = "#/recordings";
    });
    window.addEventListener("hashchange", route);
  }

  wire();
  if (state.org) {
    $("org").value = state.org;
    $("org-switch").value = state.org;
    rememberOrg(state.org);
  }
  route();
  if (state.token && state.org) seedMachines();
})();

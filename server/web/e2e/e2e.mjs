// End-to-end test of the dashboard: the real server binary (admin CLI + serve), the agent
// route for recordings, and Debian's Chromium (headless) driven by playwright-core.
//
//   ZTNA_SERVER_BIN   the built ztna-recorder-server (default: $CARGO_TARGET_DIR or target/, debug)
//   ZTNA_E2E_ARTIFACTS where screenshots go (default: <repo>/target/e2e-artifacts)
//   CHROMIUM          the browser (default: /usr/bin/chromium)
//
// Fails (exit 1) on the first broken expectation; never skips.
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, readFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "../../..");
const TARGET = process.env.CARGO_TARGET_DIR || path.join(REPO, "target");
const BIN = process.env.ZTNA_SERVER_BIN || path.join(TARGET, "debug", "ztna-recorder-server");
const ARTIFACTS = process.env.ZTNA_E2E_ARTIFACTS || path.join(REPO, "target", "e2e-artifacts");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const XSS_NAME = "<img src=x onerror=alert(1)>";

if (!existsSync(BIN)) throw new Error(`server binary not found at ${BIN}: build it (cargo build -p ztna-recorder-server) or set ZTNA_SERVER_BIN`);
if (!existsSync(CHROMIUM)) throw new Error(`Chromium not found at ${CHROMIUM}: apt-get install chromium, or set CHROMIUM`);
mkdirSync(ARTIFACTS, { recursive: true });

const DATA = mkdtempSync(path.join(tmpdir(), "ztna-e2e-"));
let server = null;
let browser = null;
let page = null;

function log(...a) {
  console.log("[e2e]", ...a);
}

function admin(...args) {
  const out = execFileSync(BIN, ["admin", ...args, "--data-dir", DATA], { encoding: "utf8" });
  return JSON.parse(out);
}

function startServer() {
  return new Promise((resolve, reject) => {
    const p = spawn(BIN, ["serve", "--listen", "127.0.0.1:0", "--data-dir", DATA], {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "warn" },
    });
    let buf = "";
    let stderr = "";
    p.stderr.on("data", (d) => {
      stderr += d;
      if (process.env.E2E_VERBOSE) process.stderr.write(d);
    });
    p.stdout.on("data", (d) => {
      buf += d;
      const nl = buf.indexOf("\n");
      if (nl >= 0 && !p.base) {
        const { listening } = JSON.parse(buf.slice(0, nl));
        p.base = `http://${listening}`;
        resolve(p);
      }
    });
    p.on("exit", (code) => {
      if (!p.base) reject(new Error(`server exited (${code}) before listening:\n${stderr}`));
    });
  });
}

async function post(route, body, token) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const res = await fetch(server.base + route, { method: "POST", headers, body: JSON.stringify(body) });
  const json = await res.json();
  return { status: res.status, ...json };
}
async function agent(nodeKey, body) {
  const r = await post("/api/session-recording-agent", { node_key: nodeKey, ...body });
  assert.equal(r.success, true, `agent ${body.action || "report"}: ${JSON.stringify(r.error)}`);
  return r.data;
}
async function user(token, body) {
  return post("/api/session-recording", body, token);
}

const ev = (t, data) => JSON.stringify([t, "o", data]) + "\n";

async function startSession(nodeKey, header, metadata) {
  const d = await agent(nodeKey, { action: "start", session_type: "ssh", header, metadata });
  return d.session_id;
}

function vmKiB(pid, field) {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return Number(m[1]);
}

async function main() {
  // ------------------------------------------------------------------ the org, via the admin CLI
  const org = admin("org", "create", "--name", "Acme", "--feature", "session_recording").org_id;
  const other = admin("org", "create", "--name", "Other", "--feature", "session_recording").org_id;
  const adminUser = admin("user", "create", "--org", org, "--email", "admin@acme.test", "--role", "admin").user_id;
  const member = admin("user", "create", "--org", org, "--email", "bob@acme.test", "--role", "member").user_id;
  const token = admin("token", "--user", adminUser).token;
  const memberToken = admin("token", "--user", member).token;
  admin("settings", "set", "--org", org, "--recording-enabled", "true");
  const web = admin("machine", "register", "--org", org, "--name", "web-01", "--owner", adminUser);
  const db = admin("machine", "register", "--org", org, "--name", "db-02", "--owner", adminUser);
  const xss = admin("machine", "register", "--org", org, "--name", XSS_NAME, "--owner", member);

  server = await startServer();
  log("server at", server.base, "pid", server.pid);

  // ------------------------------------------------------------------ recordings via the agent route
  const header = { height: 30, timestamp: 1764400000, version: 2, width: 100 };
  const played = await startSession(web.node_key, header, { user: "alice", kind: "interactive", command: "<b>bold</b>" });
  await agent(web.node_key, { action: "upload_chunk", session_id: played, chunk_index: 0,
    chunk_data: ev(0.2, "$ echo hello-first-frame\r\n") + ev(0.4, "hello-first-frame\r\n") });
  await agent(web.node_key, { action: "upload_chunk", session_id: played, chunk_index: 1,
    chunk_data: ev(1.5, "$ ls\r\n") + ev(1.8, "second-chunk-text\r\n") });
  // As the daemon completes a session whose recorder died: marked in the list and the details.
  await agent(web.node_key, { action: "complete", session_id: played, duration_seconds: 2, metadata: { interrupted: true } });

  const xssTranscript = JSON.stringify({ height: 24, version: 2, width: 80 }) + "\n" +
    ev(0.1, "<script>alert(2)</script> xss-output\r\n");
  const xssSession = (await agent(xss.node_key, { session_type: "ssh", session_data: { transcript: xssTranscript } })).session_id;

  const dbSessions = [];
  for (let i = 0; i < 12; i++) {
    const t = JSON.stringify({ version: 2, width: 80, height: 24 }) + "\n" + ev(0.1, `db session ${i}\r\n`);
    dbSessions.push((await agent(db.node_key, { session_type: "ssh", session_data: { transcript: t, duration_seconds: 60 + i } })).session_id);
  }
  const total0 = 14;

  // ------------------------------------------------------------------ browser
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
    ],
  });
  // playwright-core gives every context a fresh profile; Chromium itself gets a temp user-data-dir.
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  page = await context.newPage();
  page.setDefaultTimeout(15000);
  const dialogs = [];
  const pageErrors = [];
  page.on("dialog", (d) => {
    dialogs.push(`${d.type()}: ${d.message()}`);
    d.dismiss().catch(() => {});
  });
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  page.on("console", (m) => {
    if (m.type() === "error" && !/Failed to load resource/.test(m.text())) pageErrors.push(`console: ${m.text()}`);
  });

  await page.goto(server.base + "/");
  await page.locator("#signin-view").waitFor();

  // a bad token is a readable message, not a blank page
  await page.fill("#token", "not-a-jwt");
  await page.fill("#org", org);
  await page.click("#signin-btn");
  await page.locator("#message").waitFor();
  const badMsg = await page.textContent("#message-text");
  assert.match(badMsg, /UNAUTHORIZED/);
  assert.match(badMsg, /token/i);
  assert.equal(await page.isVisible("#signin-view"), true);
  assert.equal(await page.evaluate(() => sessionStorage.getItem("ztna.token")), null);
  log("bad token ->", badMsg);

  // sign in
  await page.fill("#token", token);
  await page.click("#signin-btn");
  await page.locator("#list-view").waitFor();
  await page.waitForFunction((n) => document.querySelectorAll("#recordings tbody tr").length === n, total0);
  assert.equal(await page.evaluate(() => sessionStorage.getItem("ztna.token")), token);
  assert.equal(await page.evaluate(() => localStorage.length), 0, "nothing in localStorage");
  assert.doesNotMatch(page.url(), /eyJ/, "token is not in the URL");
  assert.equal(await page.textContent("#page-info"), `1–${total0} of ${total0}`);
  const statsText = await page.textContent("#stats");
  assert.match(statsText, /14\s*recordings/);
  assert.match(statsText, /completed/);

  // the hostile machine name is text, not markup
  const xssRow = page.locator(`#recordings tbody tr[data-id="${xssSession}"]`);
  assert.equal(await xssRow.locator("td.machine").textContent(), XSS_NAME);
  assert.equal(await page.locator("#recordings img").count(), 0);
  assert.equal(await page.locator("#filter-machine option", { hasText: XSS_NAME }).count(), 1);
  assert.deepEqual(dialogs, []);

  // pagination
  await page.selectOption("#page-size", "10");
  await page.waitForFunction(() => document.querySelector("#page-info").textContent === "1–10 of 14");
  assert.equal(await page.locator("#recordings tbody tr").count(), 10);
  assert.equal(await page.isDisabled("#prev"), true);
  await page.click("#next");
  await page.waitForFunction(() => document.querySelector("#page-info").textContent === "11–14 of 14");
  assert.equal(await page.locator("#recordings tbody tr").count(), 4);
  assert.equal(await page.isDisabled("#next"), true);
  await page.click("#prev");
  await page.waitForFunction(() => document.querySelector("#page-info").textContent === "1–10 of 14");
  await page.selectOption("#page-size", "50");
  await page.waitForFunction(() => document.querySelectorAll("#recordings tbody tr").length === 14);

  // filter by machine
  await page.selectOption("#filter-machine", db.machine_id);
  await page.waitForFunction(() => document.querySelector("#page-info").textContent === "1–12 of 12");
  const machines = await page.locator("#recordings tbody td.machine").allTextContents();
  assert.deepEqual([...new Set(machines)], ["db-02"]);
  assert.match(await page.textContent("#stats"), /12\s*recordings/);
  await page.selectOption("#filter-machine", "");
  await page.waitForFunction(() => document.querySelectorAll("#recordings tbody tr").length === 14);
  await page.screenshot({ path: path.join(ARTIFACTS, "list.png"), fullPage: true });
  // switching to an org we are not a member of is refused readably and changes nothing
  await page.fill("#org-switch", other);
  await page.click("#org-switch-btn");
  await page.waitForFunction(() => /FORBIDDEN/.test(document.querySelector("#message-text").textContent));
  assert.equal(await page.inputValue("#org-switch"), org);
  assert.equal(await page.evaluate(() => sessionStorage.getItem("ztna.org")), org);
  await page.click("#message-close");
  log("list: sign-in, pagination, machine filter, escaping ok");

  // ------------------------------------------------------------------ play a completed recording
  assert.equal(await page.locator(`#recordings tbody tr[data-id="${played}"] .badge.interrupted`).count(), 1);
  assert.equal(await page.locator("#recordings tbody .badge.interrupted").count(), 1, "only the interrupted one");
  await page.locator(`#recordings tbody tr[data-id="${played}"] button.play`).click();
  await page.locator("#player-view").waitFor();
  await page.waitForFunction(() => (document.querySelector("#player .ap-term")?.textContent || "").includes("hello-first-frame"));
  const firstFrame = await page.textContent("#player .ap-term");
  assert.doesNotMatch(firstFrame, /second-chunk-text/, "the poster is the first frame, not the end");
  assert.equal(await page.getAttribute("#player", "data-cols"), "100");
  assert.equal(await page.getAttribute("#player", "data-rows"), "30");
  const lines = await page.locator("#player .ap-term .ap-line").count();
  assert.equal(lines, 30, "terminal at the recorded height");
  assert.match(await page.textContent("#player-meta"), /<b>bold<\/b>/, "metadata shown as text");
  assert.match(await page.textContent("#player-meta"), /completed, interrupted/);
  assert.equal(await page.locator("#player-meta b").count(), 0);
  await page.screenshot({ path: path.join(ARTIFACTS, "player.png"), fullPage: true });
  // play it through at 4x
  await page.selectOption("#speed", "4");
  await page.locator("#player .ap-player").waitFor();
  await page.locator("#player .ap-playback-button").click();
  await page.waitForFunction(() => (document.querySelector("#player .ap-term")?.textContent || "").includes("second-chunk-text"));
  const endFrame = await page.locator("#player .ap-term .ap-line").allTextContents();
  assert.deepEqual(endFrame.slice(0, 4).map((l) => l.trimEnd()), ["$ echo hello-first-frame", "hello-first-frame", "$ ls", "second-chunk-text"], "every event played, in order");
  await page.screenshot({ path: path.join(ARTIFACTS, "player-end.png"), fullPage: true });
  // download the whole cast
  const [dl] = await Promise.all([page.waitForEvent("download"), page.click("#download")]);
  assert.equal(dl.suggestedFilename(), `${played}.cast`);
  const dlPath = path.join(DATA, "download.cast");
  await dl.saveAs(dlPath);
  assert.equal(readFileSync(dlPath, "utf8"), JSON.stringify(header) + "\n" + ev(0.2, "$ echo hello-first-frame\r\n") +
    ev(0.4, "hello-first-frame\r\n") + ev(1.5, "$ ls\r\n") + ev(1.8, "second-chunk-text\r\n"));
  log("player: first frame, recorded size, playback ok");

  // ------------------------------------------------------------------ a live session that grows
  const live = await startSession(web.node_key, { height: 24, version: 2, width: 80 }, { user: "carol", kind: "interactive" });
  await agent(web.node_key, { action: "upload_chunk", session_id: live, chunk_index: 0, chunk_data: ev(0.1, "live-part-one\r\n") });
  await page.click("#back");
  await page.locator("#list-view").waitFor();
  await page.waitForFunction((id) => !!document.querySelector(`#recordings tbody tr[data-id="${id}"]`), live);
  await page.selectOption("#filter-status", "active");
  await page.waitForFunction(() => document.querySelector("#page-info").textContent === "1–1 of 1");
  await page.locator(`#recordings tbody tr[data-id="${live}"] button.play`).click();
  await page.waitForFunction(() => (document.querySelector("#player .ap-term")?.textContent || "").includes("live-part-one"));
  assert.equal(await page.isVisible("#player-live"), true);
  await agent(web.node_key, { action: "upload_chunk", session_id: live, chunk_index: 1, chunk_data: ev(1.2, "live-part-two\r\n") });
  await page.waitForFunction(() => (document.querySelector("#player .ap-term")?.textContent || "").includes("live-part-two"));
  // without "Follow live" the viewer keeps its place; playing on reaches the new output
  await page.uncheck("#follow");
  await agent(web.node_key, { action: "upload_chunk", session_id: live, chunk_index: 2, chunk_data: ev(2.5, "live-part-three\r\n") });
  await page.waitForFunction(() => /3 chunks/.test(document.querySelector("#player-status").textContent));
  assert.doesNotMatch(await page.textContent("#player .ap-term"), /live-part-three/);
  await page.locator("#player .ap-playback-button").click();
  await page.waitForFunction(() => (document.querySelector("#player .ap-term")?.textContent || "").includes("live-part-three"));
  await page.check("#follow");
  await page.screenshot({ path: path.join(ARTIFACTS, "player-live.png"), fullPage: true });
  await agent(web.node_key, { action: "complete", session_id: live });
  await page.waitForFunction(() => /ended/.test(document.querySelector("#player-status").textContent));
  assert.equal(await page.isVisible("#player-live"), false);
  log("live: followed 3 chunks and the end");

  // ------------------------------------------------------------------ delete (cancel, then confirm)
  await page.click("#back");
  await page.selectOption("#filter-status", "");
  await page.waitForFunction((n) => document.querySelectorAll("#recordings tbody tr").length === n, total0 + 1);
  const victim = dbSessions[0];
  await page.locator(`#recordings tbody tr[data-id="${victim}"] button.delete`).click();
  await page.locator("#confirm").waitFor();
  assert.match(await page.textContent("#confirm-text"), /db-02/);
  await page.click("#confirm-cancel");
  await page.locator("#confirm").waitFor({ state: "hidden" });
  assert.equal((await user(token, { action: "get", org_id: org, session_id: victim })).success, true);
  await page.locator(`#recordings tbody tr[data-id="${victim}"] button.delete`).click();
  await page.click("#confirm-ok");
  await page.waitForFunction((id) => !document.querySelector(`#recordings tbody tr[data-id="${id}"]`), victim);
  await page.waitForFunction((n) => document.querySelectorAll("#recordings tbody tr").length === n, total0);
  const gone = await user(token, { action: "get", org_id: org, session_id: victim });
  assert.equal(gone.status, 404);
  assert.equal(gone.error.code, "NOT_FOUND");
  log("delete: cancel keeps, confirm deletes");

  // ------------------------------------------------------------------ settings and cleanup
  await page.click("#tab-settings");
  await page.locator("#settings-panel").waitFor();
  await page.waitForFunction(() => document.querySelector("#set-retention").value === "90");
  assert.equal(await page.isChecked("#set-enabled"), true);
  await page.uncheck("#set-enabled");
  await page.fill("#set-retention", "30");
  await page.selectOption("#set-storage", "custom");
  await page.click("#settings-save");
  await page.waitForFunction(() => /Saved/.test(document.querySelector("#settings-status").textContent));
  const s = await user(token, { action: "get_settings", org_id: org });
  assert.deepEqual(s.data, { recording_enabled: false, retention_days: 30, storage_mode: "custom" });
  await page.click("#cleanup");
  await page.click("#confirm-ok");
  await page.waitForFunction(() => /Cleanup deleted 0 recordings/.test(document.querySelector("#cleanup-status").textContent));
  await page.screenshot({ path: path.join(ARTIFACTS, "settings.png"), fullPage: true });
  // back on: the 500-chunk recording below needs a start
  await user(token, { action: "update_settings", org_id: org, recording_enabled: true, retention_days: 90, storage_mode: "platform" });
  log("settings and cleanup ok");

  // ------------------------------------------------------------------ a member sees a readable refusal
  await page.click("#signout");
  await page.locator("#signin-view").waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem("ztna.token")), null);
  await page.fill("#token", memberToken);
  await page.fill("#org", org);
  await page.click("#signin-btn");
  await page.locator("#message").waitFor();
  assert.match(await page.textContent("#message-text"), /Only an org admin can list/);
  // no controls for what only an admin may do
  await page.waitForFunction(() => document.body.classList.contains("member"));
  await page.click("#tab-settings");
  await page.waitForFunction(() => document.querySelector("#set-retention").value !== "");
  assert.equal(await page.locator("#settings-save").isVisible(), false);
  assert.equal(await page.locator("#cleanup").isVisible(), false);
  assert.equal(await page.locator("#set-retention").isDisabled(), true);
  await page.click("#tab-recordings");
  // another user's recording: the refusal, not an empty player with buttons
  await page.fill("#open-id", played);
  await page.click("#open-id-btn");
  await page.waitForFunction(() => /FORBIDDEN/.test(document.querySelector("#message-text").textContent));
  assert.equal(await page.locator("#download").isVisible(), false);
  assert.equal(await page.locator("#player-wrap").isVisible(), false);
  await page.click("#back");
  await page.locator("#list-view").waitFor();
  // …but can open their own recording by id
  await page.fill("#open-id", xssSession);
  await page.click("#open-id-btn");
  await page.waitForFunction(() => (document.querySelector("#player .ap-term")?.textContent || "").includes("xss-output"));
  assert.equal(await page.locator("#player img").count(), 0);
  assert.equal(await page.textContent("#player-title").then((t) => t.startsWith(XSS_NAME)), true);
  assert.equal(await page.locator("#download").isVisible(), true);
  assert.equal(await page.locator("#player-delete").isVisible(), false, "deleting is for admins");
  log("member: list refused readably, own recording plays");
  // A link to a recording opened before signing in is where sign-in lands.
  await page.click("#signout");
  await page.locator("#signin-view").waitFor();
  await page.goto(`${server.base}/#/play/${xssSession}`);
  await page.fill("#token", memberToken);
  await page.fill("#org", org);
  await page.click("#signin-btn");
  await page.waitForFunction(() => (document.querySelector("#player .ap-term")?.textContent || "").includes("xss-output"));
  assert.equal(await page.evaluate(() => location.hash), `#/play/${xssSession}`);
  log("a link opened before sign-in survives it");
  // A header as large as asciicast allows (65535x65535) plays, cut to the player's limit.
  const hugeTranscript = JSON.stringify({ height: 65535, version: 2, width: 65535 }) + "\n" + ev(0.1, "huge-output\r\n");
  const huge = (await agent(xss.node_key, { session_type: "ssh", session_data: { transcript: hugeTranscript } })).session_id;
  await page.goto(`${server.base}/#/play/${huge}`);
  await page.waitForFunction(() => (document.querySelector("#player .ap-term")?.textContent || "").includes("huge-output"));
  assert.equal(await page.getAttribute("#player", "data-cols"), "1000");
  assert.equal(await page.getAttribute("#player", "data-rows"), "500");
  log("a 65535x65535 recording plays at 1000x500");

  // Resizes are followed (the player was given the header's size, and kept it), a huge one
  // cut to the limit.
  const resizeTranscript = JSON.stringify({ height: 24, version: 2, width: 80 }) + "\n" +
    ev(0.1, "before-resize\r\n") + JSON.stringify([1, "r", "120x40"]) + "\n" +
    ev(1.5, "after-resize " + "#".repeat(110) + "\r\n") + JSON.stringify([8, "r", "65535x9000"]) + "\n" +
    ev(8.5, "huge-resize\r\n");
  const resized = (await agent(xss.node_key, { session_type: "ssh", session_data: { transcript: resizeTranscript } })).session_id;
  await page.goto(`${server.base}/#/play/${resized}`);
  await page.waitForFunction(() => (document.querySelector("#player .ap-term")?.textContent || "").includes("before-resize"));
  assert.equal(await page.locator("#player .ap-term .ap-line").count(), 24);
  await page.evaluate(() => document.querySelector("#player .ap-wrapper").focus());
  await page.keyboard.press("6");
  await page.waitForFunction(() => (document.querySelector("#player .ap-term")?.textContent || "").includes("after-resize"));
  const wide = await page.locator("#player .ap-term .ap-line").allTextContents();
  assert.equal(wide.length, 40, "the terminal follows the resize to 120x40");
  assert.ok(wide.some((l) => l.includes("after-resize " + "#".repeat(107))), "a 123-column line is not wrapped at 80");
  await page.keyboard.press("ArrowRight");
  await page.waitForFunction(() => (document.querySelector("#player .ap-term")?.textContent || "").includes("huge-resize"));
  assert.equal(await page.locator("#player .ap-term .ap-line").count(), 500, "a huge resize is cut to 500 rows");
  log("resizes followed, a huge one cut to the limit");

  // The first seek after the player is mounted shows everything before the new position (it
  // dropped what came before the first frame's time).
  const seekTranscript = JSON.stringify({ height: 24, version: 2, width: 80 }) + "\n" +
    ev(0.05, "Welcome-motd\r\n$ ") + ev(1.0, "l") + ev(1.2, "s\r\n") + ev(1.3, "file1  file2\r\n$ ") + ev(10, "exit\r\n");
  const seekRec = (await agent(xss.node_key, { session_type: "ssh", session_data: { transcript: seekTranscript } })).session_id;
  await page.goto(`${server.base}/#/play/${seekRec}`);
  await page.waitForFunction(() => (document.querySelector("#player .ap-term")?.textContent || "").includes("Welcome-motd"));
  await page.evaluate(() => document.querySelector("#player .ap-wrapper").focus());
  await page.keyboard.press("5");
  await page.waitForFunction(() => (document.querySelector("#player .ap-term")?.textContent || "").includes("file1"));
  const afterSeek = (await page.locator("#player .ap-term .ap-line").allTextContents()).map((l) => l.trimEnd());
  assert.deepEqual(afterSeek.slice(0, 3), ["Welcome-motd", "$ ls", "file1  file2"], "nothing before the first frame lost");
  log("the first seek keeps what came before the first frame");

  // A chunk whose object is gone: what came before it plays, and the page says what happened
  // (it said "Cannot reach the server" and hid the details).
  const cut = await startSession(xss.node_key, { height: 24, version: 2, width: 80 }, {});
  for (const [i, text] of [[0, "chunk-zero-text"], [1, "chunk-one-text"], [2, "chunk-two-text"]]) {
    await agent(xss.node_key, { action: "upload_chunk", session_id: cut, chunk_index: i, chunk_data: ev(i + 0.5, `${text}\r\n`) });
  }
  await agent(xss.node_key, { action: "complete", session_id: cut });
  rmSync(path.join(DATA, "objects", "recordings", org, cut, "chunk-1.cast"));
  await page.goto(`${server.base}/#/play/${cut}`);
  // (What of chunk 0 reached the browser before the server cut the answer short depends on
  // its write buffer: whatever came plays, and is not asserted.)
  await page.waitForFunction(() => !document.querySelector("#message").hidden);
  assert.match(await page.textContent("#message-text"), /Only part of this recording could be read/);
  assert.equal(await page.locator("#player-view.failed").count(), 0, "details and buttons stay");
  assert.match(await page.textContent("#player-meta"), /missing/, "Integrity is shown");
  log("a missing chunk: the page says why the recording stops, details and buttons stay");

  assert.deepEqual(dialogs, [], "no alert ran");
  assert.deepEqual(pageErrors, [], "no page errors");
  await browser.close();
  browser = null;

  // ------------------------------------------------------------------ the cast endpoint
  const castUrl = (o, sid) => `${server.base}/api/session-recording/cast?org_id=${o}&session_id=${sid}`;
  const getCast = (o, sid, tok) => fetch(castUrl(o, sid), { headers: tok ? { Authorization: `Bearer ${tok}` } : {} });
  const expectError = async (res, status, code) => {
    assert.equal(res.status, status);
    const b = await res.json();
    assert.equal(b.success, false);
    assert.equal(b.error.code, code);
  };
  await expectError(await getCast(org, played, null), 401, "UNAUTHORIZED");
  await expectError(await getCast(org, played, "x.y.z"), 401, "UNAUTHORIZED");
  await expectError(await getCast(org, played, memberToken), 403, "FORBIDDEN"); // not the owner
  await expectError(await getCast(other, played, token), 403, "FORBIDDEN"); // not a member
  await expectError(await getCast(org, "not-a-uuid", token), 400, "INVALID_FIELD");
  await expectError(await fetch(`${server.base}/api/session-recording/cast?org_id=${org}`), 400, "MISSING_FIELDS");
  await expectError(await getCast(org, "00000000-0000-4000-8000-000000000000", token), 404, "NOT_FOUND");
  admin("feature", "disable", "--org", org, "--name", "session_recording");
  await expectError(await getCast(org, played, token), 403, "FEATURE_DISABLED");
  admin("feature", "enable", "--org", org, "--name", "session_recording");
  await expectError(await getCast(org, `${played}&from_chunk=-1`, token), 400, "INVALID_FIELD");
  const tail = await getCast(org, `${played}&from_chunk=1`, token);
  assert.equal(tail.status, 200);
  assert.equal(tail.headers.get("x-recording-status"), "completed");
  assert.equal(tail.headers.get("x-recording-chunks"), "2");
  assert.equal(tail.headers.get("x-recording-chunks-sent"), "1");
  assert.equal(tail.headers.get("x-recording-next-chunk"), "2");
  assert.equal(await tail.text(), ev(1.5, "$ ls\r\n") + ev(1.8, "second-chunk-text\r\n"));
  const none = await getCast(org, `${played}&from_chunk=2`, token);
  assert.equal(none.headers.get("x-recording-chunks-sent"), "0");
  assert.equal(await none.text(), "");
  const own = await getCast(org, xssSession, memberToken);
  assert.equal(own.status, 200);
  assert.equal(await own.text(), JSON.stringify({ height: 24, version: 2, width: 80 }) + "\n" + ev(0.1, "<script>alert(2)</script> xss-output\r\n"));
  const small = await (await getCast(org, played, token)).text();
  assert.equal(small, JSON.stringify(header) + "\n" + ev(0.2, "$ echo hello-first-frame\r\n") + ev(0.4, "hello-first-frame\r\n") + ev(1.5, "$ ls\r\n") + ev(1.8, "second-chunk-text\r\n"));

  // 500 chunks of ~100 KiB (50 MiB): exact concatenation, and the server's peak memory does
  // not grow by anything like the recording's size while streaming it.
  const bigHeader = { height: 24, timestamp: 1764400000, version: 2, width: 80 };
  const big = await startSession(db.node_key, bigHeader, { user: "bulk" });
  const N = 500;
  const filler = "x".repeat(2000);
  const chunks = [];
  for (let i = 0; i < N; i++) {
    let c = "";
    for (let j = 0; j < 50; j++) c += ev(i + j / 100, `chunk ${i} line ${j} ${filler}\r\n`);
    chunks.push(c);
  }
  const order = [...chunks.keys()].reverse(); // uploaded out of order: the cast is in index order
  let next = 0;
  await Promise.all([0, 1, 2, 3].map(async () => {
    while (next < order.length) {
      const i = order[next++];
      await agent(db.node_key, { action: "upload_chunk", session_id: big, chunk_index: i, chunk_data: chunks[i] });
    }
  }));
  await agent(db.node_key, { action: "complete", session_id: big });
  const expected = JSON.stringify(bigHeader) + "\n" + chunks.join("");
  const hwmBefore = vmKiB(server.pid, "VmHWM");
  const res = await getCast(org, big, token);
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("content-type"), "application/x-asciicast");
  const body = await res.text();
  const hwmAfter = vmKiB(server.pid, "VmHWM");
  assert.equal(body.length, expected.length);
  assert.ok(body === expected, "cast is the exact concatenation of header and chunks");
  const growthMiB = (hwmAfter - hwmBefore) / 1024;
  log(`500 chunks: ${(expected.length / 1048576).toFixed(1)} MiB streamed; server VmHWM ${hwmBefore} -> ${hwmAfter} KiB (+${growthMiB.toFixed(1)} MiB)`);
  assert.ok(growthMiB < 16, `server peak memory grew by ${growthMiB.toFixed(1)} MiB while streaming a 50 MiB cast`);
  log("cast endpoint ok");
}

let failed = false;
try {
  await main();
  log("PASS; screenshots in", ARTIFACTS);
} catch (e) {
  failed = true;
  console.error("[e2e] FAIL:", e);
  if (page && browser) {
    await page.screenshot({ path: path.join(ARTIFACTS, "failure.png"), fullPage: true }).catch(() => {});
    const msg = await page.textContent("#message-text").catch(() => "");
    const status = await page.textContent("#player-status").catch(() => "");
    console.error(`[e2e] page message: ${msg}; player status: ${status}; url: ${page.url()}`);
  }
} finally {
  if (browser) await browser.close().catch(() => {});
  if (server) server.kill("SIGTERM");
  rmSync(DATA, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);

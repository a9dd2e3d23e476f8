// The voice chat page: one WebSocket session with main-app (see docs/protocol.md).
import { Microphone, Player } from "./audio.js";
import { escapeHtml, renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const state = {
  ws: null, conversationId: new URLSearchParams(location.search).get("c"), outputRate: 22050,
  audioTurn: null, bubbles: {}, interim: null, retry: 0, listening: false, pttHeld: false, connected: false,
  replying: null, replyDone: null, // the turn being generated or played (Stop is for it); the last one done
  services: {}, stats: { playedSamples: 0, audioBytes: 0, replies: 0 },
};
window.voicechat = state; // for tests and curious developers

const player = new Player((report) => {
  const turn = state.audioTurn;
  if (state.replying != null && state.replyDone === state.replying && report.queued === 0) setReplying(null);
  state.stats.playedSamples = Object.values(report.played).reduce((a, b) => a + b, 0);
  if (turn != null && state.ws?.readyState === 1) send({ type: "playback", turn, played_ms: Math.round(player.playedMs(turn)) });
});
const mic = new Microphone((frame) => {
  if (state.ws?.readyState === 1 && (!$("ptt").checked || state.pttHeld)) state.ws.send(frame);
});

// --- connection -----------------------------------------------------------------------------------
function send(event) { if (state.ws?.readyState === 1) state.ws.send(JSON.stringify(event)); }

function setStatus(kind, text) {
  $("status-dot").className = "dot " + kind;
  $("status-text").textContent = text;
}

function banner(text) { const b = $("banner"); b.hidden = !text; b.textContent = text || ""; }

function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  setStatus("", "connecting…");
  ws.onopen = () => send({
    type: "start", format: { rate: 16000, width: 2, channels: 1 }, conversation_id: state.conversationId,
    speak: $("speak").checked, voice: $("voice").value || null,
  });
  ws.onmessage = (e) => (typeof e.data === "string" ? onEvent(JSON.parse(e.data)) : onAudio(e.data));
  ws.onclose = (e) => {
    state.connected = false;
    if (state.ws !== ws) return;
    const delay = Math.min(10000, 500 * 2 ** state.retry++);
    const busy = e.code === 1013; // the server is at its session limit (or still loading): try again later
    setStatus("down", busy ? "busy" : "disconnected");
    banner(busy ? `The assistant is busy with other conversations. Retrying in ${Math.round(delay / 1000)} s…`
      : `Can't reach the server. Retrying in ${Math.round(delay / 1000)} s…`);
    setTimeout(connect, delay);
  };
}

function onAudio(buf) {
  if (state.audioTurn == null) return; // audio of an interrupted turn: drop
  state.stats.audioBytes += buf.byteLength;
  player.push(state.audioTurn, buf);
}

async function onEvent(ev) {
  switch (ev.type) {
    case "ready":
      state.connected = true; state.retry = 0; banner("");
      setStatus("ok", "connected");
      if (state.conversationId !== ev.conversation_id) {
        state.conversationId = ev.conversation_id;
        history.replaceState(null, "", `?c=${ev.conversation_id}`);
        renderHistory(ev.history);
      } else if (!$("transcript").children.length || ev.history.length) renderHistory(ev.history);
      state.outputRate = ev.output_format.rate;
      refreshConversations();
      break;
    case "speech_started":
      if (state.audioTurn != null) player.flush(); // the user talks over the reply: stop at once
      $("talk").classList.add("listening");
      break;
    case "speech_stopped":
      $("talk").classList.remove("listening");
      break;
    case "transcript":
      showUserText(ev.text, ev.final);
      break;
    case "reply_delta": {
      setReplying(ev.turn);
      const b = assistantBubble(ev.turn);
      b.dataset.raw = (b.dataset.raw || "") + ev.text;
      b.querySelector(".body").innerHTML = renderMarkdown(b.dataset.raw);
      scrollDown();
      break;
    }
    case "audio_start":
      await player.ensure(ev.format.rate);
      state.audioTurn = ev.turn;
      break;
    case "interrupted":
      setReplying(null);
      player.flush();
      send({ type: "playback", turn: ev.turn, played_ms: Math.round(player.playedMs(ev.turn)) });
      state.audioTurn = null;
      assistantBubble(ev.turn).classList.add("interrupted");
      break;
    case "reply_done": {
      state.stats.replies++;
      state.replyDone = ev.turn; // its audio may still be playing: Stop stays until the player runs dry
      if (ev.interrupted || state.audioTurn !== ev.turn) setReplying(null);
      const b = assistantBubble(ev.turn);
      if (ev.interrupted) b.classList.add("interrupted");
      if (!b.dataset.raw && ev.text) b.querySelector(".body").innerHTML = renderMarkdown(ev.text);
      refreshConversations();
      break;
    }
    case "metrics": {
      const parts = [["heard", ev.stt_final_ms], ["first token", ev.llm_first_token_ms], ["first audio", ev.first_audio_sent_ms]]
        .filter(([, v]) => v != null).map(([k, v]) => `${k} ${Math.round(v)} ms`);
      $("latency").textContent = parts.length ? `Last turn (${ev.source}): ${parts.join(" · ")}` : "";
      const b = state.bubbles[ev.turn];
      if (b && ev.first_audio_sent_ms != null) b.title = `first audio ${Math.round(ev.first_audio_sent_ms)} ms after you stopped`;
      break;
    }
    case "service_status":
      state.services[ev.service] = ev.status; renderServices();
      break;
    case "error":
      if (ev.service && ev.code === "service_unavailable") { state.services[ev.service] = "down"; renderServices(); }
      addBubble("error", `${ev.service ? ev.service + ": " : ""}${ev.message}`);
      if (ev.code === "conversation_not_found") { state.conversationId = null; state.ws.close(); }
      break;
  }
}

// --- transcript -----------------------------------------------------------------------------------
function scrollDown() { const t = $("transcript"); t.scrollTop = t.scrollHeight; }

function addBubble(kind, html, raw = false) {
  $("transcript").querySelector(".empty")?.remove();
  const div = document.createElement("div");
  div.className = `msg ${kind}`;
  div.innerHTML = `<span class="body">${raw ? html : escapeHtml(html)}</span>`;
  $("transcript").appendChild(div);
  scrollDown();
  return div;
}

function showUserText(text, final) {
  if (!state.interim) {
    state.interim = addBubble("user interim", "");
    state.interim.setAttribute("aria-hidden", "true"); // words still changing: announce only the final text
  }
  state.interim.querySelector(".body").textContent = text || "…";
  if (final) {
    if (!text) state.interim.remove(); else { state.interim.classList.remove("interim"); state.interim.removeAttribute("aria-hidden"); }
    state.interim = null;
  }
}

function assistantBubble(turn) {
  if (!state.bubbles[turn]) state.bubbles[turn] = addBubble("assistant", "", true);
  return state.bubbles[turn];
}

function renderHistory(messages) {
  const t = $("transcript");
  t.innerHTML = "";
  state.bubbles = {}; state.interim = null;
  if (!messages.length) {
    t.innerHTML = `<div class="empty"><p><strong>Talk or type.</strong></p><p>Press “Start talking” and speak naturally —
      the assistant answers out loud, and you can interrupt it at any time.</p></div>`;
    return;
  }
  for (const m of messages) {
    const b = addBubble(m.role, m.role === "assistant" ? renderMarkdown(m.content) : m.content, m.role === "assistant");
    if (m.interrupted) b.classList.add("interrupted");
  }
}

function renderServices() {
  $("services").innerHTML = Object.entries(state.services)
    .map(([name, st]) => `<span class="${st === "ok" ? "" : "down"}">${escapeHtml(name)} ${st === "ok" ? "✓" : "✕"}</span>`).join("");
}

// --- conversations ----------------------------------------------------------------------------------
async function refreshConversations() {
  try {
    const { conversations } = await (await fetch("/conversations")).json();
    const list = $("conversation-list");
    list.innerHTML = "";
    for (const c of conversations) {
      const li = document.createElement("li");
      li.className = c.id === state.conversationId ? "active" : "";
      li.innerHTML = `<button class="open" data-id="${escapeHtml(c.id)}" title="${escapeHtml(c.title || "New conversation")}">${escapeHtml(c.title || "New conversation")}</button>
        <button class="delete" data-id="${escapeHtml(c.id)}" aria-label="Delete conversation">✕</button>`;
      list.appendChild(li);
    }
  } catch { /* the banner already says the server is down */ }
}

function openConversation(id) {
  state.conversationId = id;
  history.replaceState(null, "", id ? `?c=${id}` : location.pathname);
  $("transcript").innerHTML = "";
  player.flush(); state.audioTurn = null;
  $("sidebar").classList.remove("open");
  const ws = state.ws; state.ws = null; ws?.close();
  connect();
}

$("conversation-list").addEventListener("click", async (e) => {
  const id = e.target.dataset.id;
  if (!id) return;
  if (e.target.classList.contains("delete")) {
    await fetch(`/conversations/${id}`, { method: "DELETE" });
    if (id === state.conversationId) openConversation(null); else refreshConversations();
  } else openConversation(id);
});
$("new-conversation").onclick = () => openConversation(null);
$("toggle-sidebar").onclick = () => {
  const open = $("sidebar").classList.toggle("open");
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
};

// --- talking and typing -----------------------------------------------------------------------------
async function startMic() {
  try {
    await player.ensure(state.outputRate); // created on a user gesture, so playback is allowed
    await mic.start($("mic").value || localStorage.getItem("mic") || undefined);
    state.listening = true; banner("");
    listMicrophones(); // device names are only given once the user has allowed the microphone
  } catch (err) {
    const denied = err && (err.name === "NotAllowedError" || err.name === "SecurityError");
    banner(denied ? "Microphone access was denied. Allow it in your browser's site settings, or type instead."
                  : `Could not start the microphone (${err?.message || err}). You can still type.`);
  }
  renderTalk();
}

async function stopMic() { await mic.stop(); state.listening = false; renderTalk(); }

function renderTalk() {
  const ptt = $("ptt").checked;
  $("talk").setAttribute("aria-pressed", String(ptt ? state.pttHeld : state.listening));
  $("talk-label").textContent = ptt ? (state.pttHeld ? "Release to send" : "Hold to talk")
    : (state.listening ? "Listening — tap to stop" : "Start talking");
}

const SILENCE = new ArrayBuffer(16000 * 2 * 0.6); // lets the server's VAD close the utterance
async function pttDown(e) {
  if (!$("ptt").checked) return;
  e.preventDefault();
  if (!mic.running) await startMic();
  state.pttHeld = true;
  if (state.audioTurn != null) { player.flush(); send({ type: "interrupt" }); }
  renderTalk();
}
function pttUp() {
  if (!$("ptt").checked || !state.pttHeld) return;
  state.pttHeld = false;
  if (state.ws?.readyState === 1) state.ws.send(SILENCE);
  renderTalk();
}

$("talk").addEventListener("click", () => { if (!$("ptt").checked) (state.listening ? stopMic() : startMic()); });
$("talk").addEventListener("pointerdown", pttDown);
window.addEventListener("pointerup", pttUp);
window.addEventListener("keydown", (e) => { if (e.code === "Space" && e.target === document.body && !e.repeat) pttDown(e); });
window.addEventListener("keyup", (e) => { if (e.code === "Space") pttUp(); });
$("ptt").onchange = () => { state.pttHeld = false; renderTalk(); };
$("speak").onchange = () => send({ type: "configure", speak: $("speak").checked });
$("voice").onchange = () => { const ws = state.ws; state.ws = null; ws?.close(); connect(); };

$("composer").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("message").value.trim();
  if (!text || state.ws?.readyState !== 1) return;
  if ($("speak").checked) await player.ensure(state.outputRate);
  if (state.audioTurn != null) player.flush();
  state.audioTurn = null;
  addBubble("user", text);
  send({ type: "text", text });
  $("message").value = "";
});

// --- stopping a reply, choosing a microphone, secure pages -------------------------------------------
function setReplying(turn) {
  state.replying = turn;
  $("stop").hidden = turn == null;
  $("transcript").setAttribute("aria-busy", String(turn != null)); // the reply is read out once complete
}

function stopReply() {
  if (state.replying == null && state.audioTurn == null) return false;
  player.flush();
  send({ type: "interrupt" });
  setReplying(null);
  return true;
}

$("stop").onclick = stopReply;
window.addEventListener("keydown", (e) => {
  if (e.key !== "Escape") return;
  if (stopReply()) e.preventDefault();
  else if (state.listening && !$("ptt").checked) stopMic(); // hands-free: Esc also stops listening
});

async function listMicrophones() {
  if (!navigator.mediaDevices?.enumerateDevices) return;
  const chosen = $("mic").value || localStorage.getItem("mic") || "";
  const inputs = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "audioinput" && d.deviceId);
  $("mic").innerHTML = `<option value="">Default</option>` + inputs.map((d, i) =>
    `<option value="${escapeHtml(d.deviceId)}" ${d.deviceId === chosen ? "selected" : ""}>${escapeHtml(d.label || `Microphone ${i + 1}`)}</option>`).join("");
}

$("mic").onchange = async () => {
  localStorage.setItem("mic", $("mic").value);
  if (mic.running) { await mic.stop(); await startMic(); }
};

function checkSecureContext() {
  if (window.isSecureContext && navigator.mediaDevices?.getUserMedia) return;
  // browsers give the microphone only to https pages and to localhost
  // (and audio worklets, so spoken replies cannot play either: replies come as text)
  for (const id of ["talk", "ptt", "mic", "speak"]) $(id).disabled = true;
  $("speak").checked = false;
  const notice = $("notice");
  notice.hidden = false;
  notice.textContent = `Voice needs a secure page: this browser blocks the microphone and audio on ${location.origin}. ` +
    `Open it over https (start the server with “make run HTTPS=1” and accept its certificate once), ` +
    `or as http://localhost on the computer running it. Typing works here, with replies as text.`;
}

// --- theme, voices, boot ----------------------------------------------------------------------------
function applyTheme(theme) {
  document.documentElement.dataset.theme = theme; localStorage.setItem("theme", theme);
  $("theme").setAttribute("aria-pressed", String(theme === "dark"));
}
applyTheme(localStorage.getItem("theme") || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light"));
$("theme").onclick = () => applyTheme(document.documentElement.dataset.theme === "dark" ? "light" : "dark");

async function loadVoices() {
  try {
    const { voices, default: def } = await (await fetch("/voices")).json();
    $("voice").innerHTML = voices.map((v) => `<option value="${escapeHtml(v.name)}" ${v.name === def ? "selected" : ""}>${escapeHtml(v.name)} (${escapeHtml(v.language)})</option>`).join("");
  } catch { $("voice").innerHTML = `<option value="">default</option>`; }
}

async function pollHealth() {
  try {
    const body = await (await fetch("/healthz")).json();
    for (const [name, s] of Object.entries(body.downstream || {})) state.services[name] = s.status === "ok" ? "ok" : "down";
    renderServices();
  } catch { /* shown by the socket status */ }
}

renderTalk();
checkSecureContext();
listMicrophones();
loadVoices().then(connect);
pollHealth(); setInterval(pollHealth, 10000);

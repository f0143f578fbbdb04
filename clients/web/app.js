// The voice assistant page: connects to /v1/realtime, streams the microphone, plays replies, shows
// the transcript. Plain ES modules, no build step. `window.lfm2audio` exposes the app (for debugging
// and the browser tests).

import {
  INPUT_RATE,
  Microphone,
  Player,
  loadWorklets,
  opusDecodeSupported,
  opusEncodeSupported,
  pcm16ToFloat,
} from "./audio.js";
import { FRAME_OPUS, FRAME_PCM16, RealtimeConnection, defaultUrl } from "./realtime.js";

const $ = (id) => document.getElementById(id);
const STORE = "lfm2audio.settings";
const FIELDS = [
  "instructions",
  "voice",
  "text-temperature",
  "text-top-k",
  "audio-temperature",
  "audio-top-k",
  "max-tokens",
  "vad-threshold",
  "vad-silence",
  "codec",
  "server-url",
];

// Settings ---------------------------------------------------------------------------------------

function num(id, int = false) {
  const v = $(id).value.trim();
  if (v === "") return null;
  const n = int ? parseInt(v, 10) : parseFloat(v);
  return Number.isFinite(n) ? n : null;
}

function settings() {
  return {
    mode: document.querySelector('input[name="mode"]:checked').value,
    turns: document.querySelector('input[name="turns"]:checked').value,
    instructions: $("instructions").value.trim(),
    voice: $("voice").value.trim(),
    textTemperature: num("text-temperature"),
    textTopK: num("text-top-k", true),
    audioTemperature: num("audio-temperature"),
    audioTopK: num("audio-top-k", true),
    maxTokens: num("max-tokens", true),
    vadThreshold: num("vad-threshold") ?? 0.5,
    vadSilence: num("vad-silence", true) ?? 500,
    transcribe: $("transcribe").checked,
    codec: $("codec").value,
    url: $("server-url").value.trim() || defaultUrl(),
    apiKey: $("api-key").value,
  };
}

function saveSettings() {
  const s = { mode: settings().mode, turns: settings().turns, transcribe: $("transcribe").checked };
  for (const id of FIELDS) s[id] = $(id).value;
  if (s["server-url"] === defaultUrl()) s["server-url"] = ""; // follow the page's host unless changed
  try {
    localStorage.setItem(STORE, JSON.stringify(s));
    sessionStorage.setItem(STORE + ".key", $("api-key").value); // the key lives only as long as the tab
  } catch {
    // storage disabled: settings just do not persist
  }
}

function restoreSettings() {
  let s = {};
  try {
    s = JSON.parse(localStorage.getItem(STORE) || "{}");
    $("api-key").value = sessionStorage.getItem(STORE + ".key") || "";
  } catch {
    s = {};
  }
  for (const id of FIELDS) if (typeof s[id] === "string") $(id).value = s[id];
  if (s.mode) $(`mode-${s.mode}`).checked = true;
  if (s.turns) $(`turns-${s.turns}`).checked = true;
  if (typeof s.transcribe === "boolean") $("transcribe").checked = s.transcribe;
  if (!$("server-url").value) $("server-url").value = defaultUrl();
}

function sampling(temperature, topK) {
  if (temperature === null && topK === null) return null; // the server's default for the mode
  const out = {};
  if (temperature !== null) out.temperature = temperature;
  if (topK !== null) out.top_k = topK;
  return out;
}

/** The session.update body. With "transcribe" (chat mode), the server transcribes each user turn with the
 * model itself (audio.input.transcription): the user's side of the transcript, on the same session. */
function sessionBody(s, codecs) {
  const mode = s.mode;
  const handsFree = s.turns === "vad" && mode !== "tts";
  const body = {
    type: "realtime",
    instructions: s.instructions || null,
    max_output_tokens: s.maxTokens ?? "inf",
    audio: {
      input: {
        format: { type: "audio/pcm", rate: INPUT_RATE },
        turn_detection: handsFree
          ? {
              type: "server_vad",
              threshold: s.vadThreshold,
              silence_duration_ms: s.vadSilence,
              prefix_padding_ms: 300,
              create_response: true,
              interrupt_response: true,
            }
          : null,
        transcription: s.transcribe && mode === "chat" ? { model: "lfm2-audio" } : null,
      },
    },
    lfm2audio: {
      mode,
      voice: mode === "tts" ? s.voice || null : null,
      sampling: {
        text: sampling(s.textTemperature, s.textTopK),
        audio: sampling(s.audioTemperature, s.audioTopK),
      },
      binary_input: codecs.input === "opus" ? { format: "opus" } : { format: "pcm16", rate: INPUT_RATE },
      binary_output: { format: codecs.output },
    },
  };
  return body;
}

// The app ------------------------------------------------------------------------------------------

class App {
  constructor() {
    this.state = "disconnected";
    this.conn = null; // main session
    this.transcribing = false; // the server transcribes the user's turns (audio.input.transcription)
    this.ctx = null;
    this.mic = null;
    this.player = null;
    this.codecs = { input: "pcm16", output: "pcm16" };
    this.turns = []; // {role, el, text, status, ...}
    this.responses = new Map(); // response_index -> assistant turn
    this.current = null; // response index in progress
    this.cancelling = false;
    this.speaking = false; // server VAD: the user is talking
    this.talking = false; // push-to-talk held
    this.talkStarted = 0;
    this.talkSamples = 0;
    this.turnEnd = null; // when the user's last turn ended (performance.now())
    this.userTurn = null;
    this.framesReceived = 0;
    this.bargeIns = 0;
    this.bargeInLog = []; // {at, by, responses: [{index, status}]}: what each barge-in interrupted
    this.eventLog = [];
    this.connecting = false;
    this.errors = [];
    this.updateTimer = null;
  }

  // UI helpers -----------------------------------------------------------------------------------

  setStatus(state, text) {
    this.state = state;
    $("status").dataset.state = state;
    $("status-text").textContent = text;
    const connected = state !== "disconnected" && state !== "connecting";
    $("connect").textContent = state === "connecting" ? "Cancel" : connected ? "Disconnect" : "Connect";
    this.refreshControls();
  }

  refreshStatus() {
    if (!this.conn || !this.conn.open || this.connecting) return;
    const s = settings();
    let state = "ready";
    let text = s.mode === "tts" ? "Ready: type text to speak" : s.turns === "vad" ? "Listening" : "Ready: hold to talk";
    if (this.mic && !this.mic.sending && s.turns === "vad" && s.mode !== "tts") text = "Microphone muted";
    if (this.speaking || this.talking) [state, text] = ["hearing", "Hearing you…"];
    else if (this.player && this.player.playing !== null) [state, text] = ["speaking", "Speaking"];
    else if (this.current !== null) [state, text] = ["thinking", "Thinking…"];
    this.state = state;
    $("status").dataset.state = state;
    $("status-text").textContent = text;
  }

  refreshControls() {
    const s = settings();
    const connected = !!(this.conn && this.conn.open);
    const talk = $("talk");
    const ptt = s.turns === "ptt";
    $("talk-row").hidden = s.mode === "tts";
    $("voice-row").hidden = s.mode !== "tts";
    $("turns-group").disabled = s.mode === "tts";
    talk.disabled = !connected || s.mode === "tts";
    if (ptt) {
      talk.textContent = this.talking ? "Release to send" : "Hold to talk";
      talk.setAttribute("aria-pressed", String(this.talking));
      $("talk-hint").textContent = "Hold the button (or Space/Enter on it) while you speak.";
    } else {
      const muted = this.mic ? !this.mic.sending : false;
      talk.textContent = muted ? "Unmute microphone" : "Mute microphone";
      talk.setAttribute("aria-pressed", String(muted));
      $("talk-hint").textContent = muted ? "Muted." : "Just talk; talk over the assistant to interrupt it.";
    }
    $("text-input").disabled = !connected || s.mode === "asr";
    $("send").disabled = !connected || s.mode === "asr";
    $("text-input").placeholder = s.mode === "tts" ? "Text to speak…" : "Type a message…";
  }

  alert(message) {
    $("alert-text").textContent = message;
    $("alert").hidden = false;
  }

  addTurn(role, text = "", cls = "") {
    $("empty-hint").hidden = true;
    const el = document.createElement("article");
    el.className = `turn ${role} ${cls}`.trim();
    const head = document.createElement("header");
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const meta = document.createElement("span");
    meta.className = "meta";
    head.append(who, meta);
    const body = document.createElement("p");
    body.className = "text";
    body.textContent = text;
    el.append(head, body);
    $("turns").append(el);
    const turn = { role, el, body, meta, text, status: "in_progress", placeholder: !text };
    this.turns.push(turn);
    this.scroll();
    return turn;
  }

  setText(turn, text, { placeholder = false } = {}) {
    turn.text = text;
    turn.placeholder = placeholder;
    turn.body.textContent = text;
    turn.el.classList.toggle("placeholder", placeholder);
    this.scroll();
  }

  appendText(turn, delta) {
    if (turn.placeholder) this.setText(turn, "");
    turn.text += delta;
    turn.body.textContent = turn.text;
    this.scroll();
  }

  setMeta(turn, text) {
    turn.meta.textContent = text;
  }

  scroll() {
    const t = $("transcript");
    t.scrollTop = t.scrollHeight;
  }

  log(ev) {
    this.eventLog.push(ev);
    if (this.eventLog.length > 500) this.eventLog.shift();
  }

  // Connecting -----------------------------------------------------------------------------------

  async connect() {
    if (this.conn) return;
    saveSettings();
    const s = settings();
    this.setStatus("connecting", "Connecting…");
    $("alert").hidden = true;
    this.connecting = true;
    try {
      if (!this.ctx) {
        this.ctx = new AudioContext({ latencyHint: "interactive" });
        await loadWorklets(this.ctx);
      }
      await this.ctx.resume();
      const opusIn = s.codec !== "pcm16" && (await opusEncodeSupported());
      const opusOut = s.codec !== "pcm16" && (await opusDecodeSupported());
      if (s.codec === "opus" && !(opusIn && opusOut)) this.alert("This browser cannot encode/decode Opus (WebCodecs); using PCM16.");
      this.codecs = { input: opusIn ? "opus" : "pcm16", output: opusOut ? "opus" : "pcm16" };

      this.player = new Player(this.ctx);
      this.player.addEventListener("started", (e) => this.onPlaybackStarted(e.detail));
      this.player.addEventListener("flushed", () => {
        // How long the barge-in took to silence playback (the worklet's acknowledgement).
        const b = this.bargeInLog[this.bargeInLog.length - 1];
        if (b && b.silencedMs === undefined) b.silencedMs = performance.now() - b.at;
      });
      this.player.addEventListener("drained", (e) => {
        const turn = this.responses.get(e.detail.id);
        if (turn) turn.drained = true;
        this.refreshStatus();
      });

      const session = await this.openSession(s);
      const conn = this.conn;
      conn.send("session.update", { session: sessionBody(s, this.codecs) });
      $("session-info").textContent = `Session ${session.id} · model ${session.model} · audio in ${this.codecs.input}, out ${this.codecs.output} · ${this.ctx.sampleRate} Hz`;

      if (s.mode !== "tts") await this.startMic();
      this.transcribing = s.transcribe && s.mode === "chat";
      this.connecting = false;
      this.setStatus("ready", "Connected");
      this.refreshStatus();
    } catch (e) {
      const cancelled = this.conn === null; // the user pressed Cancel
      this.connecting = false;
      this.disconnect();
      if (!cancelled) {
        this.errors.push(String(e.message || e));
        this.alert(e.name === "NotAllowedError" ? "Microphone access was denied." : `Could not connect: ${e.message || e}`);
      }
    }
  }

  /**
   * Open the main session. A server at its session limit (or still loading) refuses the handshake
   * with HTTP 503, which a browser only sees as a failed connection: retry a few times with backoff.
   */
  async openSession(s) {
    const delays = [500, 1000, 2000];
    for (let attempt = 0; ; attempt++) {
      const conn = new RealtimeConnection(s.url, { apiKey: s.apiKey });
      conn.addEventListener("event", (e) => this.onEvent(e.detail));
      conn.addEventListener("frame", (e) => this.onFrame(e.detail));
      conn.addEventListener("close", (e) => this.onClose(conn, e.detail));
      this.conn = conn;
      try {
        return await conn.connect();
      } catch (e) {
        const refusedByServer = e.code !== "connection_closed"; // an error event: bad key, origin, ...
        if (refusedByServer || attempt >= delays.length || this.conn !== conn) throw e;
        this.setStatus("connecting", `Server busy or unreachable; retrying (${attempt + 1}/${delays.length})…`);
        await new Promise((r) => setTimeout(r, delays[attempt]));
        if (this.conn !== conn) throw e; // the user gave up meanwhile
      }
    }
  }

  async startMic() {
    if (this.mic) return;
    const s = settings();
    this.mic = new Microphone(this.ctx, {
      codec: this.codecs.input,
      onData: (buf) => {
        this.conn && this.conn.sendBinary(buf);
        if (this.talking) this.talkSamples += this.codecs.input === "pcm16" ? buf.byteLength / 2 : 320;
      },
      onLevel: (level) => {
        const db = 20 * Math.log10(level + 1e-6);
        $("level-bar").style.width = `${Math.max(0, Math.min(100, ((db + 60) / 60) * 100))}%`;
      },
      onError: (e) => this.alert(`Audio encoder: ${e.message || e}`),
    });
    await this.mic.start();
    this.mic.sending = s.turns === "vad";
    this.refreshControls();
  }

  stopMic() {
    if (this.mic) this.mic.stop();
    this.mic = null;
    $("level-bar").style.width = "0";
  }

  disconnect() {
    const conn = this.conn;
    this.conn = null;
    if (conn) conn.close();
    this.transcribing = false;
    this.stopMic();
    if (this.player) this.player.close();
    this.player = null;
    this.current = null;
    this.talking = this.speaking = false;
    this.setStatus("disconnected", "Disconnected");
  }

  onClose(conn, { code, reason, error }) {
    if (conn !== this.conn || this.connecting) return;
    const why = error ? `${error.message}` : `connection closed (${code}${reason ? " " + reason : ""})`;
    if (code !== 1000) this.alert(code === 1013 ? `${why}. Try again in a moment.` : why);
    this.disconnect();
  }

  /** Settings changed while connected: the session follows (from its next response on). */
  scheduleUpdate() {
    saveSettings();
    this.refreshControls();
    if (!this.conn || !this.conn.open) return;
    clearTimeout(this.updateTimer);
    this.updateTimer = setTimeout(() => this.applySettings(), 250);
  }

  async applySettings() {
    if (!this.conn || !this.conn.open) return;
    const s = settings();
    this.conn.send("session.update", { session: sessionBody(s, this.codecs) });
    this.transcribing = s.transcribe && s.mode === "chat"; // asr mode transcribes already; tts has no voice input
    if (s.mode === "tts") this.stopMic();
    else {
      await this.startMic();
      this.mic.sending = s.turns === "vad";
    }
    this.refreshControls();
    this.refreshStatus();
  }

  // Turn taking ----------------------------------------------------------------------------------

  /** The user speaks over the assistant: stop its voice now, and cancel what is still generating. */
  bargeIn({ cancel }) {
    if (!this.player) return;
    const audible = (t) => !t.interrupted && (t.status === "in_progress" || (t.frames > 0 && !t.drained));
    const active = [...this.responses.values()].filter(audible);
    if (!active.length) return;
    this.bargeIns++;
    this.bargeInLog.push({
      at: performance.now(),
      by: cancel ? "client" : "server_vad",
      responses: active.map((t) => ({ index: t.index, status: t.status })),
    });
    this.player.mute([...this.responses.keys()]);
    for (const t of active) {
      t.interrupted = true;
      t.el.classList.add("interrupted");
      this.showMeta(t);
    }
    if (cancel && this.current !== null && !this.cancelling) {
      this.cancelling = true;
      this.conn.send("response.cancel");
    }
  }

  startTalking() {
    const s = settings();
    if (!this.conn || !this.conn.open || !this.mic || s.turns !== "ptt" || this.talking) return;
    this.talking = true;
    this.bargeIn({ cancel: true });
    this.conn.send("input_audio_buffer.clear");
    this.talkStarted = performance.now();
    this.talkSamples = 0;
    this.mic.sending = true;
    this.userTurn = this.addTurn("user", "Listening…");
    this.userTurn.placeholder = true;
    this.userTurn.el.classList.add("placeholder");
    this.refreshControls();
    this.refreshStatus();
  }

  async stopTalking() {
    if (!this.talking) return;
    this.talking = false;
    this.refreshControls();
    if (!this.mic || !this.conn) return;
    await this.mic.flush();
    if (!this.mic || !this.conn) return;
    this.mic.sending = false;
    const turn = this.userTurn;
    const seconds = this.talkSamples / INPUT_RATE;
    if (seconds < 0.15) {
      this.conn.send("input_audio_buffer.clear");
        if (turn) {
        this.setText(turn, "Too short: hold the button while you speak.", { placeholder: true });
        turn.status = "discarded";
      }
      this.refreshStatus();
      return;
    }
    if (turn) {
      this.setText(turn, `Voice message (${seconds.toFixed(1)} s)`, { placeholder: true });
      turn.status = "completed";
    }
    this.turnEnd = performance.now();
    this.conn.send("input_audio_buffer.commit");
    this.conn.send("response.create");
    this.refreshStatus();
  }

  sendText(text) {
    const s = settings();
    if (!this.conn || !this.conn.open || !text) return;
    this.bargeIn({ cancel: true });
    this.addTurn("user", text).status = "completed";
    this.turnEnd = performance.now();
    this.conn.send("conversation.item.create", {
      item: { type: "message", role: "user", content: [{ type: "input_text", text }] },
    });
    this.conn.send("response.create");
    if (s.mode === "tts" && s.voice) this.setMeta(this.turns[this.turns.length - 1], `voice: ${s.voice}`);
  }

  // Server events --------------------------------------------------------------------------------

  onEvent(ev) {
    this.log(ev.type);
    switch (ev.type) {
      case "input_audio_buffer.speech_started": {
        this.speaking = true;
        this.bargeIn({ cancel: false }); // the server cancels (interrupt_response)
        this.userTurn = this.addTurn("user", "Listening…");
        this.userTurn.placeholder = true;
        this.userTurn.el.classList.add("placeholder");
        this.userTurn.itemId = ev.item_id;
        this.userTurn.startMs = ev.audio_start_ms;
        break;
      }
      case "input_audio_buffer.speech_stopped": {
        this.speaking = false;
        this.turnEnd = performance.now();
        const turn = this.userTurn;
        if (turn) {
          const seconds = (ev.audio_end_ms - (turn.startMs ?? ev.audio_end_ms)) / 1000;
          if (turn.placeholder) this.setText(turn, `Voice message (${seconds.toFixed(1)} s)`, { placeholder: true });
          turn.status = "completed";
        }
        break;
      }
      case "input_audio_buffer.committed": {
        // Push-to-talk turns learn their item id here (server VAD ones at speech_started).
        const turn = this.userTurn;
        if (turn && !turn.itemId) turn.itemId = ev.item_id;
        break;
      }
      case "conversation.item.input_audio_transcription.delta": {
        const turn = this.turns.find((t) => t.itemId === ev.item_id);
        if (turn) this.appendText(turn, ev.delta || "");
        break;
      }
      case "conversation.item.input_audio_transcription.completed": {
        const turn = this.turns.find((t) => t.itemId === ev.item_id);
        if (turn && ev.transcript) this.setText(turn, ev.transcript);
        break;
      }
      case "response.created": {
        const r = ev.response;
        const index = r.lfm2audio ? r.lfm2audio.response_index : this.responses.size;
        const turn = this.addTurn("assistant", "…");
        turn.placeholder = true;
        turn.el.classList.add("placeholder");
        Object.assign(turn, {
          id: r.id,
          index,
          mode: r.lfm2audio ? r.lfm2audio.mode : settings().mode,
          requestedAt: this.turnEnd ?? performance.now(),
          frames: 0,
          textDeltas: 0,
        });
        if (turn.mode === "asr") turn.el.querySelector(".who").textContent = "Transcript";
        this.responses.set(index, turn);
        turn.el.dataset.index = String(index);
        this.current = index;
        this.cancelling = false;
        break;
      }
      case "response.output_audio_transcript.delta":
      case "response.output_text.delta": {
        const turn = this.byId(ev.response_id);
        if (turn && !turn.interrupted) {
          turn.textDeltas++;
          this.appendText(turn, ev.delta || "");
        }
        break;
      }
      case "response.output_audio.delta": {
        // JSON audio (when binary output is off): base64 PCM16 at 24 kHz.
        const turn = this.byId(ev.response_id);
        if (!turn) break;
        const bin = atob(ev.delta);
        const bytes = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
        this.onAudio(turn, () => this.player.pushFloat(pcm16ToFloat(bytes), 24000, turn.index));
        break;
      }
      case "response.done":
        this.onResponseDone(ev.response);
        break;
      case "error":
        this.errors.push(`${ev.error.code}: ${ev.error.message}`);
        if (ev.error.code !== "response_cancel_not_active") this.alert(`${ev.error.message} (${ev.error.code})`);
        break;
      case "lfm2audio.session_event":
        if (ev.kind === "history_truncated") this.setMeta(this.turns[this.turns.length - 1] || this.addTurn("assistant"), "(older turns were dropped to fit the context)");
        break;
      default:
        break;
    }
    this.refreshStatus();
  }

  byId(responseId) {
    for (const t of this.responses.values()) if (t.id === responseId) return t;
    return null;
  }

  onFrame(frame) {
    const turn = this.responses.get(frame.responseIndex);
    if (!turn) return;
    this.onAudio(turn, () => {
      if (frame.format === FRAME_OPUS) this.player.pushOpus(frame.payload, turn.index);
      else if (frame.format === FRAME_PCM16) this.player.pushPcm16(frame.payload, turn.index);
    });
  }

  onAudio(turn, push) {
    this.framesReceived++;
    turn.frames++;
    if (turn.firstAudioAt === undefined) {
      turn.firstAudioAt = performance.now();
      this.showMeta(turn);
    }
    if (!turn.interrupted && this.player) push();
  }

  onPlaybackStarted({ id, at }) {
    const turn = this.responses.get(id);
    if (turn && turn.heardAt === undefined) {
      turn.heardAt = at;
      turn.playing = true;
      this.showMeta(turn);
    }
    this.refreshStatus();
  }

  onResponseDone(r) {
    const turn = this.byId(r.id);
    if (!turn) return;
    turn.status = r.status;
    turn.stats = r.lfm2audio || {};
    turn.reason = r.status_details ? r.status_details.reason || (r.status_details.error || {}).message : null;
    if (turn.placeholder) this.setText(turn, turn.frames ? "(spoken reply)" : "(no reply)", { placeholder: true });
    if (this.current === turn.index) this.current = null;
    this.cancelling = false;
    if (this.player && !turn.interrupted) this.player.end(turn.index);
    this.showMeta(turn);
  }

  showMeta(turn) {
    const parts = [];
    const ttfa = turn.heardAt ?? turn.firstAudioAt;
    if (ttfa !== undefined && turn.requestedAt !== undefined) parts.push(`first audio ${Math.round(ttfa - turn.requestedAt)} ms`);
    const st = turn.stats || {};
    if (st.time_to_first_audio_ms != null) parts.push(`server ${Math.round(st.time_to_first_audio_ms)} ms`);
    if (turn.frames) parts.push(`${(turn.frames * 0.08).toFixed(1)} s`);
    if (turn.interrupted) parts.push("interrupted");
    else if (turn.status === "incomplete" && turn.reason === "max_output_tokens") parts.push("token limit reached");
    else if (turn.status === "incomplete" && turn.reason === "context_limit") parts.push("context full");
    else if (turn.status === "failed") parts.push(`failed: ${turn.reason || "server error"}`);
    else if (turn.status && turn.status !== "in_progress" && turn.status !== "completed") parts.push(turn.status);
    this.setMeta(turn, parts.join(" · "));
    turn.el.dataset.status = turn.status;
  }

  /** For tests and debugging: what the page holds. */
  snapshot() {
    return {
      state: this.state,
      status: $("status-text").textContent,
      codecs: { ...this.codecs },
      sampleRate: this.ctx ? this.ctx.sampleRate : null,
      framesReceived: this.framesReceived,
      bargeIns: this.bargeIns,
      bargeInLog: this.bargeInLog.map((b) => ({ ...b, responses: b.responses.map((r) => ({ ...r })) })),
      transcription: this.transcribing,
      playback: this.player ? { ...this.player.stats, pushedFrames: this.player.pushedFrames, playing: this.player.playing } : null,
      mic: this.mic ? { sending: this.mic.sending, sentSamples: this.mic.sentSamples, sentBytes: this.mic.sentBytes } : null,
      turns: this.turns.map((t) => ({
        role: t.role,
        text: t.text,
        placeholder: !!t.placeholder,
        status: t.status,
        index: t.index ?? null,
        frames: t.frames ?? 0,
        interrupted: !!t.interrupted,
        heard: t.heardAt !== undefined,
        meta: t.meta.textContent,
        reason: t.reason ?? null,
      })),
      errors: [...this.errors],
      events: [...this.eventLog],
    };
  }
}

// Wiring -------------------------------------------------------------------------------------------

const app = new App();
window.lfm2audio = app;

function init() {
  restoreSettings();
  app.refreshControls();

  $("connect").addEventListener("click", () => (app.conn || app.connecting ? app.disconnect() : app.connect()));
  $("alert-close").addEventListener("click", () => ($("alert").hidden = true));

  const talk = $("talk");
  talk.addEventListener("pointerdown", (e) => {
    if (settings().turns !== "ptt" || e.button !== 0) return;
    talk.setPointerCapture(e.pointerId);
    app.startTalking();
  });
  for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
    talk.addEventListener(type, () => app.stopTalking());
  }
  talk.addEventListener("keydown", (e) => {
    if ((e.key === " " || e.key === "Enter") && settings().turns === "ptt") {
      e.preventDefault();
      if (!e.repeat) app.startTalking();
    }
  });
  talk.addEventListener("keyup", (e) => {
    if ((e.key === " " || e.key === "Enter") && settings().turns === "ptt") {
      e.preventDefault();
      app.stopTalking();
    }
  });
  talk.addEventListener("click", () => {
    // Hands-free: the button mutes / unmutes the microphone.
    if (settings().turns !== "vad" || !app.mic) return;
    app.mic.sending = !app.mic.sending;
    app.refreshControls();
    app.refreshStatus();
  });
  talk.addEventListener("contextmenu", (e) => e.preventDefault()); // long-press on phones

  $("text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("text-input").value.trim();
    if (!text) return;
    $("text-input").value = "";
    app.sendText(text);
  });

  for (const input of document.querySelectorAll('input[name="mode"], input[name="turns"]')) {
    input.addEventListener("change", () => app.scheduleUpdate());
  }
  for (const id of [...FIELDS, "transcribe"]) {
    if (id === "server-url") continue; // used at the next connect
    $(id).addEventListener("change", () => app.scheduleUpdate());
  }
  $("server-url").addEventListener("change", saveSettings);
  $("api-key").addEventListener("change", saveSettings);
  setInterval(() => app.refreshStatus(), 250);
}

init();

// Audio in the browser: microphone capture (AudioWorklet, 16 kHz, PCM16 or WebCodecs Opus), and reply
// playback (AudioWorklet jitter buffer; Opus decoded with WebCodecs AudioDecoder, PCM16 otherwise).

export const INPUT_RATE = 16000; // what we send: the model's input rate
export const OUTPUT_RATE = 24000; // what the model speaks
const OPUS_RATE = 48000;

/** Load both worklets into `ctx` (once per context). */
export async function loadWorklets(ctx) {
  await ctx.audioWorklet.addModule(new URL("./worklets/capture.js", import.meta.url));
  await ctx.audioWorklet.addModule(new URL("./worklets/playback.js", import.meta.url));
}

export async function opusEncodeSupported() {
  if (typeof AudioEncoder === "undefined") return false;
  try {
    const r = await AudioEncoder.isConfigSupported(opusEncoderConfig());
    return !!r.supported;
  } catch {
    return false;
  }
}

export async function opusDecodeSupported() {
  if (typeof AudioDecoder === "undefined") return false;
  try {
    const r = await AudioDecoder.isConfigSupported({ codec: "opus", sampleRate: OPUS_RATE, numberOfChannels: 1 });
    return !!r.supported;
  } catch {
    return false;
  }
}

function opusEncoderConfig() {
  return { codec: "opus", sampleRate: INPUT_RATE, numberOfChannels: 1, bitrate: 32000, opus: { frameDuration: 20000 } };
}

/** Samples at 48 kHz in one Opus packet (RFC 6716 section 3.1). */
export function opusPacketSamples(p) {
  if (!p.length) return 0;
  const toc = p[0];
  const config = toc >> 3;
  let frame;
  if (config < 12) frame = [480, 960, 1920, 2880][config & 3];
  else if (config < 16) frame = [480, 960][config & 1];
  else frame = [120, 240, 480, 960][config & 3];
  const code = toc & 3;
  const count = code === 0 ? 1 : code < 3 ? 2 : p.length > 1 ? p[1] & 0x3f : 1;
  return frame * count;
}

/** Length-prefixed packets (uint16 LE length + bytes, repeated), as the server's Opus frames carry them. */
export function unpackPackets(bytes) {
  const out = [];
  let i = 0;
  while (i + 2 <= bytes.length) {
    const n = bytes[i] | (bytes[i + 1] << 8);
    i += 2;
    if (n === 0 || i + n > bytes.length) break;
    out.push(bytes.subarray(i, i + n));
    i += n;
  }
  return out;
}

export function packPackets(packets) {
  const total = packets.reduce((a, p) => a + 2 + p.length, 0);
  const out = new Uint8Array(total);
  let i = 0;
  for (const p of packets) {
    out[i] = p.length & 0xff;
    out[i + 1] = p.length >> 8;
    out.set(p, i + 2);
    i += 2 + p.length;
  }
  return out;
}

export function floatToPcm16(f32) {
  const out = new Int16Array(f32.length);
  for (let i = 0; i < f32.length; i++) {
    const v = Math.max(-1, Math.min(1, f32[i]));
    out[i] = v < 0 ? v * 32768 : v * 32767;
  }
  return out;
}

export function pcm16ToFloat(bytes) {
  const n = bytes.byteLength >> 1;
  const view = new DataView(bytes.buffer, bytes.byteOffset, n * 2);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = view.getInt16(2 * i, true) / 32768;
  return out;
}

/**
 * Microphone -> 16 kHz chunks -> `onData(ArrayBuffer)` as raw PCM16, or length-prefixed Opus packets.
 * `sending` gates what leaves (push-to-talk); the level meter keeps working either way.
 */
export class Microphone {
  constructor(ctx, { codec = "pcm16", onData, onLevel, onError } = {}) {
    this.ctx = ctx;
    this.codec = codec;
    this.onData = onData || (() => {});
    this.onLevel = onLevel || (() => {});
    this.onError = onError || ((e) => console.error(e));
    this.sending = false;
    this.sentSamples = 0;
    this.sentBytes = 0;
    this.stream = null;
    this.node = null;
    this.encoder = null;
    this.timestamp = 0;
    this.flushes = new Map();
    this.flushId = 0;
  }

  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    this.source = this.ctx.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.ctx, "lfm-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { targetRate: INPUT_RATE, chunkMs: 20 },
    });
    this.node.port.onmessage = (e) => this.onMessage(e.data);
    // A worklet is only pulled when connected towards the destination: through a silent gain.
    this.sink = new GainNode(this.ctx, { gain: 0 });
    this.source.connect(this.node).connect(this.sink).connect(this.ctx.destination);
    if (this.codec === "opus") this.openEncoder();
  }

  openEncoder() {
    this.encoder = new AudioEncoder({
      output: (chunk) => {
        const bytes = new Uint8Array(chunk.byteLength);
        chunk.copyTo(bytes);
        this.emit(packPackets([bytes]).buffer);
      },
      error: (e) => this.onError(e),
    });
    this.encoder.configure(opusEncoderConfig());
  }

  emit(buffer) {
    this.sentBytes += buffer.byteLength;
    this.onData(buffer);
  }

  onMessage(m) {
    if (m.type === "audio") {
      this.onLevel(m.level);
      if (!this.sending) return;
      this.sentSamples += m.pcm.length;
      if (this.encoder) {
        const data = new AudioData({
          format: "f32",
          sampleRate: INPUT_RATE,
          numberOfFrames: m.pcm.length,
          numberOfChannels: 1,
          timestamp: this.timestamp,
          data: m.pcm,
        });
        this.timestamp += Math.round((m.pcm.length * 1e6) / INPUT_RATE);
        this.encoder.encode(data);
        data.close();
      } else {
        this.emit(floatToPcm16(m.pcm).buffer);
      }
    } else if (m.type === "flushed") {
      const resolve = this.flushes.get(m.id);
      this.flushes.delete(m.id);
      if (resolve) resolve();
    }
  }

  /** Send what the worklet and the encoder still hold (end of a push-to-talk turn). */
  async flush() {
    if (!this.node) return;
    const id = ++this.flushId;
    await new Promise((resolve) => {
      this.flushes.set(id, resolve);
      this.node.port.postMessage({ type: "flush", id });
    });
    if (this.encoder && this.encoder.state === "configured") await this.encoder.flush();
  }

  stop() {
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    if (this.source) this.source.disconnect();
    if (this.node) this.node.disconnect();
    if (this.sink) this.sink.disconnect();
    if (this.encoder && this.encoder.state !== "closed") this.encoder.close();
    this.stream = this.node = this.encoder = this.source = this.sink = null;
  }
}

/**
 * Reply playback through the jitter-buffer worklet. Responses are identified by their
 * `response_index`; `mute(id)` (barge-in) drops what is buffered and whatever of that response
 * still arrives.
 */
export class Player extends EventTarget {
  constructor(ctx, { prebufferMs = 120 } = {}) {
    super();
    this.ctx = ctx;
    this.node = new AudioWorkletNode(ctx, "lfm-playback", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { prebufferMs, maxPrebufferMs: 480 },
    });
    this.node.connect(ctx.destination);
    this.node.port.onmessage = (e) => this.onMessage(e.data);
    this.muted = new Set();
    this.decoder = null; // the session's Opus decoder, opened at the first Opus frame
    this.timestamp = 0;
    this.bounds = []; // {ts, id}: where each response starts in the decoder's timeline
    this.stats = { pushedSamples: 0, playedSamples: 0, bufferedMs: 0, underruns: 0, flushes: 0, state: "idle" };
    this.pushedFrames = 0;
    this.playing = null; // response index being heard
  }

  onMessage(m) {
    if (m.type === "stats") {
      Object.assign(this.stats, m);
    } else if (m.type === "started") {
      this.playing = m.id;
      this.dispatchEvent(new CustomEvent("started", { detail: { id: m.id, at: performance.now() } }));
    } else if (m.type === "drained") {
      if (this.playing === m.id) this.playing = null;
      this.dispatchEvent(new CustomEvent("drained", { detail: { id: m.id } }));
    } else if (m.type === "underrun") {
      this.dispatchEvent(new CustomEvent("underrun", { detail: m }));
    } else if (m.type === "flushed") {
      this.stats.flushes++;
      this.playing = null;
      this.dispatchEvent(new CustomEvent("flushed", { detail: m }));
    }
  }

  get active() {
    return this.playing !== null || this.stats.bufferedMs > 0;
  }

  pushFloat(pcm, rate, id) {
    if (this.muted.has(id) || pcm.length === 0) return;
    this.node.port.postMessage({ type: "push", pcm, rate, id }, [pcm.buffer]);
  }

  pushPcm16(bytes, id) {
    this.pushedFrames++;
    this.pushFloat(pcm16ToFloat(bytes), OUTPUT_RATE, id);
  }

  /**
   * One server Opus frame (length-prefixed packets) of response `id`. The server's packets form one
   * stream per session, so one decoder decodes them all, in order; its outputs are told apart by
   * timestamp (packets get consecutive timestamps, and the first packet of each response marks where
   * that response begins). Packets of muted responses are still decoded, keeping the decoder's state
   * continuous, and their audio is dropped.
   */
  pushOpus(bytes, id) {
    this.pushedFrames++;
    if (!this.decoder || this.decoder.state === "closed") this.openDecoder();
    const bounds = this.bounds;
    if (!bounds.length || bounds[bounds.length - 1].id !== id) {
      bounds.push({ ts: this.timestamp, id });
      if (bounds.length > 8) bounds.shift();
    }
    for (const p of unpackPackets(bytes)) {
      this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.timestamp, data: p }));
      this.timestamp += Math.round((opusPacketSamples(p) * 1e6) / OPUS_RATE);
    }
  }

  openDecoder() {
    this.timestamp = 0;
    this.bounds = [];
    this.decoder = new AudioDecoder({
      output: (audio) => {
        const id = this.idAt(audio.timestamp);
        const pcm = new Float32Array(audio.numberOfFrames);
        audio.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
        const rate = audio.sampleRate;
        audio.close();
        if (id !== null) this.pushFloat(pcm, rate, id);
      },
      error: (e) => {
        console.error("Opus decoder", e);
        this.decoder = null; // the next frame opens a new one
      },
    });
    this.decoder.configure({ codec: "opus", sampleRate: OPUS_RATE, numberOfChannels: 1 });
  }

  idAt(ts) {
    // 20 ms of slack: a decoder may shift its output timestamps by its pre-skip.
    for (let i = this.bounds.length - 1; i >= 0; i--) if (this.bounds[i].ts <= ts + 20000) return this.bounds[i].id;
    return this.bounds.length ? this.bounds[0].id : null;
  }

  /** The last frame of response `id` arrived: play out the rest even if shorter than the prebuffer. */
  async end(id) {
    if (this.decoder && this.decoder.state === "configured") {
      try {
        await this.decoder.flush(); // every packet of the response decoded and pushed
      } catch {
        // closed meanwhile
      }
    }
    this.finish(id);
  }

  finish(id) {
    if (!this.muted.has(id)) this.node.port.postMessage({ type: "end", id });
  }

  /** Barge-in: stop at once and drop everything of these responses, now and later. */
  mute(ids) {
    for (const id of ids) this.muted.add(id);
    this.flush();
  }

  flush() {
    this.node.port.postMessage({ type: "flush" });
    this.stats.bufferedMs = 0;
    this.playing = null;
  }

  close() {
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    this.decoder = null;
    this.node.disconnect();
  }
}

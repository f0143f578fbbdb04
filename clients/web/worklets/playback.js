// Playback jitter buffer. The main thread pushes decoded reply audio (any rate; resampled here to the
// context rate) tagged with its response index. Playback of a response starts once `prebuffer` is
// queued (or its end is known); an underrun goes back to buffering and raises the prebuffer target
// (up to maxPrebufferMs), so a jittery network costs a little latency instead of repeated gaps.
// `flush` drops everything at once (barge-in).
import { Resampler } from "./resampler.js";

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.prebuffer = Math.round((sampleRate * (opts.prebufferMs || 120)) / 1000);
    this.maxPrebuffer = Math.round((sampleRate * (opts.maxPrebufferMs || 480)) / 1000);
    this.queue = []; // {data: Float32Array, offset, id}
    this.buffered = 0;
    this.state = "idle"; // idle | buffering | playing
    this.ended = new Set(); // responses whose last audio has been pushed
    this.resamplers = new Map(); // input rate -> Resampler
    this.lastStarted = -1;
    this.underruns = 0;
    this.played = 0;
    this.pushed = 0;
    this.sinceStats = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  resample(pcm, rate) {
    if (rate === sampleRate) return pcm;
    let r = this.resamplers.get(rate);
    if (!r) {
      r = new Resampler(rate, sampleRate);
      this.resamplers.set(rate, r);
    }
    return r.process(pcm);
  }

  onMessage(m) {
    if (m.type === "push") {
      const data = this.resample(m.pcm, m.rate);
      if (data.length === 0) return;
      this.queue.push({ data, offset: 0, id: m.id });
      this.buffered += data.length;
      this.pushed += data.length;
      if (this.state === "idle") this.state = "buffering";
    } else if (m.type === "end") {
      // The resamplers hold `width` samples of delay: push zeros through to release the reply's tail.
      for (const [rate, r] of this.resamplers) {
        const tail = r.process(new Float32Array(r.width + 2));
        if (tail.length) {
          this.queue.push({ data: tail, offset: 0, id: m.id });
          this.buffered += tail.length;
        }
        r.reset();
        this.resamplers.delete(rate);
      }
      this.ended.add(m.id);
      if (this.state === "idle" && this.buffered > 0) this.state = "buffering";
    } else if (m.type === "flush") {
      const dropped = this.buffered;
      this.queue = [];
      this.buffered = 0;
      this.state = "idle";
      this.resamplers.clear();
      this.ended.clear();
      this.port.postMessage({ type: "flushed", dropped, id: m.id });
    } else if (m.type === "config") {
      if (m.prebufferMs) this.prebuffer = Math.round((sampleRate * m.prebufferMs) / 1000);
    }
  }

  process(inputs, outputs) {
    const output = outputs[0];
    const out = output[0];
    const frames = out.length;
    out.fill(0);
    if (this.state === "buffering") {
      const head = this.queue.length ? this.queue[this.queue.length - 1].id : -1;
      if (this.buffered >= this.prebuffer || this.ended.has(head)) this.state = "playing";
    }
    let i = 0;
    if (this.state === "playing") {
      while (i < frames && this.queue.length) {
        const c = this.queue[0];
        if (c.id !== this.lastStarted) {
          this.lastStarted = c.id;
          this.port.postMessage({ type: "started", id: c.id, frame: currentFrame + i });
        }
        const n = Math.min(frames - i, c.data.length - c.offset);
        out.set(c.data.subarray(c.offset, c.offset + n), i);
        c.offset += n;
        i += n;
        this.buffered -= n;
        if (c.offset === c.data.length) this.queue.shift();
      }
      this.played += i;
      if (!this.queue.length) {
        const last = this.lastStarted;
        this.state = "idle";
        if (this.ended.has(last)) {
          this.ended.delete(last);
          this.port.postMessage({ type: "drained", id: last });
        } else {
          this.underruns++;
          this.prebuffer = Math.min(this.maxPrebuffer, Math.round(this.prebuffer * 1.5));
          this.port.postMessage({ type: "underrun", id: last, prebuffer: this.prebuffer / sampleRate });
        }
      }
    }
    for (let ch = 1; ch < output.length; ch++) output[ch].set(out);
    this.sinceStats += frames;
    if (this.sinceStats >= sampleRate / 4) {
      this.sinceStats = 0;
      this.port.postMessage({
        type: "stats",
        bufferedMs: (1000 * this.buffered) / sampleRate,
        prebufferMs: (1000 * this.prebuffer) / sampleRate,
        underruns: this.underruns,
        playedSamples: this.played,
        pushedSamples: this.pushed,
        state: this.state,
      });
    }
    return true;
  }
}

registerProcessor("lfm-playback", PlaybackProcessor);

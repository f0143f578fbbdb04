// Microphone capture: mixes to mono, resamples the context rate to `targetRate` (16 kHz, the model's
// rate) and posts `chunkMs` Float32 chunks with their RMS level to the main thread, which sends them as
// PCM16 or feeds them to a WebCodecs Opus encoder.
import { Resampler } from "./resampler.js";

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.targetRate = opts.targetRate || 16000;
    this.chunk = Math.round((this.targetRate * (opts.chunkMs || 20)) / 1000);
    this.resampler = new Resampler(sampleRate, this.targetRate);
    this.pending = new Float32Array(this.chunk);
    this.fill = 0;
    this.sumSq = 0;
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "flush") {
        this.emit(true);
        this.port.postMessage({ type: "flushed", id: e.data.id });
      }
    };
  }

  emit(partial) {
    if (this.fill === 0) return;
    const pcm = partial ? this.pending.slice(0, this.fill) : this.pending;
    const level = Math.sqrt(this.sumSq / this.fill);
    this.port.postMessage({ type: "audio", pcm, level }, [pcm.buffer]);
    this.pending = new Float32Array(this.chunk);
    this.fill = 0;
    this.sumSq = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || input[0].length === 0) return true;
    let mono = input[0];
    if (input.length > 1) {
      mono = new Float32Array(input[0].length);
      for (const ch of input) for (let i = 0; i < ch.length; i++) mono[i] += ch[i] / input.length;
    }
    const y = this.resampler.process(mono);
    let i = 0;
    while (i < y.length) {
      const n = Math.min(y.length - i, this.chunk - this.fill);
      for (let j = 0; j < n; j++) {
        const v = y[i + j];
        this.pending[this.fill + j] = v;
        this.sumSq += v * v;
      }
      this.fill += n;
      i += n;
      if (this.fill === this.chunk) this.emit(false);
    }
    return true;
  }
}

registerProcessor("lfm-capture", CaptureProcessor);

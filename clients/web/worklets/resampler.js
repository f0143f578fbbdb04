// Streaming windowed-sinc resampler (Blackman window, table-driven kernel), for mono Float32 audio.
// Used inside the AudioWorklets: the microphone (context rate -> 16 kHz) and playback (24 / 48 kHz ->
// context rate). Stateful across calls, so chunk boundaries do not click; latency is `width` input samples.

const TABLE_RES = 256; // kernel points per input sample

function sinc(x) {
  if (x === 0) return 1;
  const px = Math.PI * x;
  return Math.sin(px) / px;
}

export class Resampler {
  /**
   * @param {number} inRate input sample rate (Hz)
   * @param {number} outRate output sample rate (Hz)
   * @param {number} halfTaps zero crossings on each side of the kernel (quality vs CPU)
   */
  constructor(inRate, outRate, halfTaps = 16) {
    this.inRate = inRate;
    this.outRate = outRate;
    this.step = inRate / outRate; // input samples per output sample
    this.passthrough = inRate === outRate;
    // Cut-off relative to the input Nyquist: below the lower of the two Nyquists, with a guard band.
    const cutoff = Math.min(1, outRate / inRate) * 0.92;
    this.width = Math.ceil(halfTaps / cutoff); // kernel half-width, in input samples
    const n = this.width * TABLE_RES;
    this.table = new Float32Array(n + 2);
    for (let i = 0; i <= n; i++) {
      const x = i / TABLE_RES;
      const w = 0.42 + 0.5 * Math.cos((Math.PI * x) / this.width) + 0.08 * Math.cos((2 * Math.PI * x) / this.width);
      this.table[i] = cutoff * sinc(cutoff * x) * w;
    }
    this.reset();
  }

  reset() {
    this.buf = new Float32Array(this.width); // leading zeros: the first output is centred on sample 0
    this.pos = this.width;
  }

  /** @param {Float32Array} input @returns {Float32Array} */
  process(input) {
    if (this.passthrough) return input;
    const buf = new Float32Array(this.buf.length + input.length);
    buf.set(this.buf);
    buf.set(input, this.buf.length);
    const w = this.width;
    const table = this.table;
    const limit = buf.length - w; // the last input sample an output may reach is floor(t) + w
    const out = new Float32Array(Math.max(0, Math.ceil((limit - this.pos) / this.step) + 1));
    let t = this.pos;
    let n = 0;
    while (t < limit) {
      const i0 = Math.floor(t);
      let acc = 0;
      for (let k = i0 - w + 1; k <= i0 + w; k++) {
        const d = Math.abs(t - k) * TABLE_RES;
        const j = d | 0;
        const v = table[j] + (table[j + 1] - table[j]) * (d - j);
        acc += buf[k] * v;
      }
      out[n++] = acc;
      t += this.step;
    }
    const keep = Math.floor(t) - w + 1;
    this.buf = buf.slice(keep);
    this.pos = t - keep;
    return out.subarray(0, n);
  }
}

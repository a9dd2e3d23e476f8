// Microphone capture: resample the context's rate to 16 kHz and post 20 ms PCM16 frames.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / 16000;
    this.pos = 0;          // fractional read position in the input stream
    this.prev = 0;         // last input sample (for interpolation across blocks)
    this.acc = 0; this.accN = 0;
    this.frame = new Int16Array(320);
    this.fill = 0;
    this.enabled = true;
    this.port.onmessage = (e) => { if (e.data && "enabled" in e.data) this.enabled = e.data.enabled; };
  }
  process(inputs) {
    const input = inputs[0];
    if (!input || !input[0]) return true;
    const ch = input[0];
    // light low-pass by averaging the samples that fall into each output step, then decimate
    for (let i = 0; i < ch.length; i++) {
      this.acc += ch[i]; this.accN++;
      this.pos += 1;
      if (this.pos >= this.ratio) {
        this.pos -= this.ratio;
        const v = this.acc / this.accN; this.acc = 0; this.accN = 0;
        const s = Math.max(-1, Math.min(1, v));
        this.frame[this.fill++] = s < 0 ? s * 0x8000 : s * 0x7fff;
        if (this.fill === this.frame.length) {
          if (this.enabled) this.port.postMessage(this.frame.buffer.slice(0));
          this.fill = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor("capture-processor", CaptureProcessor);

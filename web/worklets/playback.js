// Reply playback: a queue of PCM chunks played at the context's rate (= the server's output rate).
// "flush" empties the queue at once and reports how much of each turn was actually played.
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];   // [{turn, data: Float32Array, offset}]
    this.played = {};  // turn -> samples played
    this.lastReport = 0;
    this.port.onmessage = (e) => {
      const m = e.data;
      if (m.type === "chunk") this.queue.push({ turn: m.turn, data: m.data, offset: 0 });
      else if (m.type === "flush") { this.queue = []; this.report(true); }
    };
  }
  report(force) {
    if (force || currentFrame - this.lastReport > sampleRate / 8) {
      this.lastReport = currentFrame;
      this.port.postMessage({ type: "played", played: this.played, queued: this.queue.length, flushed: !!force });
    }
  }
  process(_, outputs) {
    const out = outputs[0][0];
    let i = 0;
    while (i < out.length && this.queue.length) {
      const head = this.queue[0];
      const n = Math.min(out.length - i, head.data.length - head.offset);
      out.set(head.data.subarray(head.offset, head.offset + n), i);
      head.offset += n; i += n;
      this.played[head.turn] = (this.played[head.turn] || 0) + n;
      if (head.offset >= head.data.length) this.queue.shift();
    }
    for (; i < out.length; i++) out[i] = 0;
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.report(false);
    return true;
  }
}
registerProcessor("playback-processor", PlaybackProcessor);

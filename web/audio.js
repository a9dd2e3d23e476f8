// Audio in and out through AudioWorklets.
export class Microphone {
  constructor(onFrame) { this.onFrame = onFrame; this.ctx = null; this.node = null; this.stream = null; }

  async start(deviceId) {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: {
        echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1,
        ...(deviceId ? { deviceId: { exact: deviceId } } : {}),
      },
    });
    this.ctx = new AudioContext();
    await this.ctx.audioWorklet.addModule("/static/worklets/capture.js");
    const source = this.ctx.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.ctx, "capture-processor");
    this.node.port.onmessage = (e) => this.onFrame(e.data);
    source.connect(this.node);
    // keep the graph pulled without making the mic audible
    const mute = this.ctx.createGain(); mute.gain.value = 0;
    this.node.connect(mute).connect(this.ctx.destination);
  }

  setEnabled(enabled) { this.node?.port.postMessage({ enabled }); }

  async stop() {
    this.stream?.getTracks().forEach((t) => t.stop());
    await this.ctx?.close();
    this.ctx = this.node = this.stream = null;
  }

  get running() { return !!this.ctx; }
}

export class Player {
  constructor(onPlayed) { this.onPlayed = onPlayed; this.ctx = null; this.node = null; this.rate = 22050; this.played = {}; }

  async ensure(rate) {
    if (this.ctx && this.rate === rate) { if (this.ctx.state === "suspended") await this.ctx.resume(); return; }
    await this.ctx?.close();
    this.rate = rate;
    this.ctx = new AudioContext({ sampleRate: rate });
    await this.ctx.audioWorklet.addModule("/static/worklets/playback.js");
    this.node = new AudioWorkletNode(this.ctx, "playback-processor", { outputChannelCount: [1] });
    this.node.port.onmessage = (e) => {
      if (e.data.type === "played") { this.played = e.data.played; this.onPlayed(e.data); }
    };
    this.node.connect(this.ctx.destination);
    if (this.ctx.state === "suspended") await this.ctx.resume();
  }

  push(turn, pcm16) {
    if (!this.node) return;
    const ints = new Int16Array(pcm16);
    const data = new Float32Array(ints.length);
    for (let i = 0; i < ints.length; i++) data[i] = ints[i] / 32768;
    this.node.port.postMessage({ type: "chunk", turn, data }, [data.buffer]);
  }

  flush() { this.node?.port.postMessage({ type: "flush" }); }

  playedMs(turn) { return ((this.played[turn] || 0) / this.rate) * 1000; }
}

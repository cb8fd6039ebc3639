// The streams benchmark's client: holds STREAMS streams open for SECONDS
// (each one opened again when it ends), started evenly over RAMP seconds,
// and stamps every chunk's delay from the backend's send time in its text
// ("t=..."), and each stream's time to its first such chunk.  Prints one
// JSON line: chunks, delays and first-chunk times (percentiles, in ms).
// Usage: node client.js URL STREAMS SECONDS RAMP API [KEY]
//   API: chat (OpenAI chat completions), messages (Anthropic), responses, stored (responses, kept by the gateway)
//   PROMPT_BYTES (environment): the prompt's size (a real agent sends tens of KB)
"use strict";
const http = require("http");
const { performance } = require("perf_hooks");
const [url, streamsText, secondsText, rampText, api, key] = process.argv.slice(2);
const streams = Number(streamsText), seconds = Number(secondsText), ramp = Number(rampText);
const target = new URL(url);
const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity });
const now = () => performance.timeOrigin + performance.now();
const bodies = {
  chat: { model: "bench", stream: true, messages: [{ role: "user", content: "Tell me a long story" }], max_tokens: 4096 },
  messages: { model: "bench", stream: true, max_tokens: 4096, messages: [{ role: "user", content: "Tell me a long story" }] },
  responses: { model: "bench", stream: true, store: false, input: "Tell me a long story", max_output_tokens: 4096 },
  stored: { model: "bench", stream: true, store: true, input: "Tell me a long story", max_output_tokens: 4096 },
};
const promptBytes = Number(process.env.PROMPT_BYTES || 0);
if (promptBytes > 0) {
  const prompt = "Tell me a long story. " + "Context ".repeat(Math.max(0, Math.ceil((promptBytes - 22) / 8)));
  for (const body of Object.values(bodies)) {
    if (body.messages) body.messages[0].content = prompt; else body.input = prompt;
  }
}
const payload = JSON.stringify(bodies[api]);
const headers = { "content-type": "application/json", "content-length": Buffer.byteLength(payload) };
if (key) { headers.authorization = "Bearer " + key; headers["x-api-key"] = key; }
if (api === "messages") headers["anthropic-version"] = "2023-06-01";
const delays = [], firsts = [];
let chunks = 0, failures = 0, completed = 0;
const deadline = now() + seconds * 1000;
const STAMP = /t=(\d+\.\d+)/g;

function one(resolve) {
  if (now() >= deadline) { resolve(); return; }
  const started = now();
  let first = true, rest = "";
  const request = http.request({ host: target.hostname, port: target.port, path: target.pathname, method: "POST", headers, agent }, (response) => {
    if (response.statusCode !== 200) { failures += 1; response.resume(); response.on("end", () => setTimeout(() => one(resolve), 100)); return; }
    response.setEncoding("utf8");
    response.on("data", (text) => {
      const received = now();
      text = rest + text;
      const cut = text.lastIndexOf("\n");
      rest = text.slice(cut + 1);
      for (const line of text.slice(0, cut + 1).split("\n")) {
        // Only the events that carry new text (a Responses stream repeats the whole text at its end).
        if (!line.startsWith("data:") || !line.includes("delta")) continue;
        for (const match of line.matchAll(STAMP)) {
          chunks += 1;
          delays.push(received - Number(match[1]));
          if (first) { first = false; firsts.push(received - started); }
        }
      }
    });
    response.on("end", () => { completed += 1; one(resolve); });
  });
  request.on("error", () => { failures += 1; setTimeout(() => one(resolve), 100); });
  request.end(payload);
}

function percentile(values, q) {
  if (!values.length) return null;
  const sorted = Float64Array.from(values).sort();
  return Math.round(sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] * 1000) / 1000;
}

const running = [];
for (let n = 0; n < streams; n++) {
  running.push(new Promise((resolve) => setTimeout(() => one(resolve), (ramp * 1000 * n) / streams)));
}
Promise.all(running).then(() => {
  console.log(JSON.stringify({
    chunks, completed, failures,
    delay_p50_ms: percentile(delays, 0.5), delay_p99_ms: percentile(delays, 0.99),
    first_p50_ms: percentile(firsts, 0.5), first_p99_ms: percentile(firsts, 0.99),
  }));
  process.exit(0);
});

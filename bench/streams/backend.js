// The streams benchmark's backend: an OpenAI-compatible chat completions
// stream of N chunks, one every INTERVAL ms, each holding its send time
// ("t=<ms since the epoch, to the microsecond>") in its text, so that a
// client measures each chunk's delay whatever API it was translated to.
// Usage: node backend.js PORT CHUNKS INTERVAL_MS  (listens on 127.0.0.1)
"use strict";
const http = require("http");
const { performance } = require("perf_hooks");
const [port, chunks, interval] = process.argv.slice(2).map(Number);
const now = () => (performance.timeOrigin + performance.now()).toFixed(3);
let open = 0, sent = 0;
const server = http.createServer((request, response) => {
  let body = "";
  request.on("data", (part) => { body += part; });
  request.on("end", () => {
    if (request.method === "GET") {
      response.writeHead(200, { "content-type": "application/json" });
      response.end(JSON.stringify({ open, sent }));
      return;
    }
    let model = "bench";
    try { model = JSON.parse(body).model || model; } catch (error) { /* any body */ }
    response.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
    open += 1;
    let count = 0;
    const chunk = (delta, finish, usage) => "data: " + JSON.stringify({
      id: "chatcmpl-bench", object: "chat.completion.chunk", created: 0, model,
      choices: usage ? [] : [{ index: 0, delta, finish_reason: finish }], ...(usage ? { usage } : {}),
    }) + "\n\n";
    response.write(chunk({ role: "assistant", content: "" }, null));
    const timer = setInterval(() => {
      if (count < chunks) {
        count += 1;
        sent += 1;
        response.write(chunk({ content: "t=" + now() + " " }, null));
        return;
      }
      clearInterval(timer);
      open -= 1;
      response.write(chunk({}, "stop"));
      response.write(chunk(null, null, { prompt_tokens: 10, completion_tokens: chunks * 8, total_tokens: 10 + chunks * 8 }));
      response.end("data: [DONE]\n\n");
    }, interval);
    response.on("close", () => { if (count < chunks) { clearInterval(timer); open -= 1; } });
  });
});
server.keepAliveTimeout = 60000;
server.listen(port, "127.0.0.1", () => console.log("listening " + server.address().port));

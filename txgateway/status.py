"""
What the operator's status page shows, kept cheaply: the last 60 seconds
of each endpoint's attempts in per-second buckets on the injected clock
(fixed arrays, reused: nothing grows per request), the last circuit
transitions and fallbacks, and the self-contained page itself.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from typing import Any

from twisted.internet.interfaces import IReactorTime

__all__ = ["EventRing", "RecentWindow", "STATUS_PAGE", "percentile_of"]

#: The latency buckets, the same as /metrics' histograms (so both agree).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WINDOW_SECONDS = 60


class _Second:
    """One second of one endpoint: attempts, failed ones, and their latency histogram."""

    __slots__ = ("second", "count", "errors", "buckets")

    def __init__(self) -> None:
        self.second = -1
        self.count = 0
        self.errors = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    def reset(self, second: int) -> None:
        self.second = second
        self.count = 0
        self.errors = 0
        buckets = self.buckets
        for index in range(len(buckets)):
            buckets[index] = 0


def percentile_of(buckets: list[int], total: int, fraction: float) -> float | None:
    """
    The C{fraction} percentile of a latency histogram, as Prometheus'
    C{histogram_quantile} estimates it (linear within the bucket).
    """
    if total == 0:
        return None
    rank = fraction * total
    seen = 0
    for index, count in enumerate(buckets):
        if seen + count >= rank and count:
            lower = LATENCY_BUCKETS[index - 1] if index > 0 else 0.0
            if index >= len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]  # beyond the last bound: the bound
            upper = LATENCY_BUCKETS[index]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]


class RecentWindow:
    """
    The last L{WINDOW_SECONDS} seconds of each (service, endpoint)'s
    attempts: requests per second, error rate, p50/p99 of the time to the
    backend's headers.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._rings: dict[tuple[str, str], list[_Second]] = {}

    def _slot(self, key: tuple[str, str]) -> _Second:
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = [_Second() for _ in range(WINDOW_SECONDS)]
        second = int(self._clock.seconds())
        slot = ring[second % WINDOW_SECONDS]
        if slot.second != second:
            slot.reset(second)
        return slot

    def observe(self, service: str, endpoint: str, seconds: float | None, failed: bool) -> None:
        """One attempt, and whether it failed (its time to headers comes by L{time})."""
        slot = self._slot((service, endpoint))
        slot.count += 1
        if failed:
            slot.errors += 1

    def time(self, service: str, endpoint: str, seconds: float) -> None:
        """One attempt's time until the backend's headers."""
        self._slot((service, endpoint)).buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def summary(self, service: str, endpoint: str) -> dict[str, Any]:
        """Requests per second, error rate and p50/p99 (ms) over the window."""
        ring = self._rings.get((service, endpoint))
        now = int(self._clock.seconds())
        count = errors = 0
        buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        for slot in ring or ():
            if now - WINDOW_SECONDS < slot.second <= now:
                count += slot.count
                errors += slot.errors
                for index, value in enumerate(slot.buckets):
                    buckets[index] += value
        timed = sum(buckets)
        p50 = percentile_of(buckets, timed, 0.5)
        p99 = percentile_of(buckets, timed, 0.99)
        return {
            "requests_per_s": round(count / WINDOW_SECONDS, 3),
            "error_rate": round(errors / count, 4) if count else 0.0,
            "p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "p99_ms": None if p99 is None else round(p99 * 1000, 1),
        }


class EventRing:
    """The last C{size} circuit transitions and fallbacks, newest first."""

    def __init__(self, clock: IReactorTime, size: int = 50) -> None:
        self._clock = clock
        self._events: deque[dict] = deque(maxlen=size)

    def add(self, kind: str, service: str, from_: str, to: str, reason: str, request_id: str | None) -> None:
        """Remember one event (C{kind}: C{circuit} or C{fallback})."""
        self._events.appendleft({
            "time": round(self._clock.seconds(), 3), "kind": kind, "service": service,
            "from": from_, "to": to, "reason": reason, "request_id": request_id,
        })

    def recent(self) -> list[dict]:
        """The events, newest first."""
        return list(self._events)


STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>txgateway status</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#f6f7f9}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.4em 0 .4em}
.meta{color:#5b6372} table{border-collapse:collapse;width:100%;background:#fff;margin-bottom:.6em}
th,td{padding:.35em .6em;border-bottom:1px solid #e3e6eb;text-align:left;white-space:nowrap}
th{background:#eef0f4;font-weight:600} td.reason{white-space:normal;word-break:break-word} td.num{text-align:right;font-variant-numeric:tabular-nums}
.circuit{display:inline-block;padding:.1em .6em;border-radius:1em;font-weight:700;color:#fff}
.closed{background:#1f8a4c} .open{background:#c62828} .half_open{background:#d98200}
.healthy{color:#1f8a4c;font-weight:700} .unhealthy{color:#c62828;font-weight:700}
#error{color:#c62828}
</style></head>
<body data-refreshes="0">
<h1>txgateway <span id="overall"></span></h1>
<div class="meta" id="meta">loading&hellip;</div><div id="error"></div>
<div id="services"></div><div id="models"></div>
<h2>Stores</h2><div id="stores"></div>
<h2>Last circuit transitions and fallbacks</h2><div id="events"></div>
<script>
"use strict";
function esc(v){return String(v===null||v===undefined?"\\u2014":v).replace(/[&<>"']/g,function(c){return "&#"+c.charCodeAt(0)+";";});}
function badge(state){return '<span class="circuit '+esc(state)+'">'+esc(state)+'</span>';}
function table(head,rows){return "<table><tr>"+head.map(function(h){return "<th>"+h+"</th>";}).join("")+"</tr>"+rows.join("")+"</table>";}
function render(s){
  var look={ok:"closed",degraded:"open",shutting_down:"half_open"}[s.status]||"half_open";
  document.getElementById("overall").innerHTML='<span class="circuit '+look+'">'+esc(s.status)+"</span>";
  document.getElementById("meta").textContent="up "+s.uptime_s+" s \\u00b7 config "+s.config+" \\u00b7 last reload: "+(s.last_reload?(new Date(s.last_reload.time*1000).toISOString()+" "+s.last_reload.outcome):"none")+" \\u00b7 updated "+new Date().toISOString();
  var html="";
  Object.keys(s.services).forEach(function(name){
    var svc=s.services[name];
    html+='<h2 class="service" data-service="'+esc(name)+'">'+esc(name)+" "+badge(svc.circuit)+"</h2>";
    html+=table(["endpoint","circuit","failures","trial in","in flight","req/s","errors","p50 ms","p99 ms"],svc.endpoints.map(function(e){
      return '<tr data-endpoint="'+esc(e.url)+'"><td>'+esc(e.url)+"</td><td>"+badge(e.circuit)+'</td><td class="num">'+esc(e.consecutive_failures)+
        '</td><td class="num">'+esc(e.trial_in_s===null?null:e.trial_in_s.toFixed(1)+" s")+'</td><td class="num">'+esc(e.in_flight)+
        '</td><td class="num">'+esc(e.requests_per_s)+'</td><td class="num">'+esc((e.error_rate*100).toFixed(1)+" %")+
        '</td><td class="num">'+esc(e.p50_ms)+'</td><td class="num">'+esc(e.p99_ms)+"</td></tr>";}));
  });
  document.getElementById("services").innerHTML=html;
  var models=s.models||{}; var mh="";
  Object.keys(models).forEach(function(name){
    mh+=table(["model "+esc(name)+": service","model sent","circuit"],models[name].targets.map(function(t){
      return "<tr><td>"+esc(t.service)+"</td><td>"+esc(t.model)+"</td><td>"+badge(t.circuit)+"</td></tr>";}));
  });
  document.getElementById("models").innerHTML=mh?"<h2>Models</h2>"+mh:"";
  document.getElementById("stores").innerHTML=table(["store","backend","health"],s.stores.map(function(st){
    return "<tr><td>"+esc(st.name)+"</td><td>"+esc(st.backend)+'</td><td class="'+(st.healthy?"healthy":"unhealthy")+'">'+(st.healthy?"healthy":"unavailable")+"</td></tr>";}));
  document.getElementById("events").innerHTML=s.events.length?table(["time","kind","service","from","to","reason","request id"],s.events.map(function(ev){
    return "<tr><td>"+esc(new Date(ev.time*1000).toISOString())+"</td><td>"+esc(ev.kind)+"</td><td>"+esc(ev.service)+"</td><td>"+esc(ev.from)+
      "</td><td>"+esc(ev.to)+'</td><td class="reason">'+esc(ev.reason)+"</td><td>"+esc(ev.request_id)+"</td></tr>";})):"<p>none yet</p>";
}
function refresh(){
  fetch("status.json",{cache:"no-store"}).then(function(r){if(!r.ok)throw new Error("status "+r.status);return r.json();}).then(function(s){
    render(s); document.getElementById("error").textContent="";
    document.body.setAttribute("data-refreshes",String(Number(document.body.getAttribute("data-refreshes"))+1));
  }).catch(function(e){document.getElementById("error").textContent="cannot reach the gateway: "+e.message;});
}
refresh(); setInterval(refresh,2000);
</script></body></html>
"""

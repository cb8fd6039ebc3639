"""
The status page: one self-contained HTML document (inline CSS and script,
no external asset) that refreshes itself from C{/status.json}, with each
service's and each model's last 60 s as small charts drawn by its own
script (requests per second, error rate, p99; an open circuit as a red
band on its service's), and, when keys
are governed, from C{/spend.json}: each key's and team's budget as a bar,
the refusals of the last minute, tokens per second per model as a chart,
and the end users who spent the most in the last hour.
"""

__all__ = ["PAGE_HELPERS", "PAGE_STYLE", "STATUS_PAGE", "status_page_with"]

#: The look the operator's pages share (this one and the admin page).
PAGE_STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#f6f7f9}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.4em 0 .4em}
.meta{color:#5b6372} table{border-collapse:collapse;width:100%;background:#fff;margin-bottom:.6em}
th,td{padding:.35em .6em;border-bottom:1px solid #e3e6eb;text-align:left;white-space:nowrap}
th{background:#eef0f4;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}"""

#: The script helpers the operator's pages share: a value as HTML text, a table, dollars.
PAGE_HELPERS = """function esc(v){return String(v===null||v===undefined?"\\u2014":v).replace(/[&<>"']/g,function(c){return "&#"+c.charCodeAt(0)+";";});}
function table(head,rows){return "<table><tr>"+head.map(function(h){return "<th>"+h+"</th>";}).join("")+"</tr>"+rows.join("")+"</table>";}
function money(v){return v===null||v===undefined?null:"$"+Number(v).toFixed(4);}
"""

STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>txgateway status</title>
<style>
""" + PAGE_STYLE + """
td.reason{white-space:normal;word-break:break-word}
.circuit{display:inline-block;padding:.1em .6em;border-radius:1em;font-weight:700;color:#fff}
.closed{background:#1f8a4c} .open{background:#c62828} .half_open{background:#d98200}
.healthy{color:#1f8a4c;font-weight:700} .unhealthy{color:#c62828;font-weight:700}
#error{color:#c62828}
.bar{display:inline-block;width:12em;height:.8em;background:#e3e6eb;border-radius:.4em;overflow:hidden;vertical-align:middle}
.bar span{display:block;height:100%;background:#1f8a4c} .bar span.high{background:#d98200} .bar span.full{background:#c62828}
svg.chart{background:#fff;border:1px solid #e3e6eb;vertical-align:middle} svg.chart polyline{fill:none;stroke:#3557c9;stroke-width:1.5}
svg.chart circle{fill:#3557c9} svg.chart text.scale{font-size:9px;fill:#5b6372} svg.chart line.axis{stroke:#c9ced8;stroke-width:1}
html,body{overflow-x:hidden} table{table-layout:auto} td{overflow:hidden;text-overflow:ellipsis;max-width:28em}
svg.chart rect.band{fill:#c62828;opacity:.2} .charts{margin:.2em 0 .5em} figure.spark{display:inline-block;margin:0 1em .3em 0}
figure.spark figcaption{font-size:.85em;color:#5b6372}
</style></head>
<body data-refreshes="0">
<h1>txgateway <span id="overall"></span></h1>
<div class="meta" id="meta">loading&hellip;</div><div id="error"></div>
<div id="services"></div><div id="models"></div><div id="governance"></div>
<h2>Stores</h2><div id="stores"></div>
<h2>Last circuit transitions and fallbacks</h2><div id="events"></div>
<!--INITIAL--><script>
"use strict";
""" + PAGE_HELPERS + """function badge(state){return '<span class="circuit '+esc(state)+'">'+esc(state)+'</span>';}
function render(s){
  var look={ok:"closed",degraded:"open",shutting_down:"half_open"}[s.status]||"half_open";
  document.getElementById("overall").innerHTML='<span class="circuit '+look+'">'+esc(s.status)+"</span>";
  document.getElementById("meta").textContent="up "+s.uptime_s+" s \\u00b7 config "+s.config+" \\u00b7 last reload: "+(s.last_reload?(new Date(s.last_reload.time*1000).toISOString()+" "+s.last_reload.outcome):"none")+" \\u00b7 updated "+new Date().toISOString();
  var html="";
  Object.keys(s.services).forEach(function(name){
    var svc=s.services[name];
    html+='<h2 class="service" data-service="'+esc(name)+'">'+esc(name)+" "+badge(svc.circuit)+"</h2>";
    if(svc.last_60s){var w=svc.last_60s;
      html+='<div class="charts" data-charts="'+esc(name)+'">'+spark("requests","requests/s",w.requests_per_s,w.open,"")+
        spark("errors","error rate",w.error_rate.map(function(v){return Math.round(v*1000)/10;}),w.open," %")+spark("p99","p99 to headers",w.p99_ms,w.open," ms")+"</div>";}
    html+=table(["endpoint","circuit","failures","trial in","in flight","req/s","errors","p50 ms","p99 ms"],svc.endpoints.map(function(e){
      return '<tr data-endpoint="'+esc(e.url)+'"><td>'+esc(e.url)+"</td><td>"+badge(e.circuit)+'</td><td class="num">'+esc(e.consecutive_failures)+
        '</td><td class="num">'+esc(e.trial_in_s===null?null:e.trial_in_s.toFixed(1)+" s")+'</td><td class="num">'+esc(e.in_flight)+
        '</td><td class="num">'+esc(e.requests_per_s)+'</td><td class="num">'+esc((e.error_rate*100).toFixed(1)+" %")+
        '</td><td class="num">'+esc(e.p50_ms)+'</td><td class="num">'+esc(e.p99_ms)+"</td></tr>";}));
  });
  document.getElementById("services").innerHTML=html;
  var models=s.models||{}; var mh="";
  Object.keys(models).forEach(function(name){
    var w=models[name].last_60s;
    if(w)mh+='<div class="charts" data-model-charts="'+esc(name)+'">'+spark("requests","model "+name+": requests/s",w.requests_per_s,w.open,"")+
      spark("errors","5xx rate",w.error_rate.map(function(v){return Math.round(v*1000)/10;}),w.open," %")+spark("p99","p99 to the answer",w.p99_ms,w.open," ms")+"</div>";
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
function spark(kind,label,values,open,unit){
  var w=180,h=40,top=0,step=w/(values.length-1||1),points=[],bands="",dots="";
  values.forEach(function(v){if(v!==null&&v>top)top=v;}); var peak=top; if(top<=0)top=1;
  values.forEach(function(v,i){
    if(open[i])bands+='<rect class="band" x="'+(i*step-step/2).toFixed(1)+'" y="0" width="'+step.toFixed(1)+'" height="'+h+'"/>';
    if(v===null)return;
    var x=(i*step).toFixed(1),y=(h-2-(v/top)*(h-12)).toFixed(1); points.push(x+","+y);
    // A point with no neighbour draws no line: a dot shows it.
    if((i===0||values[i-1]===null)&&(i===values.length-1||values[i+1]===null))dots+='<circle cx="'+x+'" cy="'+y+'" r="2.5"/>';});
  var last=values[values.length-1];
  var scale='<text class="scale" x="3" y="9">'+(points.length?"peak "+esc(Math.round(peak*1000)/1000+unit):"no data yet")+'</text><line class="axis" x1="0" y1="'+(h-2)+'" x2="'+w+'" y2="'+(h-2)+'"/>';
  return '<figure class="spark"><svg class="chart" data-chart="'+kind+'" data-points="'+points.length+'" width="'+w+'" height="'+h+'" viewBox="0 0 '+w+" "+h+'">'+
    bands+scale+'<polyline points="'+points.join(" ")+'"/>'+dots+'</svg><figcaption>'+esc(label)+", last 60 s: now "+esc(last===null?null:last+unit)+"</figcaption></figure>";
}
function bar(used,budget,short,next){
  if(budget===null||budget===undefined)return "no budget";
  var share=budget>0?Math.min(1,used/budget):1; var look=(share>=1||short)?"full":(share>=0.8?"high":"");
  var said=(share*100).toFixed(1)+" %"+(short?" \u00b7 short: its next request may cost "+money(next):"");
  return '<span class="bar" title="'+esc(said)+'"><span class="'+look+'" style="width:'+(share*100).toFixed(1)+'%"></span></span> '+esc(said);
}
function chart(series){
  var top=Math.max.apply(null,series.concat([1])); var points=series.map(function(v,i){return (i*2)+","+(30-Math.round(v/top*28));}).join(" ");
  return '<svg class="chart" width="120" height="32" viewBox="0 0 120 32"><polyline points="'+points+'"/></svg>';
}
function renderSpend(g,sp){
  var html='<h2>Keys and budgets</h2><p class="meta">refusals in the last minute: <b id="refusals">'+esc(g.refusals_last_minute)+"</b></p>";
  function rows(kind,scopes){return Object.keys(scopes).map(function(name){var k=scopes[name];var used=k.spent_usd+k.reserved_usd;
    return '<tr data-'+kind+'="'+esc(name)+'"><td>'+esc(kind)+" "+esc(name)+"</td><td>"+bar(used,k.budget_usd,k.short,k.next_request_usd)+'</td><td class="num">'+esc(money(k.spent_usd))+
      '</td><td class="num">'+esc(money(k.budget_usd))+"</td><td>"+esc(k.budget_period)+'</td><td class="num">'+esc(k.tokens_per_minute?k.tokens_per_minute.remaining+" / "+k.tokens_per_minute.limit:null)+
      '</td><td class="num">'+esc(k.in_flight)+"</td></tr>";});}
  html+=table(["caller","budget used","spent","budget","period","tokens/min left","in flight"],rows("key",sp.keys).concat(rows("team",sp.teams)));
  var models=Object.keys(g.tokens_per_second);
  html+="<h2>Tokens per model, last 60 s</h2>"+(models.length?table(["model","tokens/s","last 60 s"],models.map(function(m){var s=g.tokens_per_second[m];
    return '<tr data-model="'+esc(m)+'"><td>'+esc(m)+'</td><td class="num">'+esc((s.reduce(function(a,b){return a+b;},0)/60).toFixed(1))+"</td><td>"+chart(s)+"</td></tr>";})):"<p>none yet</p>");
  var top=g.top_end_users_last_hour||[];
  html+="<h2>Top spenders, last hour</h2>"+(top.length?table(["end user","key","spent","tokens","requests"],top.map(function(u){
    return '<tr data-end-user="'+esc(u.end_user)+'"><td>'+esc(u.end_user)+"</td><td>"+esc(u.key)+'</td><td class="num">'+esc(money(u.cost_usd))+
      '</td><td class="num">'+esc(u.tokens)+'</td><td class="num">'+esc(u.requests)+"</td></tr>";})):"<p>none yet: no call named its end user</p>");
  document.getElementById("governance").innerHTML=html;
}
function refreshSpend(g){
  fetch("spend.json",{cache:"no-store"}).then(function(r){if(!r.ok)throw new Error("spend "+r.status);return r.json();}).then(function(sp){renderSpend(g,sp);})
    .catch(function(e){document.getElementById("governance").innerHTML="<p>budgets: "+esc(e.message)+"</p>";});
}
function refresh(){
  fetch("status.json",{cache:"no-store"}).then(function(r){if(!r.ok)throw new Error("status "+r.status);return r.json();}).then(function(s){
    render(s); document.getElementById("error").textContent="";
    if(s.governance)refreshSpend(s.governance);
    document.body.setAttribute("data-refreshes",String(Number(document.body.getAttribute("data-refreshes"))+1));
  }).catch(function(e){document.getElementById("error").textContent="cannot reach the gateway: "+e.message;});
}
// The page came with its first data: painted at once, then refreshed every 2 s.
var first=document.getElementById("initial");
if(first){var given=JSON.parse(first.textContent);render(given.status);if(given.status.governance&&given.spend)renderSpend(given.status.governance,given.spend);}
if(!first)refresh(); setInterval(refresh,2000);
</script></body></html>
"""


def status_page_with(initial: str) -> str:
    """The page holding its first data (C{initial}: the JSON of C{{"status", "spend"}}), painted before any fetch."""
    safe = initial.replace("</", "<\\/")  # no "</script>" inside the script element
    return STATUS_PAGE.replace("<!--INITIAL-->", '<script id="initial" type="application/json">' + safe + "</script>", 1)

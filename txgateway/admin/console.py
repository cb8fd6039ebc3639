"""
The admin page: one self-contained HTML document (inline CSS and script,
no external asset, no data of its own).  It asks for an admin key (or
takes one from the URL's fragment, C{#key=...}, which never reaches a
server), keeps it in the tab's session storage, and calls the admin API
with it: keys and teams with their spend and limits, a new key (its
secret shown once), a budget or model list changed, a key disabled or
rotated, and the audit trail.
"""

from txgateway.admin.page import PAGE_HELPERS, PAGE_STYLE

__all__ = ["ADMIN_PAGE"]

ADMIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>txgateway admin</title>
<style>
""" + PAGE_STYLE + """
td.wrap{white-space:normal;word-break:break-word;font-size:.9em}
input,select{font:inherit;padding:.2em .4em} button{font:inherit;padding:.2em .7em;cursor:pointer}
.ro{color:#5b6372} .off{color:#c62828;font-weight:700} .on{color:#1f8a4c;font-weight:700}
#secret{background:#fff7d6;border:1px solid #d98200;padding:.6em;margin:.6em 0;display:none;word-break:break-all}
#error{color:#c62828} form.inline{display:inline}
</style></head>
<body data-loaded="0">
<h1>txgateway admin</h1>
<div id="login"><label>admin key <input id="key" type="password" size="40" autocomplete="off"></label>
<button id="use">use</button> <span class="meta">kept in this tab only</span></div>
<div id="error"></div><div id="secret"></div>
<div id="main" style="display:none">
<h2>Keys</h2><div id="keys"></div>
<h2>New key</h2>
<form id="newkey"><input name="name" placeholder="name" required> <input name="team" placeholder="team">
<input name="models" placeholder="models (comma-separated)"> <input name="budget_usd" placeholder="budget USD" size="9">
<select name="budget_period"><option>month</option><option>week</option><option>day</option><option>total</option></select>
<input name="tokens_per_minute" placeholder="tokens/min" size="9"> <button>create</button></form>
<h2>Teams</h2><div id="teams"></div>
<form id="newteam"><input name="name" placeholder="name" required> <input name="budget_usd" placeholder="budget USD" size="9">
<select name="budget_period"><option>month</option><option>week</option><option>day</option><option>total</option></select>
<input name="tokens_per_minute" placeholder="tokens/min" size="9"> <button>create team</button></form>
<h2>Audit trail</h2><div id="audit"></div>
</div>
<script>
"use strict";
""" + PAGE_HELPERS + """var token=sessionStorage.getItem("txgateway-admin")||"";
var fragment=/(?:^|&)key=([^&]+)/.exec(location.hash.slice(1));
if(fragment){token=decodeURIComponent(fragment[1]);sessionStorage.setItem("txgateway-admin",token);history.replaceState(null,"",location.pathname);}
var base=location.pathname.replace(/\\/?$/,"/");
function api(method,path,body){
  var init={method:method,headers:{"Authorization":"Bearer "+token},cache:"no-store"};
  path=base+path;
  if(body!==undefined){init.headers["Content-Type"]="application/json";init.body=JSON.stringify(body);}
  return fetch(path,init).then(function(r){return r.json().then(function(j){if(!r.ok)throw new Error(j.error?j.error.type+": "+j.error.message:r.status);return j;});});
}
var QUIET={created_at:1,updated_at:1,source:1,read_only:1,name:1};
function shown_value(v){return v===null||v===undefined?"none":(Array.isArray(v)?(v.length?v.join(", "):"all"):String(v));}
function changes(before,after){var out=[];var keys=Object.keys(after||before||{});
  keys.forEach(function(k){if(QUIET[k])return;var b=before?before[k]:undefined,a=after?after[k]:undefined;
    if(JSON.stringify(b)===JSON.stringify(a))return;
    if(!before){if(a!==null&&!(Array.isArray(a)&&!a.length)&&a!==false)out.push(k+" "+shown_value(a));}
    else if(!after){}else out.push(k+" "+shown_value(b)+" \u2192 "+shown_value(a));});
  if(!after)return "deleted"; if(!before)return out.length?"made: "+out.join("; "):"made"; return out.join("; ")||"(a new secret)";}
function fail(e){document.getElementById("error").textContent=e.message;}
function number(v){return v===""?null:Number(v);}
function fields(form,names){var out={};names.forEach(function(n){var v=form.elements[n].value.trim();
  if(n==="models")out[n]=v?v.split(",").map(function(s){return s.trim();}):[];
  else if(n==="team")out[n]=v||null; else if(n==="budget_period")out[n]=v; else out[n]=number(v);});return out;}
function load(){
  Promise.all([api("GET","keys"),api("GET","teams"),api("GET","spend"),api("GET","audit?limit=50")]).then(function(all){
    var keys=all[0].keys,teams=all[1].teams,spend=all[2],audit=all[3].entries;
    document.getElementById("login").style.display="none";document.getElementById("main").style.display="block";
    document.getElementById("keys").innerHTML=table(["key","source","state","team","models","spent","budget","period","tokens/min",""],keys.map(function(k){
      var s=(spend.keys||{})[k.name]||{};
      var tools=k.read_only?'<span class="ro">change it in gateway.ini</span>':
        '<form class="inline" data-budget="'+esc(k.name)+'"><input name="budget_usd" size="7" placeholder="budget" value="'+esc(k.budget_usd===null?"":k.budget_usd)+'"> '+
        '<input name="models" size="14" placeholder="models" value="'+esc(k.models.join(", "))+'"> <button>save</button></form> '+
        '<button data-toggle="'+esc(k.name)+'" data-disabled="'+(k.disabled?"1":"0")+'">'+(k.disabled?"enable":"disable")+'</button> '+
        '<button data-rotate="'+esc(k.name)+'">rotate</button>';
      return '<tr data-key="'+esc(k.name)+'"><td>'+esc(k.name)+"</td><td>"+esc(k.source)+'</td><td class="'+(k.disabled?"off":"on")+'">'+(k.disabled?"disabled":"active")+
        "</td><td>"+esc(k.team)+"</td><td>"+esc(k.models.length?k.models.join(", "):"all")+'</td><td class="num">'+esc(money(s.spent_usd))+
        '</td><td class="num">'+esc(money(k.budget_usd))+"</td><td>"+esc(k.budget_period)+'</td><td class="num">'+esc(k.tokens_per_minute)+"</td><td>"+tools+"</td></tr>";}));
    document.getElementById("teams").innerHTML=table(["team","source","spent","budget","period","tokens/min"],teams.map(function(t){
      var s=(spend.teams||{})[t.name]||{};
      return '<tr data-team="'+esc(t.name)+'"><td>'+esc(t.name)+"</td><td>"+esc(t.source)+'</td><td class="num">'+esc(money(s.spent_usd))+'</td><td class="num">'+
        esc(money(t.budget_usd))+"</td><td>"+esc(t.budget_period)+'</td><td class="num">'+esc(t.tokens_per_minute)+"</td></tr>";}));
    document.getElementById("audit").innerHTML=audit.length?table(["time","admin","action","kind","name","what changed"],audit.map(function(a){
      return '<tr data-audit="'+esc(a.action)+'"><td>'+esc(new Date(a.time*1000).toISOString())+"</td><td>"+esc(a.actor)+"</td><td>"+esc(a.action)+"</td><td>"+esc(a.kind)+
        "</td><td>"+esc(a.name)+'</td><td class="wrap">'+esc(changes(a.before,a.after))+"</td></tr>";})):"<p>no change yet</p>";
    document.getElementById("error").textContent="";
    document.body.setAttribute("data-loaded",String(Number(document.body.getAttribute("data-loaded"))+1));
  }).catch(fail);
}
function shown(what,answer){var box=document.getElementById("secret");box.style.display="block";
  box.innerHTML="<b>"+esc(what)+"</b>: <code id=\\"shown-secret\\">"+esc(answer.secret)+"</code> \\u2014 shown once; copy it now"+
    (answer.previous_secret_valid_until?" (the old one works until "+esc(new Date(answer.previous_secret_valid_until*1000).toISOString())+")":"");}
document.getElementById("use").onclick=function(){token=document.getElementById("key").value.trim();sessionStorage.setItem("txgateway-admin",token);load();};
document.getElementById("newkey").onsubmit=function(e){e.preventDefault();var f=e.target;var body=fields(f,["team","models","budget_usd","budget_period","tokens_per_minute"]);
  body.name=f.elements.name.value.trim();api("POST","keys",body).then(function(a){shown("secret of "+a.name,a);f.reset();load();}).catch(fail);};
document.getElementById("newteam").onsubmit=function(e){e.preventDefault();var f=e.target;var body=fields(f,["budget_usd","budget_period","tokens_per_minute"]);
  body.name=f.elements.name.value.trim();api("POST","teams",body).then(function(){f.reset();load();}).catch(fail);};
document.getElementById("keys").addEventListener("submit",function(e){e.preventDefault();var f=e.target;var name=f.getAttribute("data-budget");
  api("PATCH","keys/"+encodeURIComponent(name),fields(f,["budget_usd","models"])).then(load).catch(fail);});
document.getElementById("keys").addEventListener("click",function(e){var b=e.target;
  if(b.hasAttribute("data-toggle")){api("PATCH","keys/"+encodeURIComponent(b.getAttribute("data-toggle")),{disabled:b.getAttribute("data-disabled")!=="1"}).then(load).catch(fail);}
  if(b.hasAttribute("data-rotate")){api("POST","keys/"+encodeURIComponent(b.getAttribute("data-rotate"))+"/rotate",{grace_seconds:3600}).then(function(a){shown("new secret of "+a.name,a);load();}).catch(fail);}});
if(token)load();
</script></body></html>
"""

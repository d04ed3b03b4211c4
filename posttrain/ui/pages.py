"""The UI's pages: a shell of plain HTML per page (navigation, the page's empty frame) that ui.js fills from the JSON
endpoints. Nothing is fetched from outside the machine: the script, the styles and every figure come from here.
"""

from __future__ import annotations

from html import escape
from importlib import resources

PAGES = {"runs": ("/", "Runs"), "compare": ("/compare", "Compare"), "chat": ("/chat", "Chat"),
         "launch": ("/launch", "Start a run")}

_BODIES = {
    "runs": """<h1>Runs</h1><p class="sub" id="runs-dir"></p>
<table id="runs-table"><thead><tr><th>run</th><th>method</th><th>status</th><th>last step</th><th>key metric</th>
<th>updated</th></tr></thead><tbody></tbody></table><p class="note" id="runs-note"></p>""",
    "run": """<h1 id="run-title"></h1><p class="sub"><span id="run-status" class="status"></span>
<span id="run-step"></span></p>
<div id="run-error" class="error" hidden></div>
<h2>curves</h2><div id="curves"><p class="note">loading&hellip;</p></div>
<h2>held-out evaluation, before and after</h2><div id="evals"></div>
<h2>config.yaml</h2><pre id="config"></pre>""",
    "compare": """<h1>Compare runs</h1><p class="sub">Pick 2 to 4 runs: their curves in one figure, their held-out
evals side by side, the config keys in which they differ.</p>
<form id="compare-form"><div id="compare-picks" class="picks"></div>
<button type="submit">Compare</button></form><div id="compare-error" class="error" hidden></div>
<div id="compare-out"></div>""",
    "chat": """<h1>Chat</h1>
<form id="chat-form" class="row-form">
<label>model <select id="chat-model"></select></label>
<label>temperature <input id="chat-temperature" type="number" min="0" max="2" step="0.1" value="0"></label>
<label>max tokens <input id="chat-max-tokens" type="number" min="1" max="4096" value="128"></label>
<button type="button" id="chat-reset">New chat</button></form>
<p class="note">temperature 0 is greedy. The base loads on the first message; each run's adapter on its first
use.</p>
<div id="chat-log"></div>
<form id="chat-send"><textarea id="chat-input" rows="3" placeholder="Message"></textarea>
<button type="submit" id="chat-submit">Send</button></form><div id="chat-error" class="error" hidden></div>""",
    "launch": """<h1>Start a run</h1>
<form id="launch-form" class="stack">
<label>run name <input id="launch-name" required pattern="[A-Za-z0-9][A-Za-z0-9._\\-]*"
placeholder="my-run"></label>
<label>example config <select id="launch-example"><option value="">(none)</option></select></label>
<label>or a config file in the runs directory <select id="launch-config"><option value="">(none)</option>
</select></label>
<label>overrides, one key=value a line (as on the command line)
<textarea id="launch-overrides" rows="5" placeholder="train.max_steps=20&#10;train.lr=5e-4"></textarea></label>
<p class="note">Keys that name Python code (reward functions, environments, the vLLM interpreter) are refused here:
start those runs from the command line. The run is written to the runs directory under its name.</p>
<button type="submit" id="launch-submit">Start</button></form>
<div id="launch-error" class="error" hidden></div>
<h2>runs started here</h2><div id="launches"><p class="note">none yet</p></div>""",
    "login": """<h1>posttrain ui</h1><p>This UI needs its API key (<code>--api-key</code> or
<code>$POSTTRAIN_API_KEY</code>).</p><form id="login-form" class="row-form">
<label>API key <input id="login-key" type="password" autocomplete="current-password"></label>
<button type="submit">Enter</button></form><div id="login-error" class="error" hidden></div>""",
}


def static_file(name: str) -> bytes:
    return resources.files("posttrain.ui").joinpath("static", name).read_bytes()


def page_html(page: str, title: str = "") -> str:
    """The shell of ``page`` (one of _BODIES); ui.js reads ``data-page`` and fills it in."""
    nav = "".join(f'<a href="{href}"{" class=on" if key == page else ""}>{label}</a>'
                  for key, (href, label) in PAGES.items()) if page != "login" else ""
    heading = f"{title} \u00b7 posttrain ui" if title else "posttrain ui"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(heading)}</title>'
            '<link rel="stylesheet" href="/static/report.css"><link rel="stylesheet" href="/static/ui.css">'
            f'</head><body data-page="{page}"><nav><span class="brand">posttrain ui</span>{nav}</nav>'
            f'<main>\n{_BODIES[page]}\n</main><script src="/static/ui.js"></script></body></html>\n')

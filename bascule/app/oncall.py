"""The on-call page: what differs, where, since when and how much, per dataset, at a glance.

Served by the admin API (``GET /``, ``bascule/app/admin.py``) from
:meth:`~bascule.app.operations.Operations.oncall`; rendered here, on the server, as HTML with
an inline SVG chart, so that it reads the same with or without its script. The script
(``/oncall.js``) and the style sheet (``/oncall.css``) are served by bascule too: no CDN, no
font, nothing from outside; the page's Content-Security-Policy allows nothing else.

What it shows is what the operations answer: stages, gate figures, pointers, kinds, counts,
trace ids and times, never a record value. Every text is escaped here, whoever wrote it.

A browser cannot send a bearer header when it navigates, so a person logs in once with their
token (a form, ``POST /login``) and gets a session cookie (HttpOnly, SameSite=Strict) that
holds not the token but a MAC keyed by it, with its expiry: it opens the page and its JSON,
never an ``/v1`` endpoint, and rotating the token ends it (docs/decisions.md, *On-call: the
page and the watch*).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from html import escape
from typing import Any

import orjson

SESSION_COOKIE = "bascule_oncall"
SESSION_SECONDS = 12 * 3600
"""A session lasts a shift."""
REFRESH_SECONDS = 10
"""How often the page fetches itself again."""

_LABEL = b"bascule-oncall-session-v1|"


def session_value(token: str, now: float | None = None) -> str:
    """A session cookie's value for ``token``: its expiry and a MAC keyed by the token."""
    expires = int(now if now is not None else time.time()) + SESSION_SECONDS
    return f"v1.{expires}.{_mac(token, expires)}"


def session_matches(value: str, tokens: Iterable[str], now: float | None = None) -> bool:
    """Whether ``value`` is a live session of one of ``tokens`` (each compared in constant
    time, every one of them)."""
    version, _, rest = value.partition(".")
    raw_expires, _, mac = rest.partition(".")
    if version != "v1" or not raw_expires.isdigit() or len(raw_expires) > 12:
        return False
    expires = int(raw_expires)
    current = now if now is not None else time.time()
    if not current < expires <= current + SESSION_SECONDS:
        return False
    found = False
    for token in tokens:
        found |= hmac.compare_digest(mac.encode(), _mac(token, expires).encode())
    return found


def _mac(token: str, expires: int) -> str:
    return hmac.new(token.encode(), _LABEL + str(expires).encode(), hashlib.sha256).hexdigest()


# --- the page ------------------------------------------------------------------------------


def page(data: dict[str, Any], refresh: int = REFRESH_SECONDS) -> str:
    """The whole page: its frame and, inside, :func:`fragment`, which the script fetches again
    every ``refresh`` seconds."""
    return _frame(
        "bascule on-call",
        '<header><h1>bascule on-call</h1><span id="refresh-state" class="muted">'
        f"refreshes every {refresh} s</span>"
        '<form method="post" action="/logout"><button type="submit">log out</button></form>'
        "</header>"
        f'<main id="oncall" data-refresh="{refresh}">{fragment(data)}</main>'
        '<script src="/oncall.js"></script>',
    )


def fragment(data: dict[str, Any]) -> str:
    """Every dataset's panel, and when the figures were read."""
    parts = [f'<p class="muted">figures read at <time>{_e(_when(data["at"]))}</time></p>']
    if not data["datasets"]:
        parts.append("<p>no dataset is registered (`bascule migrate`)</p>")
    else:
        parts.append(_summary(data["datasets"]))
    parts.extend(_dataset(d, data["mismatches_since"]) for d in data["datasets"])
    return "".join(parts)


def failed(message: str) -> str:
    """In place of the figures when they could not be read (the state database away)."""
    return f'<p class="bad">the figures could not be read: {_e(message)}</p>'


def unavailable(message: str) -> str:
    """The page when the figures could not be read: it keeps trying."""
    return _frame(
        "bascule on-call",
        f'<header><h1>bascule on-call</h1><span id="refresh-state" class="muted"></span>'
        f'</header><main id="oncall" data-refresh="{REFRESH_SECONDS}">{failed(message)}</main>'
        '<script src="/oncall.js"></script>',
    )


def login(error: str | None = None) -> str:
    """The login form: the viewer token (or an operator's), exchanged for a session cookie."""
    note = f'<p class="bad" role="alert">{_e(error)}</p>' if error else ""
    return _frame(
        "bascule on-call: log in",
        "<header><h1>bascule on-call</h1></header><main>"
        "<p>Log in with the viewer token (<code>BASCULE_VIEWER_TOKEN</code>) or an operator "
        "token. The page only reads: it changes nothing.</p>"
        f"{note}"
        '<form method="post" action="/login" class="login">'
        '<label>token <input type="password" name="token" autocomplete="current-password" '
        'required autofocus></label> <button type="submit">log in</button></form></main>',
    )


def _frame(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{_e(title)}</title><link rel="stylesheet" href="/oncall.css"></head>'
        f"<body>{body}</body></html>"
    )


def _summary(datasets: list[dict[str, Any]]) -> str:
    """One line per dataset, at a glance; each links to its panel."""
    rows = []
    for d in datasets:
        gate = d["gate"]
        if gate is None:
            verdict = '<span class="muted">-</span>'
        elif gate["ok"]:
            verdict = '<span class="ok">holds</span>'
        else:
            failing = ", ".join(c["condition"] for c in gate["conditions"] if not c["ok"])
            verdict = f'<span class="bad">closed</span>: {_e(failing)}'
        mismatched = sum(m["mismatched"] for m in d["minutes"])
        compared = sum(m["compared"] for m in d["minutes"])
        j = d["journal"]
        noise = "-" if d["noise"] is None else str(len(d["noise"]))
        rows.append(
            f'<tr data-dataset="{_e(d["dataset"])}"><td><a href="#dataset-{_e(d["dataset"])}">'
            f"{_e(d['dataset'])}</a></td>"
            f'<td><span class="stage stage-{_e(d["stage"])}">{_e(d["stage"])}</span></td>'
            f"<td>{_e(_when(d['since']))}</td><td>{verdict}</td>"
            f'<td class="{"bad" if mismatched else ""}">{mismatched} of {compared}</td>'
            f"<td>{_e(j.get('backlog', 0))}</td>"
            f'<td class="{"bad" if j.get("in_doubt") else ""}">{_e(j.get("in_doubt", 0))}</td>'
            f'<td class="{"bad" if j.get("dead") else ""}">{_e(j.get("dead", 0))}</td>'
            f"<td>{_e(noise)}</td></tr>"
        )
    return (
        '<table class="summary"><thead><tr><th>dataset</th><th>stage</th><th>since</th>'
        "<th>gate</th><th>mismatched, last hour</th><th>backlog</th><th>in doubt</th>"
        f"<th>dead</th><th>noise to decide</th></tr></thead><tbody>{''.join(rows)}</tbody>"
        "</table>"
    )


def _dataset(d: dict[str, Any], mismatches_since: str) -> str:
    name = d["dataset"]
    gaps = [f"the {side}'s since {_when(t)}" for side, t in d["gaps"].items() if t]
    gap_line = f'<p class="bad">open gap: {_e(", ".join(gaps))}</p>' if gaps else ""
    return (
        f'<section class="dataset" id="dataset-{_e(name)}" data-dataset="{_e(name)}">'
        f'<h2>{_e(name)} <span class="stage stage-{_e(d["stage"])}">{_e(d["stage"])}</span>'
        "</h2>"
        f'<p class="since">in <b>{_e(d["stage"])}</b> since {_e(_when(d["since"]))} '
        f"(version {_e(d['version'])}, by {_e(d['updated_by'])}); "
        f"auto_promote {'on' if d['auto_promote'] else 'off'}</p>{gap_line}"
        '<div class="cards">'
        f"{_gate(d['gate'])}{_chart(d['minutes'])}{_journal(d['journal'])}"
        f"{_mismatches(d['mismatches'], d['mismatch_groups'], mismatches_since)}"
        f"{_noise(d['noise'])}"
        "</div></section>"
    )


def _gate(gate: dict[str, Any] | None) -> str:
    if gate is None:
        return '<div class="card gate"><h3>gate</h3><p class="muted">not available here</p></div>'
    verdict = '<span class="ok">holds</span>' if gate["ok"] else '<span class="bad">closed</span>'
    rows = "".join(
        f'<tr class="{"holds" if c["ok"] else "failing"}" data-condition="{_e(c["condition"])}">'
        f"<td>{'ok' if c['ok'] else 'NO'}</td><td>{_e(c['condition'])}</td>"
        f"<td><code>{_e(_figure(c['figure']))}</code></td><td>{_e(c['detail'])}</td></tr>"
        for c in gate["conditions"]
    )
    move = gate["move"] or gate["stage"]
    return (
        f'<div class="card gate"><h3>gate of {_e(move)}: {verdict}</h3>'
        f'<p class="muted">evidence since {_e(_when(gate["since"]))}</p>'
        "<table><thead><tr><th></th><th>condition</th><th>figure</th><th>detail</th></tr>"
        f"</thead><tbody>{rows}</tbody></table></div>"
    )


CHART_BAR = 6
CHART_HEIGHT = 48


def _chart(minutes: list[dict[str, Any]]) -> str:
    """Comparisons (grey, scaled to the busiest minute) and the share mismatched (red, 0 to
    100 %) per minute, as inline SVG."""
    compared = sum(m["compared"] for m in minutes)
    mismatched = sum(m["mismatched"] for m in minutes)
    busiest = max((m["compared"] for m in minutes), default=0) or 1
    width = CHART_BAR * max(len(minutes), 1)
    bars = []
    for i, m in enumerate(minutes):
        x = i * CHART_BAR
        volume = round(CHART_HEIGHT * m["compared"] / busiest, 1)
        rate = m["mismatched"] / m["compared"] if m["compared"] else (1.0 if m["mismatched"] else 0)
        share = round(CHART_HEIGHT * min(rate, 1.0), 1)
        if m["mismatched"]:
            share = max(share, 2.0)
        tip = f"{_hhmm(m['minute'])}: {m['mismatched']} mismatched of {m['compared']} compared"
        bars.append(
            f"<g><title>{_e(tip)}</title>"
            f'<rect class="volume" x="{x}" y="{CHART_HEIGHT - volume}" width="{CHART_BAR - 1}" '
            f'height="{volume}"></rect>'
            f'<rect class="rate" x="{x}" y="{CHART_HEIGHT - share}" width="{CHART_BAR - 1}" '
            f'height="{share}"></rect></g>'
        )
    share = f" ({100 * mismatched / compared:.2f} %)" if compared else ""
    return (
        '<div class="card chart"><h3>divergence, last hour</h3>'
        f'<svg class="chart" role="img" viewBox="0 0 {width} {CHART_HEIGHT + 12}" '
        f'width="{width * 2}" height="{(CHART_HEIGHT + 12) * 2}" '
        'aria-label="share of comparisons mismatched per minute over the last hour">'
        f'<line class="axis" x1="0" y1="{CHART_HEIGHT + 0.5}" x2="{width}" '
        f'y2="{CHART_HEIGHT + 0.5}"></line>{"".join(bars)}'
        f'<text x="0" y="{CHART_HEIGHT + 10}">-60 min</text>'
        f'<text x="{width}" y="{CHART_HEIGHT + 10}" text-anchor="end">now</text></svg>'
        f'<p><b class="{"bad" if mismatched else "ok"}">{mismatched} mismatched</b> of '
        f"{compared} compared{share}</p>"
        '<p class="muted"><span class="key volume"></span> comparisons per minute '
        '<span class="key rate"></span> share mismatched</p></div>'
    )


def _journal(j: dict[str, Any]) -> str:
    oldest = j.get("oldest_pending_seconds")
    cells = (
        ("backlog", j.get("backlog", 0), False),
        ("oldest", f"{oldest:.1f} s" if oldest is not None else "-", False),
        ("in doubt", j.get("in_doubt", 0), bool(j.get("in_doubt"))),
        ("dead", j.get("dead", 0), bool(j.get("dead"))),
    )
    items = "".join(
        f'<div class="figure{" bad" if bad else ""}"><span>{_e(label)}</span>'
        f"<b>{_e(value)}</b></div>"
        for label, value, bad in cells
    )
    return f'<div class="card journal"><h3>journal</h3><div class="figures">{items}</div></div>'


def _mismatches(groups: list[dict[str, Any]], total: int, since: str) -> str:
    head = f'<h3>mismatches by pointer <span class="muted">since {_e(_when(since))}</span></h3>'
    if not groups:
        return f'<div class="card mismatches">{head}<p class="ok">none</p></div>'
    rows = "".join(
        f'<tr data-pointer="{_e(g["pointer"])}"><td><code>{_e(g["pointer"] or "(whole)")}</code>'
        f"</td><td>{_e(g['part'])}</td><td>{_e(g['kind'])}</td><td>{_e(g['count'])}</td>"
        f"<td>{_e(_when(g['first_seen']))}</td><td>{_e(_when(g['last_seen']))}</td>"
        f"<td>{_e(', '.join(g['routes']))}</td>"
        f"<td>{''.join(f'<code>{_e(t)}</code> ' for t in g['trace_ids'])}</td></tr>"
        for g in groups
    )
    more = (
        f'<p class="muted">{total - len(groups)} more pointers: `bascule divergence`</p>'
        if total > len(groups)
        else ""
    )
    return (
        f'<div class="card mismatches">{head}<table><thead><tr><th>pointer</th><th>part</th>'
        "<th>kind</th><th>count</th><th>first seen</th><th>last seen</th><th>routes</th>"
        f"<th>trace ids</th></tr></thead><tbody>{rows}</tbody></table>{more}</div>"
    )


def _noise(proposals: list[dict[str, Any]] | None) -> str:
    head = "<h3>noise proposals awaiting a decision</h3>"
    if proposals is None:
        return f'<div class="card noise">{head}<p class="muted">not available here</p></div>'
    if not proposals:
        return f'<div class="card noise">{head}<p class="muted">none</p></div>'
    rows = "".join(
        f"<tr><td><code>{_e(p['pointer'])}</code></td><td>{_e(p['route'])}</td>"
        f"<td>{_e(p['rule'] + (' by ' + p['key'] if p['key'] else ''))}</td>"
        f"<td>{_e(p['pairs'])}</td><td>{_e(_when(p['last_seen']))}</td></tr>"
        for p in proposals
    )
    return (
        f'<div class="card noise">{head}<table><thead><tr><th>pointer</th><th>route</th>'
        f"<th>rule</th><th>pairs</th><th>last seen</th></tr></thead><tbody>{rows}</tbody>"
        '</table><p class="muted">`bascule noise DATASET accept|reject POINTER --reason …`</p>'
        "</div>"
    )


def _figure(figure: Any) -> str:
    if figure is None:
        return "-"
    if isinstance(figure, str | int | float):
        return str(figure)
    return orjson.dumps(figure).decode()


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _when(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _hhmm(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%H:%MZ")


SCRIPT = """\
// bascule on-call: fetch the figures again every few seconds. Served by bascule; nothing else.
(function () {
  "use strict";
  var main = document.getElementById("oncall");
  var state = document.getElementById("refresh-state");
  if (!main) { return; }
  var every = (Number(main.getAttribute("data-refresh")) || 10) * 1000;
  function tell(text, bad) {
    if (state) { state.textContent = text; state.className = bad ? "bad" : "muted"; }
  }
  function tick() {
    fetch("/oncall/fragment", {credentials: "same-origin", cache: "no-store"})
      .then(function (resp) {
        if (resp.status === 401) {
          tell("session ended: reload the page to log in again", true);
          return null;
        }
        if (!resp.ok) { throw new Error("HTTP " + resp.status); }
        return resp.text();
      })
      .then(function (html) {
        if (html === null) { return; }
        main.innerHTML = html;  // rendered and escaped by bascule
        tell("refreshes every " + every / 1000 + " s", false);
      })
      .catch(function (err) { tell("refresh failed (" + err.message + "): retrying", true); });
  }
  window.setInterval(tick, every);
})();
"""

STYLE = """\
:root { color-scheme: light; font-family: system-ui, sans-serif; font-size: 14px; }
body { margin: 0; background: #f4f5f7; color: #1d2330; }
header { display: flex; gap: 1rem; align-items: baseline; padding: .6rem 1rem;
  background: #1d2330; color: #fff; }
header h1 { font-size: 1.2rem; margin: 0; }
header form { margin-left: auto; }
main { padding: .5rem 1rem 2rem; }
.muted { color: #6b7280; }
header .muted { color: #c3c8d2; }
.ok { color: #0a7a3c; }
.bad { color: #b42318; font-weight: 600; }
header .bad { color: #ffb4a8; }
section.dataset { background: #fff; border: 1px solid #d5d9e0; border-radius: 6px;
  margin: .8rem 0; padding: .4rem 1rem 1rem; }
section.dataset h2 { margin: .4rem 0; }
.stage { font-size: .85rem; padding: .1rem .5rem; border-radius: 999px; background: #e5e7eb;
  vertical-align: middle; }
.stage-shadow, .stage-live { background: #fde68a; }
.stage-target { background: #bbf7d0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(380px, 1fr));
  gap: .8rem; }
.card { border: 1px solid #e5e7eb; border-radius: 4px; padding: .3rem .7rem; overflow-x: auto; }
.card h3 { font-size: 1rem; margin: .3rem 0; }
.gate, .mismatches { grid-column: 1 / -1; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .15rem .4rem; border-bottom: 1px solid #eef0f3;
  vertical-align: top; }
tr.failing td { background: #fef3f2; }
tr.failing td:first-child { color: #b42318; font-weight: 700; }
tr.holds td:first-child { color: #0a7a3c; }
code { font-size: .85rem; }
svg.chart { max-width: 100%; height: auto; }
svg.chart rect.volume { fill: #cbd5e1; }
svg.chart rect.rate { fill: #d92d20; }
svg.chart line.axis { stroke: #9ca3af; stroke-width: 1; }
svg.chart text { font-size: 7px; fill: #6b7280; }
.key { display: inline-block; width: .8rem; height: .8rem; vertical-align: middle; }
.key.volume { background: #cbd5e1; }
.key.rate { background: #d92d20; }
.figures { display: flex; gap: 1.2rem; }
.figure span { display: block; color: #6b7280; }
.figure b { font-size: 1.4rem; }
form.login { margin-top: 1rem; }
table.summary { background: #fff; border: 1px solid #d5d9e0; margin-bottom: .5rem; }
td.bad { color: #b42318; font-weight: 600; }
"""

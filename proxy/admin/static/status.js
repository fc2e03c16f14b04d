// Fender status page: polls /admin/status every 2 s and renders it; actions call the admin API.
// Plain JavaScript, no dependencies. Text from the proxy is only ever set as textContent.
"use strict";

(function () {
  const POLL_MS = 2000;
  const REQUEST_TIMEOUT_MS = 4000;
  const TOKEN_KEY = "fender-admin-token";

  const $ = (id) => document.getElementById(id);
  let lastOk = null; // Date of the last successful poll
  let downSince = null; // Date of the first failed poll in a row
  let timer = null;
  let inFlight = false; // one poll at a time: an action's refresh waits for the running poll
  let pollAgain = false;

  // ---------------------------------------------------------------- small DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // A state is always a word (and a symbol) plus a colour: never colour alone.
  function badge(kind, word) {
    const symbol = { ok: "\u2714", bad: "\u2716", warn: "\u26A0", info: "\u25CF", neutral: "\u25CB" }[kind] || "";
    return el("span", { class: "badge " + kind, "data-state": word }, symbol + " " + word);
  }

  function table(columns, rows, empty) {
    if (!rows.length) return el("p", { class: "empty" }, empty);
    return el(
      "table",
      {},
      el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col" }, c)))),
      el("tbody", {}, rows),
    );
  }

  function cell(label, content, cls) {
    return el("td", { "data-label": label, class: cls }, content);
  }

  // ---------------------------------------------------------------- formatting

  function fmtRate(v) {
    if (v === null || v === undefined) return "\u2013";
    return (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)) + "/s";
  }
  function fmtPct(v) {
    return v === null || v === undefined ? "\u2013" : (v * 100).toFixed(v > 0 && v < 0.01 ? 2 : 1) + " %";
  }
  function fmtLatency(v) {
    if (v === null || v === undefined) return "\u2013";
    return v < 1 ? (v * 1000).toFixed(v < 0.01 ? 2 : 1) + " ms" : v.toFixed(2) + " s";
  }
  function fmtDuration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 90) return s + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }
  function fmtBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }
  function fmtTime(date) {
    return date.toLocaleTimeString([], { hour12: false });
  }

  // ---------------------------------------------------------------- sparklines

  const SVG = "http://www.w3.org/2000/svg";
  function sparkline(rates, errors) {
    const w = 120, h = 28, pad = 2;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.setAttribute("role", "img");
    svg.setAttribute("data-points", String(rates.length));
    const max = Math.max(...rates, 0);
    const last = rates.length ? rates[rates.length - 1] : null;
    const errMax = Math.max(...errors.filter((e) => e !== null), 0);
    const label = rates.length
      ? `Request rate over the last ${rates.length} samples: now ${fmtRate(last)}, peak ${fmtRate(max)}; ` +
        `peak error rate ${fmtPct(errMax)}`
      : "No history yet";
    svg.setAttribute("aria-label", label);
    const title = document.createElementNS(SVG, "title");
    title.textContent = label;
    svg.append(title);
    if (rates.length < 2) return svg;
    const step = (w - 2 * pad) / (rates.length - 1);
    const y = (v, top) => (h - pad - (top > 0 ? (v / top) * (h - 2 * pad) : 0)).toFixed(1);
    const line = (values, top, cls) => {
      const points = values.map((v, i) => `${(pad + i * step).toFixed(1)},${y(v || 0, top)}`).join(" ");
      const poly = document.createElementNS(SVG, "polyline");
      poly.setAttribute("points", points);
      poly.setAttribute("class", cls);
      svg.append(poly);
    };
    line(rates, max, "rate");
    if (errMax > 0) line(errors, 1, "errors"); // error rate on a 0..100 % scale
    return svg;
  }

  // ---------------------------------------------------------------- admin API calls

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function call(method, path, body) {
    const headers = { Accept: "application/json" };
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const controller = new AbortController();
    const timeout = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    try {
      return await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        signal: controller.signal,
      });
    } finally {
      clearTimeout(timeout);
    }
  }

  async function act(description, method, path, body, question) {
    if (question && !window.confirm(question)) return;
    const out = $("action-result");
    out.classList.remove("failed");
    out.textContent = description + "\u2026";
    try {
      const response = await call(method, path, body);
      let detail = "";
      try {
        const data = await response.json();
        detail = data.error || (data.purged !== undefined ? `${data.purged} purged` : data.result || "");
      } catch (e) { /* not JSON */ }
      if (response.status === 401) {
        showLogin("The token was refused.");
        throw new Error("admin token required");
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}${detail ? ": " + detail : ""}`);
      out.textContent = `${description}: done${detail ? " (" + detail + ")" : ""} at ${fmtTime(new Date())}`;
    } catch (err) {
      out.classList.add("failed");
      out.textContent = `${description}: failed (${err.message})`;
    }
    poll();
  }

  const enc = encodeURIComponent;

  // ---------------------------------------------------------------- sections

  function renderPolicy(p, draining) {
    const result = p.last_attempt ? p.last_attempt.result : "started";
    const resultBadge = p.ok ? badge("ok", result) : badge("bad", "failed");
    const items = [
      ["Policy version", String(p.version)],
      ["Loaded at", `${p.loaded_at} (by ${p.applied_by})`],
      ["Last reload", resultBadge, p.last_attempt ? ` ${p.last_attempt.at} via ${p.last_attempt.trigger}` : ""],
      ["Policy file", p.source || "\u2013", p.matches_file ? null : [" ", badge("warn", "file differs from running policy")]],
      ["Fingerprint", el("code", {}, (p.fingerprint || "").slice(0, 16))],
    ];
    if (draining) items.unshift(["Process", badge("warn", "draining")]);
    if (p.pending_restart && p.pending_restart.length) {
      items.push(["Needs restart", p.pending_restart.join(", ")]);
    }
    const dl = el("dl", { class: "kv" }, items.map(([k, ...v]) => [el("dt", {}, k), el("dd", {}, v)]));
    const parts = [dl];
    if (!p.ok && p.error) {
      parts.push(el("p", {}, "The last reload failed; the previous policy keeps running:"));
      parts.push(el("pre", { class: "error-text" }, [p.error, ...(p.errors || []).slice(1)].join("\n")));
    }
    const available = p.rollback_available || 0;
    parts.push(
      el(
        "p",
        {},
        el(
          "button",
          {
            type: "button",
            class: "danger",
            "data-key": "rollback",
            disabled: available === 0,
            onclick: () =>
              act("Rollback", "POST", "admin/rollback", undefined,
                "Roll back to the previous good policy? The policy file on disk is left as it is."),
          },
          "Roll back",
        ),
        " ",
        el("span", { class: "muted small" }, available ? `${available} previous polic${available === 1 ? "y" : "ies"} kept` : "no previous policy to roll back to"),
      ),
    );
    return parts;
  }

  // A route's fault injection (chaos drill): off, or what it injects and how many so far.
  function renderFault(f) {
    if (!f) return el("span", { class: "muted" }, "\u2013");
    if (!f.enabled) return badge("neutral", "armed, off");
    const scope = f.scoped ? " (marked requests)" : "";
    const by = f.changed_by_admin ? " \u00b7 set by admin" : "";
    return [
      badge("warn", "injecting"),
      el("span", { class: "since" }, f.summary + scope + " \u00b7 " + f.injected + " so far, " + f.active + " delaying" + by),
    ];
  }

  function renderRoutes(routes) {
    const rows = routes.map((r) => {
      const errKind = r.error_rate === null ? "neutral" : r.error_rate >= 0.05 ? "bad" : r.error_rate > 0 ? "warn" : "ok";
      const hist = r.history || { rate_per_second: [], error_rate: [] };
      return el(
        "tr",
        { "data-route": r.name },
        cell("Route", [el("strong", {}, r.name), el("span", { class: "since" }, "\u2192 " + r.upstream)]),
        cell("Requests", fmtRate(r.rate_per_second), "num rate"),
        cell("Errors (5xx)", r.error_rate === null ? badge("neutral", "no traffic") : badge(errKind, fmtPct(r.error_rate)), "errors"),
        cell("p50", fmtLatency(r.p50_seconds), "num"),
        cell("p99", fmtLatency(r.p99_seconds), "num"),
        cell("Rate-limited", String(r.rate_limited), "num"),
        cell("Bulkhead-rejected", String(r.bulkhead_rejected), "num"),
        cell("Retries", String(r.retries), "num"),
        cell("Limit", r.adaptive_concurrency ? `${r.adaptive_concurrency.in_flight}/${r.adaptive_concurrency.limit} (${r.adaptive_concurrency.shed} shed)` : "\u2014", "num"),
        cell("Hedges", r.hedge ? `${r.hedge.sent} (${r.hedge.won} won) after ${r.hedge.delay_seconds === null ? "warming up" : fmtLatency(r.hedge.delay_seconds)}` : "\u2014", "num"),
        cell("Tunnels", String(r.open_tunnels || 0), "num"),
        cell("Fault", renderFault(r.fault), "fault"),
        cell("Last 5 min", sparkline(hist.rate_per_second, hist.error_rate)),
      );
    });
    return table(
      ["Route", "Requests", "Errors (5xx)", "p50", "p99", "Rate-limited", "Bulkhead-rejected", "Retries", "Limit", "Hedges", "Tunnels", "Fault", "Last 5 min"],
      rows,
      "No routes.",
    );
  }

  const HEALTH = {
    healthy: ["ok", "passing"],
    unhealthy: ["bad", "failing"],
    ejected: ["bad", "ejected"],
    overloaded: ["warn", "overloaded"],
  };

  function renderUpstreams(upstreams) {
    return upstreams.map((u) => {
      let level;
      if (u.panic) level = badge("bad", "panic: all replicas in use");
      else if (u.active_priority === null) level = badge("bad", "no replica available");
      else level = badge("info", `priority ${u.active_priority} active`);
      const rows = u.replicas.map((r) => {
        const [kind, word] = HEALTH[r.state] || ["neutral", r.state];
        const health = [badge(kind, word), el("span", { class: "since" }, "for " + fmtDuration(r.state_for_seconds))];
        if (r.ejected_for_seconds > 0) health.push(el("span", { class: "since" }, `${fmtDuration(r.ejected_for_seconds)} left`));
        if (r.drained) health.push(" ", badge("warn", "drained"));
        const serving = r.serving ? badge("ok", "active") : badge("neutral", r.drained ? "out of rotation" : "standby");
        const path = `admin/upstreams/${enc(u.name)}/replicas/${enc(r.name)}/`;
        const button = r.drained
          ? el("button", { type: "button", "data-key": `undrain:${u.name}:${r.name}`,
              onclick: () => act(`Undrain ${r.name}`, "POST", path + "undrain") }, "Undrain")
          : el("button", { type: "button", "data-key": `drain:${u.name}:${r.name}`,
              onclick: () => act(`Drain ${r.name}`, "POST", path + "drain", undefined,
                `Drain ${r.name}? It gets no new requests until you undrain it.`) }, "Drain");
        const check = r.last_check ? `${r.last_check.result}, ${fmtDuration(r.last_check.seconds_ago)} ago` : "\u2013";
        return el(
          "tr",
          { "data-replica": r.name, "data-upstream": u.name },
          cell("Replica", el("code", {}, r.name)),
          cell("From", r.source === "policy" ? "policy" : el("code", {}, r.source)),
          cell("Priority", String(r.priority), "num"),
          cell("Health", el("span", { class: "health" }, health)),
          cell("Traffic", el("span", { class: "serving" }, serving)),
          cell("In flight", String(r.in_flight), "num"),
          cell("Slow start", r.slow_start_share === null || r.slow_start_share === undefined
            ? (u.slow_start_seconds ? "full share" : "\u2013")
            : badge("warn", `${Math.round(r.slow_start_share * 100)}% share`), "num"),
          cell("Last check", u.health_checks ? check : "no active checks"),
          cell("Action", el("div", { class: "actions" }, button)),
        );
      });
      // Names the replicas come from: what the last lookup said and how old the answer in use is.
      const names = (u.dns || []).map((d) => {
        const [kind, word] = d.last_outcome === "ok" ? ["ok", "ok"] : ["bad", d.last_outcome || "not asked yet"];
        const age = d.answer_age_seconds === null ? "no answer yet" : `answer ${fmtDuration(d.answer_age_seconds)} old`;
        return el(
          "li",
          { "data-dns": d.name },
          el("code", {}, `${d.type} ${d.name}`), " ", badge(kind, word),
          ` ${d.replicas} replica${d.replicas === 1 ? "" : "s"}, ${age}`,
          d.last_error ? el("span", { class: "since" }, d.last_error) : "",
        );
      });
      return el(
        "div",
        { class: "upstream", "data-upstream": u.name },
        el("h3", {}, el("code", {}, u.name), " ", level),
        u.retry_budget
          ? el("p", { class: "since", "data-retry-budget": u.name },
              `retry budget (shared by its routes): ${u.retry_budget.retries} of ${u.retry_budget.allowed} retries allowed, ${u.retry_budget.requests} requests in the window`)
          : "",
        names.length ? el("ul", { class: "dns" }, names) : "",
        table(["Replica", "From", "Priority", "Health", "Traffic", "In flight", "Slow start", "Last check", "Action"], rows, "No replicas."),
      );
    });
  }

  const BREAKER = { closed: ["ok", "closed"], open: ["bad", "open"], half_open: ["warn", "half-open"] };

  function renderBreakers(breakers) {
    const rows = breakers.map((b) => {
      const [kind, word] = BREAKER[b.state] || ["neutral", b.state];
      const state = [badge(kind, word)];
      if (b.state === "open") state.push(el("span", { class: "since" }, fmtDuration(b.open_seconds_left) + " left open"));
      const path = `admin/breakers/${enc(b.name)}/`;
      return el(
        "tr",
        { "data-breaker": b.name },
        cell("Breaker", el("code", {}, b.name)),
        cell("State", el("span", { class: "state" }, state)),
        cell("Failure rate", fmtPct(b.failure_rate), "num"),
        cell("Slow-call rate", fmtPct(b.slow_call_rate), "num"),
        cell("Calls in window", b.window.kind === "calls"
          ? `${b.window.calls} of last ${b.window.size}`
          : `${b.window.calls} in ${b.window.size}`, "num"),
        cell("Trips", String(b.trips), "num"),
        cell(
          "Action",
          el(
            "div",
            { class: "actions" },
            el("button", { type: "button", class: "danger", "data-key": `open:${b.name}`,
              onclick: () => act(`Force ${b.name} open`, "POST", path + "open", undefined,
                `Force breaker ${b.name} open? Requests through it are refused until it closes.`) }, "Force open"),
            el("button", { type: "button", "data-key": `close:${b.name}`,
              onclick: () => act(`Force ${b.name} closed`, "POST", path + "close") }, "Force closed"),
          ),
        ),
      );
    });
    return table(
      ["Breaker", "State", "Failure rate", "Slow-call rate", "Calls in window", "Trips", "Action"],
      rows,
      "No circuit breakers in this policy.",
    );
  }

  function renderCache(c) {
    if (!c.enabled) return el("p", { class: "empty" }, "No route caches responses.");
    const used = c.max_size ? c.bytes / c.max_size : 0;
    return el(
      "dl",
      { class: "kv" },
      el("dt", {}, "Hit ratio"),
      el("dd", {}, c.hit_ratio === null ? "\u2013 (no lookups yet)" : `${fmtPct(c.hit_ratio)} of ${c.lookups} lookups`),
      el("dt", {}, "Memory"),
      el("dd", {}, el("meter", { min: 0, max: 1, high: 0.9, value: used.toFixed(4), "aria-label": "cache memory used" }),
        ` ${fmtBytes(c.bytes)} of ${fmtBytes(c.max_size)} (${fmtPct(used)})`),
      el("dt", {}, "Entries"),
      el("dd", {}, String(c.entries)),
      el("dt", {}, "Stale served"),
      el("dd", {}, String(c.stale_served)),
    );
  }

  // ---------------------------------------------------------------- render and poll

  function render(data) {
    // Keep keyboard focus on the same control across re-renders.
    const focused = document.activeElement && document.activeElement.getAttribute("data-key");
    $("policy").replaceChildren(...renderPolicy(data.policy, data.draining));
    $("routes").replaceChildren(renderRoutes(data.routes));
    $("upstreams").replaceChildren(...renderUpstreams(data.upstreams));
    $("breakers").replaceChildren(renderBreakers(data.breakers));
    $("cache").replaceChildren(renderCache(data.cache));
    $("purge").hidden = !data.cache.enabled;
    if (focused) {
      const again = document.querySelector(`[data-key="${CSS.escape(focused)}"]`);
      if (again) again.focus();
    }
    $("content").setAttribute("aria-busy", "false");
  }

  function setConnected() {
    const banner = $("banner");
    const wasDown = downSince !== null;
    downSince = null;
    lastOk = new Date();
    banner.hidden = true;
    banner.textContent = "";
    $("content").classList.remove("stale");
    document.body.dataset.connection = "connected";
    $("updated").textContent = (wasDown ? "Reconnected. " : "") + "Updated " + fmtTime(lastOk);
  }

  function setDisconnected(reason) {
    if (downSince === null) downSince = new Date();
    const banner = $("banner");
    banner.hidden = false;
    const text =
      `Disconnected: cannot reach Fender's admin API since ${fmtTime(downSince)} (${reason}). ` +
      `Retrying every ${POLL_MS / 1000} s; ` +
      (lastOk ? `the figures below are from ${fmtTime(lastOk)}.` : "nothing loaded yet.");
    if (banner.textContent !== text) banner.textContent = text; // announced once, not every poll
    $("content").classList.add("stale");
    document.body.dataset.connection = "disconnected";
  }

  function showLogin(message) {
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    document.body.dataset.connection = "needs-token";
  }

  async function poll() {
    if (inFlight) {
      pollAgain = true;
      return;
    }
    inFlight = true;
    clearTimeout(timer);
    let next = true;
    try {
      const response = await call("GET", "admin/status");
      if (response.status === 401) {
        setConnected();
        showLogin(token() ? "The token was refused." : "");
        $("updated").textContent = "Waiting for the admin token";
        next = false; // polling resumes when a token is given
      } else {
        if (!response.ok) throw new Error("HTTP " + response.status);
        const data = await response.json();
        $("login").hidden = true;
        setConnected();
        render(data);
      }
    } catch (err) {
      setDisconnected(err.name === "AbortError" ? "no answer in " + REQUEST_TIMEOUT_MS / 1000 + " s" : err.message);
    } finally {
      inFlight = false;
    }
    if (pollAgain) {
      pollAgain = false;
      poll();
    } else if (next) {
      timer = setTimeout(poll, POLL_MS);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
      $("token").value = "";
      poll();
    });
    $("purge").addEventListener("submit", (event) => {
      event.preventDefault();
      const prefix = $("purge-prefix").value.trim() || "/";
      act(`Purge ${prefix}`, "POST", "admin/cache/purge", { prefix },
        `Purge every cached response whose URL starts with ${prefix}?`);
    });
    poll();
  });
})();

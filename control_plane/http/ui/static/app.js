// fleetrun UI: refresh the live part of a page, follow compute logs, send button calls.
// Plain JavaScript, no build step. Everything from the server is inserted as text or as
// HTML the server rendered (escaped there); nothing here builds HTML from data.
"use strict";

const UI_HEADERS = { "X-Fleetrun-UI": "1" };

function flash(message, isError) {
  const box = document.getElementById("flash");
  if (!box) return;
  box.textContent = message;
  box.className = isError ? "error" : "ok";
  box.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

// After a cancel the toast names the run's status as the page shows it (CANCELING,
// then CANCELED), so the two never disagree.
function followStatus() {
  const box = document.getElementById("flash");
  const status = document.getElementById("run-status");
  if (box && status && box.dataset.follow && !box.hidden) {
    box.textContent = `done: ${status.textContent.trim()}`;
  }
}

async function refreshLive() {
  const live = document.getElementById("live");
  if (!live || document.hidden) return;
  try {
    const resp = await fetch(location.href, {
      headers: { ...UI_HEADERS, "X-Fleetrun-Fragment": "1" },
      credentials: "same-origin",
    });
    if (resp.redirected || resp.status === 401) { location.reload(); return; }
    if (resp.ok) {
      live.innerHTML = await resp.text();
      followStatus();
    }
  } catch (err) {
    // the control plane is restarting or unreachable: try again on the next tick
  }
}

function startRefresh() {
  const live = document.getElementById("live");
  const every = live ? Number(live.dataset.refresh || 0) : 0;
  if (every > 0) setInterval(refreshLive, every);
}

async function post(button) {
  if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
  button.disabled = true;
  try {
    const resp = await fetch(button.dataset.post, {
      method: button.dataset.method || "POST",
      headers: { ...UI_HEADERS, "Content-Type": "application/json" },
      credentials: "same-origin",
      body: button.dataset.body || "{}",
    });
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) {
      const err = body.error || {};
      flash(`${resp.status} ${err.code || ""}: ${err.message || "request failed"}`, true);
      return;
    }
    if (button.dataset.then) {
      location.href = button.dataset.then;
      return;
    }
    if (button.dataset.openRun && body.run_id) {
      location.href = `/ui/runs/${encodeURIComponent(body.run_id)}`;
      return;
    }
    flash(body.status ? `done: ${body.status}` : "done", false);
    document.getElementById("flash").dataset.follow = button.dataset.followStatus ? "1" : "";
    await refreshLive();
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-post]");
  if (button) {
    event.preventDefault();
    post(button);
  }
});

// Compute logs: long-poll the logs API from the last chunk seen; append as text.
function followLogs() {
  const pre = document.getElementById("logs");
  const select = document.getElementById("log-step");
  if (!pre) return;
  let after = 0;
  let generation = 0;
  async function loop(mine) {
    while (mine === generation) {
      const step = select ? select.value : "";
      const query = new URLSearchParams({ after: String(after), wait: "10" });
      if (step) query.set("step", step);
      try {
        const resp = await fetch(`/api/v1/runs/${encodeURIComponent(pre.dataset.run)}/logs?${query}`,
          { headers: UI_HEADERS, credentials: "same-origin" });
        if (!resp.ok) { await new Promise((r) => setTimeout(r, 3000)); continue; }
        const body = await resp.json();
        if (mine !== generation) return;
        for (const chunk of body.logs) {
          after = Math.max(after, chunk.id);
          const line = document.createElement("span");
          line.className = chunk.stream;
          line.dataset.step = chunk.step || "";
          line.textContent = (select && !select.value && chunk.step ? `[${chunk.step}] ` : "") + chunk.text;
          pre.appendChild(line);
        }
      } catch (err) {
        await new Promise((r) => setTimeout(r, 3000));
      }
    }
  }
  function restart() {
    generation += 1;
    after = 0;
    pre.textContent = "";
    loop(generation);
  }
  if (select) select.addEventListener("change", restart);
  restart();
}

document.addEventListener("DOMContentLoaded", () => {
  startRefresh();
  followLogs();
});

// Launchpad: read the form, catch what the page can (JSON, tag lines, priority), send
// POST /api/v1/runs and open the new run; the API's refusal is shown next to its field.
const FIELD_OF_CODE = { bad_config: "config", run_config_too_large: "config", bad_tag: "tags", too_many_tags: "tags" };

// The field an API refusal is about: by its code, else by the field its message names.
function fieldOf(err) {
  const named = /^(config|tags)\b/.exec(err.message || "");
  return FIELD_OF_CODE[err.code] || (named ? named[1] : "form");
}

function showFieldError(field, message) {
  for (const name of ["config", "tags", "form"]) {
    const box = document.getElementById(`${name}-error`);
    box.hidden = name !== field;
    box.textContent = name === field ? message : "";
  }
}

function parseTags(text) {
  const tags = {};
  for (const [i, raw] of text.split("\n").entries()) {
    const line = raw.trim();
    if (!line) continue;
    const at = line.indexOf("=");
    if (at < 1) throw new Error(`line ${i + 1}: "${line}" is not key=value`);
    tags[line.slice(0, at).trim()] = line.slice(at + 1).trim();
  }
  return tags;
}

function launchBody(form) {
  const [location, job] = form.elements.job.value.split("/");
  let config;
  try {
    config = JSON.parse(form.elements.config.value || "{}");
  } catch (err) {
    return { field: "config", message: `not valid JSON: ${err.message}` };
  }
  let tags;
  try {
    tags = parseTags(form.elements.tags.value);
  } catch (err) {
    return { field: "tags", message: err.message };
  }
  const queue = form.elements.queue.value.trim();
  const priority = form.elements.priority.value.trim();
  if (priority && !/^-?\d+$/.test(priority)) {
    return { field: "form", message: `priority must be a whole number, got "${priority}"` };
  }
  if (queue) tags["fleetrun/queue"] = queue;
  if (priority) tags["fleetrun/priority"] = priority;
  return { body: { job, location, tags, config } };
}

async function launch(form) {
  const checked = launchBody(form);
  if (!checked.body) { showFieldError(checked.field, checked.message); return; }
  showFieldError(null, "");
  const button = document.getElementById("launch-submit");
  button.disabled = true;
  try {
    const resp = await fetch("/api/v1/runs", {
      method: "POST",
      headers: { ...UI_HEADERS, "Content-Type": "application/json" },
      credentials: "same-origin",
      body: JSON.stringify(checked.body),
    });
    const body = await resp.json().catch(() => ({}));
    if (resp.ok && body.run_id) {
      location.href = `/ui/runs/${encodeURIComponent(body.run_id)}`;
      return;
    }
    const err = body.error || {};
    showFieldError(fieldOf(err), `${resp.status} ${err.code || ""}: ${err.message || "request failed"}`);
  } catch (err) {
    showFieldError("form", `the control plane could not be reached: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("submit", (event) => {
  if (event.target.id === "launch-form") {
    event.preventDefault();
    launch(event.target);
  }
});

// medlandmark review: the editor. Positions are kept in world millimetres; a View from the
// server maps a picture's pixels to the world (world = origin + column * column_mm + row * row_mm)
// and is the only way between the two.
"use strict";

const PLANE_AXES = { axial: "right | left, anterior on top", coronal: "right | left, superior on top", sagittal: "anterior | posterior, superior on top" };
const GRAB_PX = 9; // a press this close to a landmark grabs it
const CLICK_PX = 3; // a press that moves less is a click
const state = {
  cases: [], index: -1, data: null, points: [], undo: [], selected: 0,
  version: null, window: [0, 1], range: [0, 1], focus: null, viewers: [], saves: 0,
};

// --- geometry ---------------------------------------------------------------------------------

function worldOf(view, column, row) {
  return view.origin_mm.map((o, i) => o + column * view.column_mm[i] + row * view.row_mm[i]);
}

function pixelOf(view, world) {
  const d = world.map((w, i) => w - view.origin_mm[i]);
  const u = view.column_mm, v = view.row_mm;
  const uu = dot(u, u), vv = dot(v, v), uv = dot(u, v);
  const du = dot(d, u), dv = dot(d, v), det = uu * vv - uv * uv;
  return [(du * vv - dv * uv) / det, (dv * uu - du * uv) / det];
}

function distanceToPlane(view, world) {
  const n = cross(view.column_mm, view.row_mm), length = Math.hypot(...n);
  return Math.abs(dot(world.map((w, i) => w - view.origin_mm[i]), n)) / length;
}

const dot = (a, b) => a.reduce((s, v, i) => s + v * b[i], 0);
const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];

// --- a viewer: one canvas showing one picture, with pan and zoom --------------------------------

class Viewer {
  constructor(canvas, plane) {
    this.canvas = canvas; this.plane = plane; this.view = null; this.image = null;
    this.zoom = 1; this.pan = [0, 0]; this.fitted = false;
    canvas.addEventListener("mousedown", (e) => this.press(e));
    canvas.addEventListener("wheel", (e) => this.wheel(e), { passive: false });
  }

  screenOf(world) { // canvas pixels of a world point
    const [c, r] = pixelOf(this.view, world);
    return [this.pan[0] + (c + 0.5) * this.zoom, this.pan[1] + (r + 0.5) * this.zoom];
  }

  worldAt(x, y) { // world point under canvas pixels
    return worldOf(this.view, (x - this.pan[0]) / this.zoom - 0.5, (y - this.pan[1]) / this.zoom - 0.5);
  }

  show(view, url) {
    const sameSize = this.view && this.view.width === view.width && this.view.height === view.height;
    this.view = view;
    if (!sameSize) this.fitted = false;
    const image = new Image();
    image.onload = () => { this.image = image; this.fit(); this.draw(); this.canvas.dataset.loaded = url; };
    image.src = url;
  }

  fit() {
    const rect = this.canvas.getBoundingClientRect();
    if (this.canvas.width !== Math.round(rect.width) || this.canvas.height !== Math.round(rect.height)) {
      this.canvas.width = Math.round(rect.width); this.canvas.height = Math.round(rect.height);
      this.fitted = false;
    }
    if (this.fitted || !this.view) return;
    this.zoom = Math.min(this.canvas.width / this.view.width, this.canvas.height / this.view.height);
    this.pan = [(this.canvas.width - this.view.width * this.zoom) / 2, (this.canvas.height - this.view.height * this.zoom) / 2];
    this.fitted = true;
  }

  draw() {
    const g = this.canvas.getContext("2d");
    g.setTransform(1, 0, 0, 1, 0, 0);
    g.fillStyle = "#000"; g.fillRect(0, 0, this.canvas.width, this.canvas.height);
    if (!this.image || !this.view) return;
    g.imageSmoothingEnabled = this.zoom < 1;
    g.drawImage(this.image, this.pan[0], this.pan[1], this.view.width * this.zoom, this.view.height * this.zoom);
    if (this.plane) {
      g.fillStyle = "#fff"; g.font = "13px system-ui, sans-serif";
      g.fillText(`${this.plane} (${PLANE_AXES[this.plane]})`, 8, 18);
    }
    const pixelMm = Math.hypot(...this.view.column_mm);
    state.points.forEach((point, k) => {
      if (!point) return;
      if (this.plane && distanceToPlane(this.view, point) > 1.5 * pixelMm + 0.5) return;
      const [x, y] = this.screenOf(point), selected = k === state.selected;
      const bound = state.data.error_bound_mm && state.data.error_bound_mm[k];
      g.strokeStyle = colourOf(state.data.confidence && state.data.confidence[k]);
      if (bound) {
        g.setLineDash([4, 4]); g.lineWidth = 1;
        g.beginPath(); g.arc(x, y, bound / pixelMm * this.zoom, 0, 2 * Math.PI); g.stroke();
        g.setLineDash([]);
      }
      g.lineWidth = selected ? 3 : 2;
      g.beginPath(); g.arc(x, y, selected ? 7 : 5, 0, 2 * Math.PI); g.stroke();
      g.fillStyle = g.strokeStyle; g.font = "12px system-ui, sans-serif";
      g.fillText(state.data.names[k], x + 8, y - 8);
    });
  }

  grabbed(x, y) { // the landmark under canvas pixels, or -1
    let best = -1, bestDistance = GRAB_PX;
    state.points.forEach((point, k) => {
      if (!point) return;
      if (this.plane && distanceToPlane(this.view, point) > 1.5 * Math.hypot(...this.view.column_mm) + 0.5) return;
      const [px, py] = this.screenOf(point), d = Math.hypot(px - x, py - y);
      if (d <= bestDistance) { best = k; bestDistance = d; }
    });
    return best;
  }

  press(event) {
    event.preventDefault();
    const rect = this.canvas.getBoundingClientRect();
    const start = [event.clientX - rect.left, event.clientY - rect.top], pan = [...this.pan];
    const landmark = this.grabbed(...start);
    const before = state.points.map((p) => (p ? [...p] : null));
    let moved = false;
    if (landmark >= 0) select(landmark, false);
    const move = (e) => {
      const x = e.clientX - rect.left, y = e.clientY - rect.top;
      if (Math.hypot(x - start[0], y - start[1]) > CLICK_PX) moved = true;
      if (!moved) return;
      if (landmark >= 0) {
        state.points[landmark] = this.worldAt(x, y); redraw();
      } else {
        this.pan = [pan[0] + x - start[0], pan[1] + y - start[1]]; this.draw();
      }
    };
    const release = (e) => {
      window.removeEventListener("mousemove", move); window.removeEventListener("mouseup", release);
      if (landmark >= 0 && moved) { commit(before); return; }
      if (!moved && landmark < 0 && (this.plane || !state.points[state.selected])) {
        state.points[state.selected] = this.worldAt(e.clientX - rect.left, e.clientY - rect.top);
        commit(before);
        if (this.plane) refocus(state.points[state.selected]);
      }
    };
    window.addEventListener("mousemove", move); window.addEventListener("mouseup", release);
  }

  wheel(event) {
    event.preventDefault();
    const rect = this.canvas.getBoundingClientRect();
    const x = event.clientX - rect.left, y = event.clientY - rect.top;
    const factor = event.deltaY < 0 ? 1.25 : 0.8;
    this.pan = [x - (x - this.pan[0]) * factor, y - (y - this.pan[1]) * factor];
    this.zoom *= factor; this.draw();
  }
}

function colourOf(confidence) {
  if (confidence === null || confidence === undefined) return "#4fc3f7";
  if (confidence < 0.3) return "#ff5252";
  if (confidence < 0.6) return "#ffd740";
  return "#69f0ae";
}

// --- cases, landmarks, saving -------------------------------------------------------------------

async function request(url, options) {
  const response = await fetch(url, options);
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  return { ok: response.ok, status: response.status, body };
}

async function loadCases() {
  const { body } = await request("/api/cases");
  state.cases = body.cases;
  const list = document.getElementById("case-list");
  list.replaceChildren(...state.cases.map((c, i) => {
    const item = document.createElement("li");
    item.textContent = c.case_id + (c.status ? ` (${c.status})` : "");
    item.className = c.status ? `status-${c.status}` : "";
    item.dataset.caseId = c.case_id;
    item.addEventListener("click", () => openCase(i));
    return item;
  }));
  if (state.cases.length) await openCase(0);
}

async function openCase(index) {
  if (index < 0 || index >= state.cases.length) return;
  state.index = index;
  const caseId = state.cases[index].case_id;
  const { ok, body } = await request(`/api/cases/${encodeURIComponent(caseId)}`);
  if (!ok) { saveState(body.error, true); return; }
  state.data = body; state.version = body.version; state.undo = [];
  state.points = body.points_mm.map((p) => (p ? [...p] : null));
  state.selected = 0; state.range = [...body.window]; state.window = [...body.window];
  document.querySelectorAll("#case-list li").forEach((li, i) => li.classList.toggle("current", i === index));
  document.getElementById("case-title").textContent = caseId;
  document.getElementById("case-status").textContent = body.status || "";
  document.getElementById("case-status").className = body.status ? `status-${body.status}` : "";
  document.getElementById("reasons").textContent = (body.reasons || []).join("; ");
  setWindowSliders();
  buildViewers();
  saveState(body.corrected ? "corrected earlier" : "prediction", false);
  landmarkList();
  if (body.ndim === 3) refocus(state.points.find((p) => p) || body.centre_mm);
  else state.viewers[0].show(body.view, pictureUrl());
}

function buildViewers() {
  const views = document.getElementById("views");
  const planes = state.data.ndim === 3 ? ["axial", "coronal", "sagittal"] : [null];
  views.replaceChildren();
  state.viewers = planes.map((plane) => {
    const canvas = document.createElement("canvas");
    canvas.id = plane ? `view-${plane}` : "view-image";
    views.appendChild(canvas);
    return new Viewer(canvas, plane);
  });
}

function pictureUrl(plane) {
  const caseId = encodeURIComponent(state.data.case_id);
  const [low, high] = state.window;
  let url = `/api/cases/${caseId}/picture.png?low=${low}&high=${high}`;
  if (plane) url += `&plane=${plane}&point=${state.focus.join(",")}`;
  return url;
}

async function refocus(point) {
  if (state.data.ndim !== 3) return;
  state.focus = [...point];
  const caseId = encodeURIComponent(state.data.case_id);
  const { ok, body } = await request(`/api/cases/${caseId}/slices?point=${state.focus.join(",")}`);
  if (!ok) { saveState(body.error, true); return; }
  state.viewers.forEach((viewer) => viewer.show(body[viewer.plane], pictureUrl(viewer.plane)));
}

function redraw() { state.viewers.forEach((v) => v.draw()); landmarkList(); }

async function commit(before) {
  state.undo.push(before);
  redraw();
  await save();
}

async function save() {
  const caseId = encodeURIComponent(state.data.case_id);
  saveState("saving...", false);
  const { ok, status, body } = await request(`/api/cases/${caseId}/landmarks`, {
    method: "PUT",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ version: state.version, points_mm: state.points }),
  });
  if (ok) { state.version = body.version; state.saves += 1; saveState("saved", false); return; }
  if (status === 409) {
    saveState(`not saved: ${body.error}`, true);
    return;
  }
  saveState(`not saved: ${body ? body.error : status}`, true);
}

function saveState(text, error) {
  const element = document.getElementById("save-state");
  element.textContent = text; element.classList.toggle("error", error);
}

function select(k, follow = true) {
  state.selected = k;
  redraw();
  if (follow && state.data.ndim === 3 && state.points[k]) refocus(state.points[k]);
}

function landmarkList() {
  const list = document.getElementById("landmark-list");
  list.replaceChildren(...state.data.names.map((name, k) => {
    const item = document.createElement("li");
    const confidence = state.data.confidence && state.data.confidence[k];
    item.textContent = name + (confidence !== null && confidence !== undefined ? ` ${confidence.toFixed(2)}` : "");
    item.classList.toggle("selected", k === state.selected);
    item.classList.toggle("missing", !state.points[k]);
    item.addEventListener("click", () => select(k));
    return item;
  }));
  document.getElementById("toggle-missing").textContent = state.points[state.selected] ? "mark missing" : "mark present";
}

function toggleMissing() {
  const k = state.selected, before = state.points.map((p) => (p ? [...p] : null));
  if (state.points[k]) {
    state.points[k] = null;
  } else {
    const recorded = state.data.recorded_mm && state.data.recorded_mm[k];
    const original = state.data.points_mm[k];
    state.points[k] = [...(original || recorded || state.focus || state.data.centre_mm)];
  }
  commit(before);
}

function undo() {
  if (!state.undo.length) return;
  state.points = state.undo.pop();
  redraw();
  save();
}

function nextDoubtful() {
  const confidence = state.data.confidence || state.points.map(() => 0);
  const order = state.data.names.map((_, k) => k)
    .sort((a, b) => (confidence[a] ?? 0) - (confidence[b] ?? 0));
  const position = order.indexOf(state.selected);
  select(order[(position + 1) % order.length]);
}

function setWindowSliders() {
  const [low, high] = state.range, span = high - low || 1;
  const sliders = [document.getElementById("window-low"), document.getElementById("window-high")];
  const lowEnd = low - span / 2, highEnd = high + span / 2;
  sliders.forEach((slider, i) => {
    slider.dataset.low = lowEnd; slider.dataset.high = highEnd;
    slider.value = String(Math.round(((i ? high : low) - lowEnd) / (highEnd - lowEnd) * 1000));
  });
}

function windowChanged() {
  const sliders = [document.getElementById("window-low"), document.getElementById("window-high")];
  const values = sliders.map((s) => Number(s.dataset.low) + Number(s.value) / 1000 * (Number(s.dataset.high) - Number(s.dataset.low)));
  state.window = [Math.min(...values), Math.max(...values)];
  if (state.data.ndim === 3) refocus(state.focus);
  else state.viewers[0].show(state.data.view, pictureUrl());
}

document.getElementById("prev-case").addEventListener("click", () => openCase(state.index - 1));
document.getElementById("next-case").addEventListener("click", () => openCase(state.index + 1));
document.getElementById("next-doubtful").addEventListener("click", nextDoubtful);
document.getElementById("toggle-missing").addEventListener("click", toggleMissing);
document.getElementById("undo").addEventListener("click", undo);
document.getElementById("window-low").addEventListener("change", windowChanged);
document.getElementById("window-high").addEventListener("change", windowChanged);
window.addEventListener("resize", () => state.viewers.forEach((v) => { v.fit(); v.draw(); }));
document.addEventListener("keydown", (event) => {
  if (event.target.tagName === "INPUT") return;
  if ((event.ctrlKey || event.metaKey) && event.key === "z") { event.preventDefault(); undo(); return; }
  const keys = { n: () => openCase(state.index + 1), p: () => openCase(state.index - 1), d: nextDoubtful, m: toggleMissing };
  if (keys[event.key.toLowerCase()]) keys[event.key.toLowerCase()]();
});

// for the browser tests: where a landmark is drawn, and the editor's state
window.review = {
  state,
  screenPosition(k, plane = null) {
    const viewer = state.viewers.find((v) => v.plane === plane);
    const rect = viewer.canvas.getBoundingClientRect();
    const [x, y] = viewer.screenOf(state.points[k]);
    return { x: rect.left + x, y: rect.top + y, zoom: viewer.zoom, pixelMm: Math.hypot(...viewer.view.column_mm) };
  },
};

loadCases();

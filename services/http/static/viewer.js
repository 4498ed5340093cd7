// SMILY viewer: slides, a region query, a gallery of hits and the tools to steer it.
// Plain JS over the HTTP/JSON API (/v1, protobuf JSON) and IIIF tiles (/iiif/3).
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE_SIZE = 12;
const K = 60;
const SLIDE_PAGE = 50; // slides listed (or found) per page

const state = {
  token: null, // OIDC access token, in memory only
  viewSession: "", // minted by the server with the open slide's info.json; its tiles are audited as one session
  slides: [], // the slides listed so far (pages of the list, or of what the search box found)
  slidesNext: "", // the next page's token; "" after the last
  caseKey: "case_id", // slide metadata key naming the case (SMILY_CASE_KEY, from GetIndexInfo)
  searchKeys: [], // the metadata keys the search box finds slides by
  slide: null, // {slideId, metadata, width, height}
  tenant: "", // the caller's (issue 24)
  query: null, // {region} or {image}
  queryLabel: "",
  positives: [], // Examples: {region}
  negatives: [],
  concepts: {}, // name -> weight
  pageTokens: [""],
  page: 0,
  selection: null, // the query region on the open slide: {x, y, width, height[, polygon]}
  items: [], // the gallery as rendered: [{hit, slideScore}]
  labelStats: null,
  searchId: "",
  atHit: false, // viewing a hit opened from the gallery ("Back to results" returns)
  slideMpp: 0, // µm per level-0 pixel of the open slide (0: unknown)
  mode: "search", // what the gallery shows: "search" (paged hits) or "slides" (similar slides)
};
// A hit scoring below this (cosine similarity) is marked "weak" (explained on the page).
const WEAK_SCORE = 0.5;
window.smily = { state, timings: [] };

// -- API --------------------------------------------------------------------
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.viewSession) h["X-Smily-View-Session"] = state.viewSession;
  if (state.token) h.Authorization = "Bearer " + state.token;
  return h;
}

async function api(method, path, body) {
  // POSTs are always JSON (the server refuses other content types).
  const opts = { method, headers: headers(method === "POST" ? { "Content-Type": "application/json" } : {}) };
  if (method === "POST") opts.body = JSON.stringify(body || {});
  return answer(await fetch(path, opts));
}

async function answer(resp) {
  const doc = await resp.json().catch(() => ({ code: "UNAVAILABLE", message: resp.statusText }));
  if (!resp.ok) {
    if (resp.status === 401 && userManager) $("login").hidden = false;
    throw new Error(`${doc.code}: ${doc.message}`);
  }
  return doc;
}

function say(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", !!isError);
}

function iiif(slideId) {
  return "/iiif/3/" + encodeURIComponent(slideId);
}

// -- login (only when the server names an OIDC issuer) -----------------------
let userManager = null;

async function setupLogin() {
  const config = await (await fetch("/viewer/config.json")).json();
  if (!config.oidc) return;
  userManager = new oidc.UserManager({
    authority: config.oidc.authority,
    client_id: config.oidc.client_id,
    scope: config.oidc.scope,
    redirect_uri: location.origin + location.pathname,
    response_type: "code", // authorization code with PKCE (the library's default for code)
    userStore: new oidc.WebStorageStateStore({ store: new oidc.InMemoryWebStorage() }),
  });
  userManager.events.addUserLoaded((user) => { state.token = user.access_token; });
  $("login").hidden = false;
  $("login").onclick = () => userManager.signinRedirect();
  const params = new URLSearchParams(location.search);
  if (params.has("code") && params.has("state")) {
    const user = await userManager.signinRedirectCallback();
    state.token = user.access_token;
    history.replaceState(null, "", location.pathname);
    $("login").hidden = true;
    // Who is signed in, from the ID token the IdP returned with the code.
    $("caller").textContent = "Signed in as " + (user.profile.name || user.profile.sub);
  }
}

// -- slides ------------------------------------------------------------------
// Issue 24: the caller's tenant in the header; another (granted) tenant's slides are labelled.
async function loadTenant() {
  const info = await api("GET", "/v1/index");
  state.tenant = info.tenant || "";
  $("tenant").textContent = state.tenant ? "Tenant: " + state.tenant : "";
  state.caseKey = info.caseKey || state.caseKey;
  state.searchKeys = info.slideSearchKeys || [];
  $("case-key").textContent = `(${state.caseKey})`;
  if (state.searchKeys.length) $("slide-find-keys").textContent = state.searchKeys.join(", ");
}

function tenantLabel(tenant) {
  const label = document.createElement("span");
  label.className = "tenant";
  label.textContent = tenant;
  label.title = "a slide of tenant " + tenant + ", granted to yours";
  return label;
}

// The search box: "text" finds slides whose searchable metadata starts with it, "key=text" under
// that searchable key alone. The gateway finds them (paged, within the caller's tenants).
function findTerms() {
  const text = $("slide-find").value.trim();
  const i = text.indexOf("=");
  if (i > 0 && state.searchKeys.includes(text.slice(0, i).trim())) {
    return { metadataKey: text.slice(0, i).trim(), metadataQuery: text.slice(i + 1).trim() };
  }
  return text ? { metadataQuery: text } : {};
}

let slideRequest = 0; // the latest; an answer to an earlier one (the box changed since) is dropped

// The first page of the list (or of what the box finds), or with `more` the next one.
async function loadSlides(more) {
  const mine = ++slideRequest;
  const q = new URLSearchParams(Object.assign({ pageSize: String(SLIDE_PAGE) }, findTerms()));
  if (more) q.set("pageToken", state.slidesNext);
  const page = await api("GET", "/v1/slides?" + q);
  if (mine !== slideRequest) return;
  state.slides = more ? state.slides.concat(page.slides) : page.slides;
  state.slidesNext = page.nextPageToken || "";
  renderSlides();
}

function filterTerms() {
  const pairs = {};
  for (const t of $("slide-filter").value.trim().split(/\s+/).filter(Boolean)) {
    const i = t.indexOf("=");
    if (i > 0) pairs[t.slice(0, i)] = t.slice(i + 1);
  }
  return { pairs };
}

const slideThumbs = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (!e.isIntersecting) continue;
    slideThumbs.unobserve(e.target);
    loadThumb(e.target);
  }
}, { rootMargin: "200px" });

function renderSlides() {
  const list = $("slide-list");
  list.replaceChildren();
  $("more-slides").hidden = !state.slidesNext;
  if (!state.slides.length) {
    const li = document.createElement("li");
    li.textContent = $("slide-find").value.trim() ? "No slide matches." : "No slides yet.";
    list.append(li);
  }
  for (const s of state.slides) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.slideId = s.slideId;
    const thumb = document.createElement("img");
    thumb.alt = "";
    thumb.className = "thumb";
    thumb.dataset.src = `${iiif(s.slideId)}/full/!64,64/0/default.jpg`;
    slideThumbs.observe(thumb);
    b.append(thumb, s.slideId);
    if (s.tenant && s.tenant !== state.tenant) b.prepend(tenantLabel(s.tenant));
    const meta = document.createElement("small");
    meta.textContent = Object.entries(s.metadata || {}).map(([k, v]) => `${k}=${v}`).join(", ");
    b.append(meta);
    if (state.slide && state.slide.slideId === s.slideId) b.setAttribute("aria-current", "true");
    b.onclick = () => navigate({ slideId: s.slideId });
    li.append(b);
    list.append(li);
  }
}

// -- viewer ------------------------------------------------------------------
const viewer = OpenSeadragon({
  element: $("viewer"),
  prefixUrl: "/vendor/openseadragon/images/",
  showNavigator: true,
  loadTilesWithAjax: true, // so tile requests carry the token and view session
  ajaxHeaders: headers(),
  gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: false },
});
window.smily.viewer = viewer;
const SVG_NS = "http://www.w3.org/2000/svg";
// One SVG over the whole image, in level-0 pixels: the query region, hit outlines, the heatmap.
let layer = null;

function svgEl(name, attrs) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

function makeLayer() {
  const { width, height } = state.slide;
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", class: "layer" });
  layer = {
    svg,
    heat: svgEl("g", { class: "heatmap" }),
    hits: svgEl("g", { class: "hit-outlines" }),
    selection: svgEl("g", { class: "selection" }),
  };
  svg.append(layer.heat, layer.hits, layer.selection);
  viewer.addOverlay(svg, new OpenSeadragon.Rect(0, 0, 1, height / width));
}

function rectPoints(r) {
  return [[r.x, r.y], [r.x + r.width, r.y], [r.x + r.width, r.y + r.height], [r.x, r.y + r.height]];
}

function shape(group, points, cls, data) {
  const el = svgEl("polygon", { points: points.map((p) => p.join(",")).join(" "), class: cls,
                                "vector-effect": "non-scaling-stroke" });
  Object.assign(el.dataset, data || {});
  group.append(el);
  return el;
}

// Where the viewer looks: the image point at the centre and OpenSeadragon's zoom.
function viewport() {
  if (!state.slide || !viewer.world.getItemCount()) return null;
  const c = viewer.viewport.viewportToImageCoordinates(viewer.viewport.getCenter(true));
  return { x: Math.round(c.x), y: Math.round(c.y), zoom: Number(viewer.viewport.getZoom(true).toPrecision(4)) };
}

function setViewport(v) {
  viewer.viewport.zoomTo(v.zoom, null, true);
  viewer.viewport.panTo(viewer.viewport.imageToViewportCoordinates(v.x, v.y), true);
}

// The slide's info.json, with a fresh view session for its tiles.
async function slideInfo(slideId) {
  const resp = await fetch(iiif(slideId) + "/info.json", { headers: headers() });
  const info = await answer(resp);
  state.viewSession = resp.headers.get("X-Smily-View-Session") || "";
  viewer.setAjaxHeaders(headers()); // the open image's (and the navigator's) next tiles carry it too
  return info;
}

// Sessions are short-lived: renew the open slide's while it stays open.
let renewal = null;

// Opens a slide (when not open already) and draws what belongs on it.
async function showSlide(slideId) {
  if (state.slide && state.slide.slideId === slideId && viewer.world.getItemCount()) return;
  say("Opening " + slideId + "…");
  const [info, meta] = await Promise.all([
    slideInfo(slideId),
    api("GET", "/v1/slides/" + encodeURIComponent(slideId)).catch(() => null),
  ]);
  clearInterval(renewal);
  renewal = setInterval(() => slideInfo(slideId).catch(() => {}), 60000);
  const slide = state.slides.find((s) => s.slideId === slideId) || (meta && meta.slide) || { slideId, metadata: {} };
  state.slide = Object.assign({}, slide, { width: info.width, height: info.height });
  state.slideMpp = meta ? Number(meta.mpp) || 0 : 0;
  viewer.clearOverlays();
  await new Promise((resolve) => {
    viewer.addOnceHandler("open", resolve);
    viewer.open(info);
  });
  makeLayer();
  $("first-screen").hidden = true;
  $("search-slides").disabled = false;
  $("heatmap").disabled = !state.query;
  renderSlides();
}

function drawSelection() {
  if (!layer) return;
  layer.selection.replaceChildren();
  const sel = state.selection;
  if (!sel || !state.slide || sel.slideId !== state.slide.slideId) return;
  shape(layer.selection, sel.polygon ? sel.polygon.map((p) => [p.x, p.y]) : rectPoints(sel), "query-region");
}

// This slide's hits as outlines; the hit opened from the gallery stands out.
function drawHits(focus) {
  if (!layer) return;
  layer.hits.replaceChildren();
  for (const { hit } of state.items) {
    if (hit.slideId !== state.slide.slideId) continue;
    const r = { x: Number(hit.x), y: Number(hit.y), width: Number(hit.width), height: Number(hit.height) };
    const isFocus = focus && focus.x === r.x && focus.y === r.y;
    shape(layer.hits, rectPoints(r), isFocus ? "hit-outline focus" : "hit-outline", { x: r.x, y: r.y });
  }
  if (focus && !layer.hits.querySelector(".focus")) {
    shape(layer.hits, rectPoints(focus), "hit-outline focus", { x: focus.x, y: focus.y });
  }
}

// -- scale bar and magnification (OpenSeadragon's scalebar pattern) ----------------
function updateScale() {
  const bar = $("scale-bar");
  if (!state.slide || !viewer.world.getItemCount()) { bar.hidden = true; return; }
  const screenPerImage = viewer.viewport.viewportToImageZoom(viewer.viewport.getZoom(true));
  const mpp = state.slideMpp;
  $("scale-readout").textContent = mpp
    ? `${(mpp / screenPerImage).toPrecision(3)} µm/px on screen · ≈${(10 / (mpp / screenPerImage)).toPrecision(2)}× · `
      + `slide ${mpp.toPrecision(3)} µm/px`
    : "µm/px unknown (the slide records none)";
  if (!mpp) { bar.hidden = true; return; }
  const umPerScreenPx = mpp / screenPerImage;
  const target = 120 * umPerScreenPx; // µm across ~120 screen pixels, rounded to 1, 2 or 5 × 10^n
  const p = 10 ** Math.floor(Math.log10(target));
  const um = [5, 2, 1].map((m) => m * p).find((v) => v <= target) || p;
  bar.hidden = false;
  $("scale-line").style.width = `${um / umPerScreenPx}px`;
  $("scale-text").textContent = um >= 1000 ? `${um / 1000} mm` : `${um} µm`;
}
viewer.addHandler("update-viewport", updateScale);

// -- query tools: rectangle, polygon, freehand -------------------------------------
let tool = null; // "rect" | "polygon" | "freehand" while one is active
let draft = null; // points (level-0) of the shape being drawn
let draftEl = null;
const TOOLS = { rect: "draw", polygon: "draw-polygon", freehand: "draw-freehand" };

function setTool(name) {
  tool = name;
  for (const [t, id] of Object.entries(TOOLS)) $(id).setAttribute("aria-pressed", String(t === name));
  viewer.setMouseNavEnabled(!name);
  draft = null;
  if (draftEl) { draftEl.remove(); draftEl = null; }
  if (name === "polygon") say("Click the vertices; double-click, Enter or click the first vertex to close; Esc cancels");
}

for (const [t, id] of Object.entries(TOOLS)) $(id).onclick = () => setTool(tool === t ? null : t);

function imagePoint(pos) {
  const p = viewer.viewport.viewerElementToImageCoordinates(pos);
  return [Math.round(p.x), Math.round(p.y)];
}

function drawDraft(points, closed) {
  if (!layer) return;
  if (!draftEl) {
    draftEl = svgEl(closed ? "polygon" : "polyline", { class: "draft", "vector-effect": "non-scaling-stroke" });
    layer.selection.append(draftEl);
  }
  draftEl.setAttribute("points", points.map((p) => p.join(",")).join(" "));
}

function bbox(points) {
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const x = Math.max(0, Math.min(...xs));
  const y = Math.max(0, Math.min(...ys));
  return { x, y, width: Math.max(...xs) - x, height: Math.max(...ys) - y };
}

function finishPolygon(points) {
  const clipped = points.map(([x, y]) => [Math.max(0, x), Math.max(0, y)]);
  const b = bbox(clipped);
  setTool(null);
  if (clipped.length < 3 || b.width < 8 || b.height < 8) return say("Too small a region", true);
  select(Object.assign(b, { polygon: clipped.map(([x, y]) => ({ x, y })) }));
}

new OpenSeadragon.MouseTracker({
  element: viewer.canvas,
  pressHandler: (e) => {
    if (tool === "rect" || tool === "freehand") draft = [imagePoint(e.position)];
  },
  dragHandler: (e) => {
    if (!draft || !(tool === "rect" || tool === "freehand")) return;
    const p = imagePoint(e.position);
    if (tool === "rect") {
      draft[1] = p;
      const b = bbox(draft);
      drawDraft(rectPoints(b), true);
    } else {
      draft.push(p);
      drawDraft(draft, false);
    }
  },
  releaseHandler: (e) => {
    if (!draft || !(tool === "rect" || tool === "freehand")) return;
    const points = draft.concat([imagePoint(e.position)]);
    if (tool === "rect") {
      const b = bbox(points);
      setTool(null);
      select(b);
    } else {
      finishPolygon(points);
    }
  },
  clickHandler: (e) => {
    if (tool !== "polygon") return;
    const p = imagePoint(e.position);
    draft = draft || [];
    const first = draft[0];
    const near = first && viewer.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(...first))
      .distanceTo(e.position) < 8;
    if (near && draft.length >= 3) return finishPolygon(draft);
    draft.push(p);
    drawDraft(draft, false);
  },
  dblClickHandler: () => {
    if (tool === "polygon" && draft && draft.length >= 3) finishPolygon(draft);
  },
});

document.addEventListener("keydown", (e) => {
  if (!tool) return;
  if (e.key === "Escape") setTool(null);
  if (e.key === "Enter" && tool === "polygon" && draft && draft.length >= 3) finishPolygon(draft);
});

function select(r) {
  r.x = Math.max(0, Math.round(r.x));
  r.y = Math.max(0, Math.round(r.y));
  r.width = Math.round(r.width);
  r.height = Math.round(r.height);
  if (r.width < 8 || r.height < 8) return;
  state.selection = Object.assign({ slideId: state.slide.slideId }, r);
  drawSelection();
  const region = { slideId: state.slide.slideId, x: r.x, y: r.y, width: r.width, height: r.height };
  if (r.polygon) region.polygon = r.polygon;
  setQuery({ region }, `${r.polygon ? "polygon" : "region"} ${r.x},${r.y} ${r.width}×${r.height} of ${state.slide.slideId}`);
}

$("select-centre").onclick = () => {
  if (!state.slide) return say("Open a slide first", true);
  const b = viewer.viewport.viewportToImageRectangle(viewer.viewport.getBounds());
  const side = Math.min(b.width, b.height) / 3;
  select({ x: b.x + b.width / 2 - side / 2, y: b.y + b.height / 2 - side / 2, width: side, height: side });
};

$("upload").onchange = async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  const data = new Uint8Array(await file.arrayBuffer());
  let bin = "";
  for (let i = 0; i < data.length; i += 0x8000) bin += String.fromCharCode(...data.subarray(i, i + 0x8000));
  // The patch replaces the region query: its box leaves the slide, its preview shows what is searched.
  state.selection = null;
  drawSelection();
  $("upload-preview").src = URL.createObjectURL(file);
  $("upload-preview").hidden = false;
  $("upload-name").textContent = file.name;
  setQuery({ image: btoa(bin) }, "uploaded patch " + file.name);
};

function setQuery(query, label) {
  state.query = query;
  state.queryLabel = label;
  $("query-label").textContent = label;
  $("search").disabled = false;
  $("heatmap").disabled = !state.slide;
  if (!query.image) { $("upload-preview").hidden = true; $("upload-name").textContent = "No file chosen"; }
}

// -- refine --------------------------------------------------------------------
async function loadConcepts() {
  const { concepts } = await api("GET", "/v1/concepts");
  const box = $("concepts");
  box.replaceChildren();
  for (const c of concepts) {
    const div = document.createElement("div");
    div.className = "concept";
    const id = "concept-" + c.name;
    const label = document.createElement("label");
    label.htmlFor = id;
    const out = document.createElement("output");
    out.textContent = "0";
    label.append(`Concept ${c.name}: `, out);
    const slider = document.createElement("input");
    Object.assign(slider, { type: "range", id, min: "-1", max: "1", step: "0.1", value: "0" });
    slider.dataset.concept = c.name;
    slider.oninput = () => { out.textContent = slider.value; };
    slider.onchange = () => {
      const w = Number(slider.value);
      if (w) state.concepts[c.name] = w; else delete state.concepts[c.name];
      if (state.query) search(true);
    };
    div.append(label, slider);
    box.append(div);
  }
}

$("max-per-slide").onchange = () => state.query && search(true);
$("exclude-case").onchange = () => state.query && search(true);
$("clear-examples").onclick = () => {
  state.positives = [];
  state.negatives = [];
  renderExamples();
  if (state.query) search(true);
};

function renderExamples() {
  $("examples").textContent = state.positives.length || state.negatives.length
    ? `${state.positives.length} more like this, ${state.negatives.length} less like this` : "";
}

function sameTile(a, b) {
  return a.slideId === b.slideId && String(a.x) === String(b.x) && String(a.y) === String(b.y);
}

// -- search --------------------------------------------------------------------
function queryRequest() {
  const req = Object.assign({}, state.query, {
    positives: state.positives,
    negatives: state.negatives, // the gateway leaves their tiles out, so pages stay full
    concepts: Object.entries(state.concepts).map(([name, weight]) => ({ name, weight })),
    filters: filterTerms().pairs,
  });
  if ($("exclude-case").checked && state.query.region) req.excludeQueryCase = true;
  return req;
}

function searchRequest() {
  return Object.assign(queryRequest(), {
    k: K,
    pageSize: PAGE_SIZE,
    pageToken: state.pageTokens[state.page],
    maxHitsPerSlide: Number($("max-per-slide").value) || 0,
  });
}

async function search(fresh) {
  if (fresh) { state.pageTokens = [""]; state.page = 0; }
  performance.mark("search-start");
  say("Searching…");
  try {
    const resp = await api("POST", "/v1/search", searchRequest());
    state.pageTokens[state.page + 1] = resp.nextPageToken;
    state.searchId = resp.searchId;
    state.labelStats = resp.labelStats || null;
    state.mode = "search";
    showResults(resp.hits.map((h) => ({ hit: h })));
    afterPaint(() => {
      performance.mark("gallery-painted");
      const m = performance.measure("search-to-paint", "search-start", "gallery-painted");
      window.smily.timings.push(m.duration);
    });
    say(`${resp.hits.length} hits for ${state.queryLabel}${resp.cached ? " (cached query)" : ""}`);
    remember();
  } catch (err) {
    say(err.message, true);
  }
}

function showResults(items) {
  state.items = items;
  renderHits(items);
  renderLabels();
  drawHits(null);
  const paged = state.mode === "search";
  $("prev-page").disabled = !paged || state.page === 0;
  $("next-page").disabled = !paged || !state.pageTokens[state.page + 1];
  $("page-label").textContent = paged ? `page ${state.page + 1}` : "";
  $("export").disabled = !(paged && state.searchId);
}

function afterPaint(fn) {
  requestAnimationFrame(() => setTimeout(fn, 0));
}

$("search").onclick = () => search(true);
$("prev-page").onclick = () => { state.page -= 1; search(false); };
$("next-page").onclick = () => { state.page += 1; search(false); };

$("search-slides").onclick = async () => {
  say("Searching similar slides…");
  try {
    const resp = await api("POST", "/v1/slides:searchSlides",
                           { slideId: state.slide.slideId, k: 10, excludeQuerySlide: true });
    const items = [];
    for (const s of resp.slides) for (const r of s.regions) items.push({ hit: r, slideScore: s.score });
    state.mode = "slides";
    state.labelStats = null;
    showResults(items);
    say(`${resp.slides.length} slides like ${state.slide.slideId}`);
    remember();
  } catch (err) {
    say(err.message, true);
  }
};

// -- suggested diagnosis, with care: the labels of the top-k hits --------------------
function renderLabels() {
  const box = $("label-stats");
  const st = state.labelStats;
  box.hidden = !(st && st.key);
  if (box.hidden) return;
  $("label-key").textContent = st.key;
  $("label-k").textContent = st.k;
  $("label-majority").textContent = st.majority || "none";
  const body = $("label-rows");
  body.replaceChildren();
  for (const l of st.labels) {
    const tr = document.createElement("tr");
    for (const v of [l.label || "(unlabelled)", String(l.count), `${Math.round(l.scoreShare * 100)}%`]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.append(td);
    }
    body.append(tr);
  }
}

// -- heatmap: the query's score over every indexed tile of the open slide ------------
function heatColour(t) {
  // Dark blue (low) to yellow (high), readable over H&E.
  const stops = [[49, 54, 149], [69, 117, 180], [116, 173, 209], [254, 224, 144], [253, 174, 97], [215, 48, 39]];
  const f = Math.min(1, Math.max(0, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(f));
  const c = stops[i].map((v, j) => Math.round(v + (stops[i + 1][j] - v) * (f - i)));
  return `rgb(${c.join(",")})`;
}

async function heatmap() {
  if (!state.slide || !state.query) return;
  if (layer.heat.childElementCount) return clearHeatmap();
  performance.mark("heatmap-start");
  say("Scoring every tile of " + state.slide.slideId + "…");
  try {
    const resp = await api("POST", `/v1/slides/${encodeURIComponent(state.slide.slideId)}:heatmap`,
                           { search: queryRequest() });
    const lo = resp.minScore;
    const span = (resp.maxScore - lo) || 1;
    layer.heat.replaceChildren();
    for (const t of resp.tiles) {
      const rect = svgEl("rect", { x: t.x, y: t.y, width: t.width, height: t.height,
                                   fill: heatColour((t.score - lo) / span), "data-score": t.score.toFixed(4) });
      layer.heat.append(rect);
    }
    $("legend-low").textContent = lo.toFixed(2);
    $("legend-high").textContent = resp.maxScore.toFixed(2);
    $("legend-note").textContent = `${resp.tiles.length} tiles${resp.truncated ? " (the best; the slide has more)" : ""}`;
    $("heatmap-legend").hidden = false;
    $("heatmap").setAttribute("aria-pressed", "true");
    afterPaint(() => {
      performance.mark("heatmap-painted");
      window.smily.heatmapTimings.push(performance.measure("heatmap", "heatmap-start", "heatmap-painted").duration);
    });
    say(`Heatmap of ${resp.tiles.length} tiles on ${state.slide.slideId}`);
  } catch (err) {
    say(err.message, true);
  }
}

function clearHeatmap() {
  if (layer) layer.heat.replaceChildren();
  $("heatmap-legend").hidden = true;
  $("heatmap").setAttribute("aria-pressed", "false");
}
window.smily.heatmapTimings = [];
$("heatmap").onclick = heatmap;

// -- export ---------------------------------------------------------------------------
$("export").onclick = async () => {
  const q = new URLSearchParams({ format: "geojson" });
  const onSlide = state.slide && state.items.some((i) => i.hit.slideId === state.slide.slideId);
  if (onSlide) q.set("slideId", state.slide.slideId);
  const resp = await fetch(`/v1/searches/${state.searchId}/export?${q}`, { headers: headers() });
  if (!resp.ok) return say((await resp.json()).message, true);
  const a = document.createElement("a");
  a.href = URL.createObjectURL(await resp.blob());
  a.download = `smily-${state.searchId.slice(0, 8)}${onSlide ? "-" + state.slide.slideId : ""}.geojson`;
  a.click();
  say("Exported the hits" + (onSlide ? " on " + state.slide.slideId : "") + " as GeoJSON (QuPath: File › Import objects)");
};

// -- gallery -----------------------------------------------------------------
const lazy = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (!e.isIntersecting) continue;
    lazy.unobserve(e.target);
    loadThumb(e.target);
  }
}, { root: $("results-panel"), rootMargin: "200px" });

async function loadThumb(img) {
  // Through fetch, so the request carries the token like the tiles do.
  const resp = await fetch(img.dataset.src, { headers: headers() });
  if (resp.ok) img.src = URL.createObjectURL(await resp.blob());
}

function renderHits(items) {
  const gallery = $("gallery");
  gallery.replaceChildren();
  const groups = new Map();
  for (const item of items) {
    const id = (item.hit.tenant || "") + "/" + item.hit.slideId; // the same id in two tenants: two slides
    if (!groups.has(id)) groups.set(id, []);
    groups.get(id).push(item);
  }
  for (const group of groups.values()) {
    const slideId = group[0].hit.slideId;
    const section = document.createElement("section");
    section.className = "slide-group";
    const h = document.createElement("h3");
    const meta = Object.entries(group[0].hit.metadata || {}).map(([k, v]) => `${k}=${v}`).join(", ");
    const small = document.createElement("small");
    small.textContent = (group[0].slideScore !== undefined ? ` slide score ${group[0].slideScore.toFixed(3)} · ` : " ")
      + meta;
    const tenant = group[0].hit.tenant;
    if (tenant && tenant !== state.tenant) h.append(tenantLabel(tenant));
    h.append(slideId, small);
    const grid = document.createElement("div");
    grid.className = "hits";
    for (const { hit } of group) grid.append(hitCard(hit));
    section.append(h, grid);
    gallery.append(section);
  }
  if (!items.length) gallery.textContent = "No hits.";
}

function hitCard(hit) {
  const fig = document.createElement("figure");
  fig.className = "hit";
  Object.assign(fig.dataset, { slideId: hit.slideId, x: hit.x, y: hit.y, width: hit.width, height: hit.height,
                               score: hit.score.toFixed(4) });
  const region = { slideId: hit.slideId, x: hit.x, y: hit.y, width: hit.width, height: hit.height };
  const rect = { x: Number(hit.x), y: Number(hit.y), width: Number(hit.width), height: Number(hit.height) };
  const weak = hit.score < WEAK_SCORE;
  if (weak) fig.classList.add("weak");
  if (state.positives.some((p) => sameTile(p.region, hit))) fig.classList.add("positive");
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.setAttribute("aria-label", `Open ${hit.slideId} at ${hit.x},${hit.y}, score ${hit.score.toFixed(3)}`);
  const img = document.createElement("img");
  img.alt = "";
  img.dataset.src = `${iiif(hit.slideId)}/${hit.x},${hit.y},${hit.width},${hit.height}/128,/0/default.jpg`;
  lazy.observe(img);
  open.append(img);
  open.onclick = () => navigate({ slideId: hit.slideId, hit: rect });
  const cap = document.createElement("figcaption");
  // "+" and "−" add the hit to the positive or negative examples and search again.
  const feedback = (className, text, label, key) => {  // key into state, read at click time
    const b = document.createElement("button");
    b.type = "button";
    b.className = className;
    b.textContent = text;
    b.setAttribute("aria-label", `${label} (${hit.slideId} ${hit.x},${hit.y})`);
    b.onclick = () => {
      state[key].push({ region });
      renderExamples();
      search(true);
    };
    return b;
  };
  const more = feedback("more", "+", "More like this", "positives");
  const less = feedback("less", "−", "Less like this", "negatives");
  const score = document.createElement("meter");
  Object.assign(score, { min: 0, max: 1, low: WEAK_SCORE, high: 0.8, optimum: 1, value: Math.max(0, hit.score) });
  score.setAttribute("aria-label", `score ${hit.score.toFixed(3)}${weak ? ", weak" : ""}`);
  const value = document.createElement("span");
  value.className = "score";
  value.textContent = hit.score.toFixed(3) + (weak ? " weak" : "");
  cap.append(more, score, value, less);
  const facts = document.createElement("small");
  facts.className = "facts";
  const md = hit.metadata || {};
  facts.textContent = `${hit.x},${hit.y} · ${Number(hit.mpp || 0).toFixed(2)} µm/px`
    + (md[state.caseKey] ? ` · case ${md[state.caseKey]}` : "");
  const compare = document.createElement("button");
  compare.type = "button";
  compare.className = "compare";
  compare.textContent = "Compare";
  compare.setAttribute("aria-label", `Compare with the query (${hit.slideId} ${hit.x},${hit.y})`);
  compare.disabled = !(state.query && state.query.region);
  compare.onclick = () => openCompare(rect, hit.slideId);
  fig.append(open, cap, facts, compare);
  return fig;
}

// -- compare: query and hit side by side, pan and zoom locked together ------------------
let compareViewers = null;

async function openCompare(hitRect, hitSlide) {
  const q = state.query.region;
  $("compare").hidden = false;
  const make = (id) => OpenSeadragon({ element: $(id), prefixUrl: "/vendor/openseadragon/images/",
                                       loadTilesWithAjax: true, ajaxHeaders: headers(), showNavigationControl: false });
  if (!compareViewers) compareViewers = { left: make("compare-query"), right: make("compare-hit") };
  const { left, right } = compareViewers;
  const mppOf = (id) => api("GET", "/v1/slides/" + encodeURIComponent(id)).then((r) => Number(r.mpp) || 1, () => 1);
  const [qi, hi, qmpp, hmpp] = await Promise.all([api("GET", iiif(q.slideId) + "/info.json"),
    api("GET", iiif(hitSlide) + "/info.json"), mppOf(q.slideId), mppOf(hitSlide)]);
  const opened = (v, info) => new Promise((resolve) => { v.addOnceHandler("open", resolve); v.open(info); });
  await Promise.all([opened(left, qi), opened(right, hi)]);
  const pad = (r) => new OpenSeadragon.Rect(r.x - r.width, r.y - r.height, r.width * 3, r.height * 3);
  left.viewport.fitBounds(left.viewport.imageToViewportRectangle(pad(q)), true);
  right.viewport.fitBounds(right.viewport.imageToViewportRectangle(pad(hitRect)), true);
  // Anchors: the centres of the query and the hit; the lock keeps equal offsets from them in µm,
  // at equal physical scale (screen pixels per µm), whatever each slide's µm/px.
  const anchor = (r) => new OpenSeadragon.Point(r.x + r.width / 2, r.y + r.height / 2);
  const anchors = new Map([[left, anchor(q)], [right, anchor(hitRect)]]);
  const mpps = new Map([[left, qmpp], [right, hmpp]]);
  compareViewers.mpp = { left: qmpp, right: hmpp };
  let syncing = false;
  const follow = (from, to) => () => {
    if (syncing || !$("compare-lock").checked) return;
    syncing = true;
    const c = from.viewport.viewportToImageCoordinates(from.viewport.getCenter(true));
    const ratio = mpps.get(from) / mpps.get(to); // level-0 pixels of `to` per pixel of `from`
    const offset = c.minus(anchors.get(from)).times(ratio);
    const imageZoom = from.viewport.viewportToImageZoom(from.viewport.getZoom(true)) / ratio;
    to.viewport.zoomTo(to.viewport.imageToViewportZoom(imageZoom), null, true);
    to.viewport.panTo(to.viewport.imageToViewportCoordinates(anchors.get(to).plus(offset)), true);
    syncing = false;
  };
  left.removeAllHandlers("viewport-change");
  right.removeAllHandlers("viewport-change");
  left.addHandler("viewport-change", follow(left, right));
  right.addHandler("viewport-change", follow(right, left));
  window.smily.compare = compareViewers;
  $("compare-title").textContent = `Query (${q.slideId}) and hit (${hitSlide} ${hitRect.x},${hitRect.y})`;
  $("compare-close").focus();
}

$("compare-close").onclick = () => { $("compare").hidden = true; };

// -- navigation: every view is a history entry and a shareable link -----------------
// A view: {slideId, viewport {x, y, zoom}, hit} plus the query, refinements and results shown.
function snapshot() {
  return {
    slideId: state.slide && state.slide.slideId,
    viewport: viewport(),
    hit: state.atHit || null,
    selection: state.selection,
    query: state.query,
    queryLabel: state.queryLabel,
    positives: state.positives,
    negatives: state.negatives,
    concepts: state.concepts,
    page: state.page,
    pageTokens: state.pageTokens,
    items: state.items,
    mode: state.mode,
    labelStats: state.labelStats,
    searchId: state.searchId,
  };
}

// The link of a view: #slide=…&x=…&y=…&zoom=… and a region query (q=x,y,w,h on qslide), with
// a polygon's vertices (poly=x,y;x,y;…) when it has one.
function link(s) {
  if (!s.slideId) return location.pathname + location.search;
  const p = new URLSearchParams({ slide: s.slideId });
  if (s.viewport) for (const k of ["x", "y", "zoom"]) p.set(k, s.viewport[k]);
  const r = s.query && s.query.region;
  if (r) {
    p.set("qslide", r.slideId);
    p.set("q", [r.x, r.y, r.width, r.height].join(","));
    if (r.polygon) p.set("poly", r.polygon.map((v) => `${v.x},${v.y}`).join(";"));
  }
  return "#" + p;
}

// A link's query region: {slideId, x, y, width, height[, polygon]}, or null when it holds none
// (or a malformed one: the gateway judges the rest, as for any query).
function linkRegion(p) {
  const q = (p.get("q") || "").split(",").map(Number);
  if (!p.get("qslide") || q.length !== 4 || !q.every(Number.isFinite)) return null;
  const region = { slideId: p.get("qslide"), x: q[0], y: q[1], width: q[2], height: q[3] };
  if (p.get("poly")) {
    const polygon = p.get("poly").split(";").map((v) => v.split(",").map(Number));
    if (polygon.length < 3 || !polygon.every((v) => v.length === 2 && v.every(Number.isFinite))) return null;
    region.polygon = polygon.map(([x, y]) => ({ x, y }));
  }
  return region;
}

// Saves the current view in the current history entry (before leaving it, after changing it).
function remember() {
  const s = snapshot();
  history.replaceState(s, "", link(s));
}

let settleTimer = null;
viewer.addHandler("animation-finish", () => {
  clearTimeout(settleTimer);
  settleTimer = setTimeout(() => { if (state.slide && !restoring) remember(); }, 150);
});

// Opens a slide (and a hit on it) as a new history entry; the entry being left keeps its view.
async function navigate({ slideId, hit }) {
  remember(); // where we were, before anything changes
  state.atHit = hit || false;
  clearHeatmap();
  await showSlide(slideId);
  if (hit) {
    const pad = Math.max(hit.width, hit.height) * 2;
    viewer.viewport.fitBounds(imageRect({ x: hit.x - pad, y: hit.y - pad, width: hit.width + 2 * pad,
                                          height: hit.height + 2 * pad }), true);
  } else {
    viewer.viewport.goHome(true);
  }
  drawSelection();
  drawHits(hit);
  $("back-to-results").hidden = !hit;
  const s = snapshot();
  history.pushState(s, "", link(s));
  say(slideId + (hit ? ` at ${hit.x},${hit.y}` : ""));
}

function imageRect(r) {
  return viewer.viewport.imageToViewportRectangle(new OpenSeadragon.Rect(r.x, r.y, r.width, r.height));
}

let restoring = false;

// Back, Forward or a link: the view exactly as it was left.
async function restore(s) {
  restoring = true;
  try {
    Object.assign(state, {
      selection: s.selection || null,
      query: s.query || null,
      queryLabel: s.queryLabel || "",
      positives: s.positives || [],
      negatives: s.negatives || [],
      concepts: s.concepts || {},
      page: s.page || 0,
      pageTokens: s.pageTokens || [""],
      mode: s.mode,
      labelStats: s.labelStats || null,
      searchId: s.searchId || "",
      atHit: s.hit || false,
    });
    $("query-label").textContent = state.queryLabel;
    $("search").disabled = !state.query;
    renderExamples();
    for (const el of document.querySelectorAll("input[data-concept]")) {
      el.value = String(state.concepts[el.dataset.concept] || 0);
      el.previousElementSibling.querySelector("output").textContent = el.value;
    }
    clearHeatmap();
    if (s.slideId) {
      await showSlide(s.slideId);
      if (s.viewport) setViewport(s.viewport);
    }
    showResults(s.items || []);
    if (!(s.items || []).length) $("gallery").replaceChildren();
    drawSelection();
    drawHits(s.hit || null);
    $("back-to-results").hidden = !s.hit;
    if (s.slideId) say(s.slideId + (s.hit ? ` at ${s.hit.x},${s.hit.y}` : ""));
  } finally {
    restoring = false;
  }
}

window.addEventListener("popstate", (e) => { if (e.state) restore(e.state); });

$("back-to-results").onclick = () => history.back();

// A shared or reloaded link: the slide at the place, and its query searched again.
async function openLink() {
  const p = new URLSearchParams(location.hash.slice(1));
  if (!p.get("slide")) return false;
  const view = ["x", "y", "zoom"].every((k) => p.has(k))
    ? { x: Number(p.get("x")), y: Number(p.get("y")), zoom: Number(p.get("zoom")) } : null;
  await showSlide(p.get("slide"));
  if (view) setViewport(view);
  const region = linkRegion(p);
  if (region && region.slideId === p.get("slide")) {
    select(Object.assign({}, region));
    await search(true);
  } else if (region) {
    setQuery({ region }, `${region.polygon ? "polygon" : "region"} ${region.x},${region.y} `
      + `${region.width}×${region.height} of ${region.slideId}`);
    state.selection = Object.assign({}, region);
    await search(true);
  }
  remember();
  return true;
}

// -- ingest ------------------------------------------------------------------
$("ingest-form").onsubmit = async (e) => {
  e.preventDefault();
  const metadata = {};
  for (const pair of $("ingest-meta").value.split(",")) {
    const i = pair.indexOf("=");
    if (i > 0) metadata[pair.slice(0, i).trim()] = pair.slice(i + 1).trim();
  }
  try {
    const { operation } = await api("POST", "/v1/slides:ingest",
                                    { source: $("ingest-source").value, slideId: $("ingest-id").value, metadata });
    track(operation);
  } catch (err) {
    say(err.message, true);
  }
};

function track(op) {
  const li = document.createElement("li");
  const label = document.createElement("span");
  const bar = document.createElement("progress");
  li.append(label, bar);
  $("operations").prepend(li);
  const show = (op) => {
    const p = op.progress || {};
    const total = Number(p.tilesTotal || 0);
    bar.max = total || 1;
    bar.value = Number(p.tilesIndexed || 0);
    label.textContent = `${op.slideId}: ${op.state.replace("OPERATION_STATE_", "").toLowerCase()}`
      + (total ? ` ${p.tilesIndexed}/${total} tiles` : "") + (op.errorMessage ? ` — ${op.errorMessage}` : "");
  };
  show(op);
  const poll = async () => {
    op = (await api("GET", "/v1/operations/" + encodeURIComponent(op.operationId))).operation;
    show(op);
    if (["OPERATION_STATE_QUEUED", "OPERATION_STATE_RUNNING"].includes(op.state)) setTimeout(poll, 500);
    else if (op.state === "OPERATION_STATE_SUCCEEDED") loadSlides(false);
  };
  setTimeout(poll, 500);
}

// -- start -------------------------------------------------------------------
let findTimer = null;
$("slide-find").oninput = () => {
  clearTimeout(findTimer);
  findTimer = setTimeout(() => loadSlides(false).catch((err) => say(err.message, true)), 250);
};
$("slide-find-form").onsubmit = (e) => {
  e.preventDefault();
  clearTimeout(findTimer);
  loadSlides(false).catch((err) => say(err.message, true));
};
$("more-slides").onclick = () => loadSlides(true).catch((err) => say(err.message, true));

(async () => {
  try {
    await setupLogin();
    if (userManager && !state.token) { say("Log in to see slides"); return; }
    await loadTenant();
    await Promise.all([loadSlides(false), loadConcepts()]);
    say(`${state.slides.length}${state.slidesNext ? "+" : ""} slides`);
    await openLink();
    window.smily.ready = true;
  } catch (err) {
    say(err.message, true);
  }
})();

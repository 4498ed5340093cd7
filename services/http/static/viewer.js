// SMILY viewer: slides, a region query, a gallery of hits and the tools to steer it.
// Plain JS over the HTTP/JSON API (/v1, protobuf JSON) and IIIF tiles (/iiif/3).
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE_SIZE = 12;
const K = 60;

const state = {
  token: null, // OIDC access token, in memory only
  viewSession: "", // minted by the server with the open slide's info.json; its tiles are audited as one session
  slides: [],
  slide: null, // {slideId, metadata, width, height}
  tenant: "", // the caller's (issue 24)
  query: null, // {region} or {image}
  queryLabel: "",
  positives: [], // Examples: {region}
  negatives: [],
  concepts: {}, // name -> weight
  pageTokens: [""],
  page: 0,
  selection: null, // level-0 rect on the open slide
};
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
  }
}

// -- slides ------------------------------------------------------------------
// Issue 24: the caller's tenant in the header; another (granted) tenant's slides are labelled.
async function loadTenant() {
  const info = await api("GET", "/v1/index");
  state.tenant = info.tenant || "";
  $("tenant").textContent = state.tenant ? "Tenant: " + state.tenant : "";
}

function tenantLabel(tenant) {
  const label = document.createElement("span");
  label.className = "tenant";
  label.textContent = tenant;
  label.title = "a slide of tenant " + tenant + ", granted to yours";
  return label;
}

async function loadSlides() {
  const slides = [];
  let token = "";
  do {
    const q = new URLSearchParams({ pageSize: "500" });
    if (token) q.set("pageToken", token);
    const page = await api("GET", "/v1/slides?" + q);
    slides.push(...page.slides);
    token = page.nextPageToken;
  } while (token);
  state.slides = slides;
  renderSlides();
}

function filterTerms() {
  const terms = $("slide-filter").value.trim().split(/\s+/).filter(Boolean);
  const pairs = {};
  const words = [];
  for (const t of terms) {
    const i = t.indexOf("=");
    if (i > 0) pairs[t.slice(0, i)] = t.slice(i + 1); else words.push(t.toLowerCase());
  }
  return { pairs, words };
}

function matches(slide, { pairs, words }) {
  const md = slide.metadata || {};
  for (const [k, v] of Object.entries(pairs)) if (md[k] !== v) return false;
  const text = [slide.slideId, ...Object.values(md)].join(" ").toLowerCase();
  return words.every((w) => text.includes(w));
}

function renderSlides() {
  const f = filterTerms();
  const list = $("slide-list");
  list.replaceChildren();
  for (const s of state.slides.filter((s) => matches(s, f))) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.slideId = s.slideId;
    b.textContent = s.slideId;
    if (s.tenant && s.tenant !== state.tenant) b.prepend(tenantLabel(s.tenant));
    const meta = document.createElement("small");
    meta.textContent = Object.entries(s.metadata || {}).map(([k, v]) => `${k}=${v}`).join(", ");
    b.append(meta);
    if (state.slide && state.slide.slideId === s.slideId) b.setAttribute("aria-current", "true");
    b.onclick = () => openSlide(s.slideId, null, true);
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
  gestureSettingsMouse: { clickToZoom: false },
});
window.smily.viewer = viewer;
let selectionEl = null;
let outlineEl = null;

function imageRect(r) {
  return viewer.viewport.imageToViewportRectangle(new OpenSeadragon.Rect(r.x, r.y, r.width, r.height));
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

// Opens a slide; with `hit`, zooms to it and outlines it.
async function openSlide(slideId, hit, record) {
  say("Opening " + slideId + "…");
  const info = await slideInfo(slideId);
  clearInterval(renewal);
  renewal = setInterval(() => slideInfo(slideId).catch(() => {}), 60000);
  const slide = state.slides.find((s) => s.slideId === slideId) || { slideId, metadata: {} };
  state.slide = Object.assign({}, slide, { width: info.width, height: info.height });
  if (record) {
    // Remember where we were (the query's slide and region) for the back button.
    if (state.slide) history.replaceState({ slideId: state.slide.slideId, selection: state.selection }, "");
    history.pushState({ slideId, hit }, "", "#" + encodeURIComponent(slideId));
  }
  clearSelection();
  await new Promise((resolve) => {
    viewer.addOnceHandler("open", resolve);
    viewer.open(info);
  });
  if (outlineEl) { viewer.removeOverlay(outlineEl); outlineEl = null; }
  if (hit) {
    outlineEl = document.createElement("div");
    outlineEl.className = "hit-outline";
    outlineEl.dataset.x = hit.x;
    outlineEl.dataset.y = hit.y;
    viewer.addOverlay(outlineEl, imageRect(hit));
    const pad = Math.max(hit.width, hit.height) * 2;
    viewer.viewport.fitBounds(imageRect({ x: hit.x - pad, y: hit.y - pad, width: hit.width + 2 * pad,
                                          height: hit.height + 2 * pad }), true);
  }
  renderSlides();
  $("search-slides").disabled = false;
  say(slideId + (hit ? ` at ${hit.x},${hit.y}` : ""));
}

function clearSelection() {
  if (selectionEl) viewer.removeOverlay(selectionEl);
  selectionEl = null;
  state.selection = null;
}

function select(rect) {
  const r = {
    x: Math.max(0, Math.round(rect.x)), y: Math.max(0, Math.round(rect.y)),
    width: Math.round(rect.width), height: Math.round(rect.height),
  };
  if (r.width < 8 || r.height < 8) return;
  clearSelection();
  selectionEl = document.createElement("div");
  selectionEl.className = "selection";
  viewer.addOverlay(selectionEl, imageRect(r));
  state.selection = r;
  setQuery({ region: Object.assign({ slideId: state.slide.slideId }, r) },
           `region ${r.x},${r.y} ${r.width}×${r.height} of ${state.slide.slideId}`);
}

// Rectangle tool: while "Draw region" is pressed, a drag selects instead of panning.
let dragStart = null;
new OpenSeadragon.MouseTracker({
  element: viewer.canvas,
  pressHandler: (e) => {
    if (!drawing()) return;
    dragStart = viewer.viewport.viewerElementToImageCoordinates(e.position);
  },
  dragHandler: (e) => {
    if (!drawing() || !dragStart) return;
    const p = viewer.viewport.viewerElementToImageCoordinates(e.position);
    const r = new OpenSeadragon.Rect(Math.min(p.x, dragStart.x), Math.min(p.y, dragStart.y),
                                     Math.abs(p.x - dragStart.x), Math.abs(p.y - dragStart.y));
    if (!selectionEl) {
      selectionEl = document.createElement("div");
      selectionEl.className = "selection";
      viewer.addOverlay(selectionEl, imageRect(r));
    } else {
      viewer.updateOverlay(selectionEl, imageRect(r));
    }
  },
  releaseHandler: (e) => {
    if (!drawing() || !dragStart) return;
    const p = viewer.viewport.viewerElementToImageCoordinates(e.position);
    select({ x: Math.min(p.x, dragStart.x), y: Math.min(p.y, dragStart.y),
             width: Math.abs(p.x - dragStart.x), height: Math.abs(p.y - dragStart.y) });
    dragStart = null;
    setDrawing(false);
  },
});

function drawing() { return $("draw").getAttribute("aria-pressed") === "true"; }

function setDrawing(on) {
  $("draw").setAttribute("aria-pressed", String(on));
  viewer.setMouseNavEnabled(!on);
}

$("draw").onclick = () => setDrawing(!drawing());

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
  setQuery({ image: btoa(bin) }, "uploaded patch " + file.name);
};

function setQuery(query, label) {
  state.query = query;
  state.queryLabel = label;
  $("query-label").textContent = label;
  $("search").disabled = false;
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
function searchRequest() {
  const req = Object.assign({}, state.query, {
    k: K,
    pageSize: PAGE_SIZE,
    pageToken: state.pageTokens[state.page],
    positives: state.positives,
    negatives: state.negatives,
    concepts: Object.entries(state.concepts).map(([name, weight]) => ({ name, weight })),
    maxHitsPerSlide: Number($("max-per-slide").value) || 0,
    filters: filterTerms().pairs,
  });
  if ($("exclude-case").checked && state.query.region) req.excludeQueryCase = true;
  return req;
}

async function search(fresh) {
  if (fresh) { state.pageTokens = [""]; state.page = 0; }
  performance.mark("search-start");
  say("Searching…");
  try {
    const resp = await api("POST", "/v1/search", searchRequest());
    // "Less like this" pushes the query away from those tiles and hides them.
    const hits = resp.hits.filter((h) => !state.negatives.some((n) => sameTile(n.region, h)));
    state.pageTokens[state.page + 1] = resp.nextPageToken;
    renderHits(hits.map((h) => ({ hit: h })));
    afterPaint(() => {
      performance.mark("gallery-painted");
      const m = performance.measure("search-to-paint", "search-start", "gallery-painted");
      window.smily.timings.push(m.duration);
    });
    $("prev-page").disabled = state.page === 0;
    $("next-page").disabled = !resp.nextPageToken;
    $("page-label").textContent = `page ${state.page + 1}`;
    say(`${hits.length} hits for ${state.queryLabel}${resp.cached ? " (cached query)" : ""}`);
  } catch (err) {
    say(err.message, true);
  }
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
    renderHits(items);
    $("prev-page").disabled = $("next-page").disabled = true;
    $("page-label").textContent = "";
    say(`${resp.slides.length} slides like ${state.slide.slideId}`);
  } catch (err) {
    say(err.message, true);
  }
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
  open.onclick = () => openSlide(hit.slideId, {
    x: Number(hit.x), y: Number(hit.y), width: Number(hit.width), height: Number(hit.height) }, true);
  const cap = document.createElement("figcaption");
  const more = document.createElement("button");
  more.type = "button";
  more.className = "more";
  more.textContent = "+";
  more.setAttribute("aria-label", `More like this (${hit.slideId} ${hit.x},${hit.y})`);
  more.onclick = () => {
    state.positives.push({ region });
    fig.classList.add("positive");
    renderExamples();
  };
  const less = document.createElement("button");
  less.type = "button";
  less.className = "less";
  less.textContent = "−";
  less.setAttribute("aria-label", `Less like this (${hit.slideId} ${hit.x},${hit.y})`);
  less.onclick = () => {
    state.negatives.push({ region });
    fig.remove();
    renderExamples();
  };
  const score = document.createElement("span");
  score.textContent = hit.score.toFixed(3);
  cap.append(more, score, less);
  fig.append(open, cap);
  return fig;
}

// Back from a hit returns to the query's slide; the gallery stays as it was.
window.addEventListener("popstate", (e) => {
  const s = e.state;
  if (!s || !s.slideId) return;
  openSlide(s.slideId, s.hit, false).then(() => s.selection && select(s.selection));
});

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
    else if (op.state === "OPERATION_STATE_SUCCEEDED") loadSlides();
  };
  setTimeout(poll, 500);
}

// -- start -------------------------------------------------------------------
$("slide-filter").oninput = renderSlides;

(async () => {
  try {
    await setupLogin();
    if (userManager && !state.token) { say("Log in to see slides"); return; }
    await loadTenant();
    await Promise.all([loadSlides(), loadConcepts()]);
    say(`${state.slides.length} slides`);
    window.smily.ready = true;
  } catch (err) {
    say(err.message, true);
  }
})();

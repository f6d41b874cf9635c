// The segray map page: the source and the model's mask as XYZ tiles on a Leaflet map.
// Tiles are fetched with the bearer token (when the server asks for one), so they are loaded
// by fetch() and shown as blobs. window.segrayTiles counts what loaded and what failed.
(function () {
  "use strict";
  const settings = JSON.parse(document.body.dataset.settings);
  const state = { requested: 0, loaded: 0, failed: 0, errors: [] };
  window.segrayTiles = state;
  const $ = (id) => document.getElementById(id);
  const status = (text) => { $("status").textContent = text; };

  let token = null;
  if (settings.tokenRequired) {
    const hash = new URLSearchParams(location.hash.slice(1));
    token = hash.get("token") || sessionStorage.getItem("segray-token") || prompt("API token");
    if (token) sessionStorage.setItem("segray-token", token);
  }
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const esc = (text) => String(text).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
  const q = (params) => new URLSearchParams(params).toString();

  async function getJSON(path, params) {
    const response = await fetch(path + "?" + q(params), { headers });
    const body = await response.json();
    if (!response.ok) throw new Error(body.detail || body.error || response.status);
    return body;
  }

  const FetchedTiles = L.GridLayer.extend({
    createTile: function (coords, done) {
      const img = document.createElement("img");
      img.alt = "";
      const url = "tiles/" + settings.tms + "/" + coords.z + "/" + coords.x + "/" + coords.y +
        (L.Browser.retina ? "@2x" : "") + ".png?" + q(this.options.query);
      state.requested += 1;
      fetch(url, { headers }).then(async (response) => {
        if (!response.ok) throw new Error(response.status + " " + (await response.text()));
        img.src = URL.createObjectURL(await response.blob());
        img.onload = () => { URL.revokeObjectURL(img.src); state.loaded += 1; done(null, img); };
      }).catch((err) => {
        state.failed += 1;
        state.errors.push(url + ": " + err.message);
        status("tile failed: " + err.message);
        done(err, img);
      });
      return img;
    },
  });

  function tiles(tilejson, query, extra) {
    const [west, south, east, north] = tilejson.bounds;
    return new FetchedTiles(Object.assign({
      query: query,
      bounds: L.latLngBounds([south, west], [north, east]),
      minZoom: tilejson.minzoom,
      maxNativeZoom: tilejson.maxzoom,
      maxZoom: tilejson.maxzoom + 4,
    }, extra));
  }

  function drawLegend() {
    $("legend").replaceChildren(...settings.classes.map((c) => {
      const li = document.createElement("li");
      const swatch = document.createElement("i");
      swatch.style.background = c.id === 0 ? "transparent" : c.color;
      li.append(swatch, document.createTextNode(c.name + (c.id === 0 ? " (not drawn)" : "")));
      return li;
    }));
    $("class").replaceChildren(...settings.classes.map((c) => new Option(c.name, c.id)));
    $("class").value = settings.classes.length > 1 ? "1" : "0";
  }

  async function main() {
    $("source").textContent = settings.url || "no url given: add ?url=… to the address";
    drawLegend();
    const map = L.map("map", { zoomSnap: 1 });
    window.segrayMap = map;
    if (!settings.url) { map.setView([0, 0], 1); return; }
    if (settings.tms !== "WebMercatorQuad") status("the page draws WebMercatorQuad only");
    // the source's bands the model reads, when the page was opened with bidx=…
    const source = settings.bidx ? { url: settings.url, bidx: settings.bidx } : { url: settings.url };
    const [image, mask] = await Promise.all([
      getJSON("tilejson.json", { ...source, layer: "image" }),
      getJSON("tilejson.json", { ...source, layer: settings.layer === "precomputed" ? "precomputed" : "mask" }),
    ]);
    map.setMaxZoom(image.maxzoom + 4);
    const imageLayer = tiles(image, { ...source, layer: "image" }, { zIndex: 1 });
    let maskLayer = null;
    const opacity = () => parseFloat($("opacity").value);
    function showMask() {
      if (maskLayer) map.removeLayer(maskLayer);
      const query = { ...source, layer: $("layer").value };
      if (query.layer === "probability") query.class = $("class").value;
      $("class-pick").hidden = query.layer !== "probability";
      maskLayer = tiles(mask, query, { zIndex: 2, opacity: opacity() }).addTo(map);
      window.segrayMaskLayer = maskLayer;
    }
    $("layer").value = settings.layer;
    imageLayer.addTo(map);
    showMask();
    map.fitBounds(imageLayer.options.bounds);
    if (map.getZoom() < mask.minzoom) map.setZoom(mask.minzoom);
    $("opacity").addEventListener("input", () => maskLayer.setOpacity(opacity()));
    $("layer").addEventListener("change", showMask);
    $("class").addEventListener("change", showMask);
    $("show-image").addEventListener("change", (e) => {
      if (e.target.checked) imageLayer.addTo(map); else map.removeLayer(imageLayer);
    });
    let marker = null;
    map.on("click", async (e) => {
      try {
        const doc = await getJSON("point", { ...source, lon: e.latlng.lng, lat: e.latlng.lat });
        if (marker) map.removeLayer(marker);
        marker = L.circleMarker(e.latlng, { radius: 5, color: "#fff", weight: 2 }).addTo(map);
        const rows = Object.entries(doc.fractions).map(([name, f]) =>
          "<tr><td>" + esc(name) + "</td><td>" + (f === null ? "–" : (100 * f).toFixed(1) + " %") + "</td></tr>");
        $("point").innerHTML = "<b>" + esc(doc.class_name ?? "no data") + "</b>" +
          (doc.probability === null ? "" : " (p = " + doc.probability.toFixed(2) + ")") +
          "<br>tile " + doc.tile.join("/") + ":<table>" + rows.join("") + "</table>";
        window.segrayPoint = doc;
      } catch (err) { status(err.message); }
    });
  }
  main().catch((err) => status(err.message));
})();

// Regenerate the UI-format example workflows (workflows/*.json) and their API twins
// (tests/comfyui/workflows_api/*.json) with the real ComfyUI front end, in headless Chromium.
//
// Needs: a running ComfyUI with this pack (see docs/comfyui.md, "Developing"), Chromium, and
// `npm install playwright-core` somewhere on NODE_PATH. Nothing is downloaded by this script.
//
//   node tests/comfyui/frontend/build_workflows.mjs http://127.0.0.1:8188 [screenshot.png]
//   node tests/comfyui/frontend/build_workflows.mjs http://127.0.0.1:8188 --check
//
// --check writes nothing: it loads every workflows/*.json with app.loadGraphData (what opening a file
// does) and fails unless every node type is known and app.graphToPrompt() equals the API twin. It then
// loads each file once more as saved before the pack's optional widgets were offered (those widgets and
// their values removed from the pack's nodes) and fails unless the conversion gives the twin with those
// inputs at their defaults: UI files store widget values by position, so an optional widget must follow
// every other widget of its node, and a file saved without it must keep its other values.
//
// Input: the API graphs in tests/comfyui/workflows_api (hand-written sources). Each is loaded with the
// front end's own app.loadApiJson (the path a dropped API JSON takes), laid out, seeds set to "fixed",
// then saved as app.graph.serialize() (UI format) and app.graphToPrompt().output (API format).
import { readFileSync, writeFileSync, readdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "..", "..", "..");
const apiDir = join(repo, "tests", "comfyui", "workflows_api");
const uiDir = join(repo, "workflows");
const url = process.argv[2] ?? "http://127.0.0.1:8188";
const check = process.argv[3] === "--check";
const screenshot = check ? undefined : process.argv[3];

// Columns (x) in dependency order; rows (y) inside a column. Positions are cosmetic.
const LAYOUT = {
  slimdiff_calibrate_slim_save: {
    1: [40, 260], 2: [420, 60], 3: [420, 330], 4: [420, 600],
    5: [880, 60], 6: [1240, 60], 7: [1240, 330], 8: [1600, 330], 9: [1840, 330], 10: [1600, 60],
  },
  slimdiff_load_slim_model: {
    1: [40, 60], 2: [40, 200], 3: [420, 60], 4: [420, 330], 5: [420, 600], 6: [880, 60], 7: [1240, 60], 8: [1480, 60],
  },
  slimdiff_calibrate_prompt_list: {
    1: [40, 260], 2: [40, 480], 3: [420, 60], 4: [880, 60], 5: [880, 330], 6: [880, 560],
    7: [1240, 60], 8: [1600, 60], 9: [1840, 60], 10: [1240, 560],
  },
  slimdiff_flux_calibrate_slim_save: {
    1: [40, 60], 11: [40, 200], 12: [40, 400], 2: [40, 520], 3: [420, 60], 4: [880, 60], 5: [880, 330],
    6: [880, 560], 7: [1240, 60], 8: [1600, 60], 9: [1840, 60], 10: [1240, 560],
  },
  slimdiff_pixart_calibrate_slim_save: {
    1: [40, 60], 11: [40, 200], 12: [40, 400], 2: [40, 520], 3: [420, 60], 4: [880, 60], 5: [880, 330],
    6: [880, 560], 7: [1240, 60], 8: [1600, 60], 9: [1840, 60], 10: [1240, 560],
  },
  slimdiff_sd35_calibrate_slim_save: {
    1: [40, 60], 11: [40, 200], 12: [40, 400], 2: [40, 520], 3: [420, 60], 4: [880, 60], 5: [880, 330],
    6: [880, 560], 7: [1240, 60], 8: [1600, 60], 9: [1840, 60], 10: [1240, 560],
  },
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"],
});
const page = await browser.newPage({ viewport: { width: 2200, height: 1000 } });
// The front end takes well over Playwright's default 30 s to start when the one core it gets is shared with
// other test processes (seen: a timeout waiting for the node types on a loaded 2-core machine).
page.setDefaultTimeout(120000);
page.on("pageerror", (e) => console.error("pageerror:", e.message, e.stack?.split("\n").slice(0, 4).join(" / ")));
await page.goto(url, { waitUntil: "networkidle" });
await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.SlimModel);
await page.keyboard.press("Escape");

if (check) {
  let failures = 0;
  const objectInfo = await (await fetch(`${url}/object_info`)).json();
  console.log(`front end ${await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? "unknown")}`);
  for (const file of readdirSync(uiDir).filter((f) => f.endsWith(".json")).sort()) {
    const ui = JSON.parse(readFileSync(join(uiDir, file), "utf8"));
    const twin = JSON.parse(readFileSync(join(apiDir, file), "utf8"));
    const result = await page.evaluate(async (ui) => {
      const app = window.app;
      const unknown = ui.nodes.map((n) => n.type).filter((t) => !window.LiteGraph.registered_node_types[t]);
      await app.loadGraphData(ui);
      return { unknown, api: (await app.graphToPrompt()).output };
    }, ui);
    const same = JSON.stringify(sortKeys(result.api)) === JSON.stringify(sortKeys(twin));
    console.log(`${file}: unknown node types ${JSON.stringify(result.unknown)}, API twin ${same ? "matches" : "DIFFERS"}`);
    if (result.unknown.length || !same) failures += 1;
    const legacy = withoutOptionalWidgets(ui, twin, objectInfo);
    if (legacy.problem) {
      console.log(`${file}: ${legacy.problem}`);
      failures += 1;
      continue;
    }
    if (!legacy.removed.length) continue;
    const old = await page.evaluate(async (ui) => {
      await window.app.loadGraphData(ui);
      return (await window.app.graphToPrompt()).output;
    }, legacy.ui);
    const oldSame = JSON.stringify(sortKeys(old)) === JSON.stringify(sortKeys(legacy.twin));
    console.log(`${file} saved without ${legacy.removed.join(", ")}: ${oldSame ? "loads with the defaults" : "DIFFERS"}`);
    if (!oldSame) failures += 1;
  }
  await browser.close();
  process.exit(failures ? 1 : 0);
}

// The UI graph `ui` as saved before the pack's optional widgets existed (node types starting with "Slim"), and
// its expected API conversion: `twin` with those inputs at their /object_info defaults. `problem` names an
// optional widget that does not come after all of its node's other widgets.
function withoutOptionalWidgets(ui, twin, objectInfo) {
  ui = structuredClone(ui);
  twin = structuredClone(twin);
  const removed = [];
  for (const node of ui.nodes.filter((n) => n.type.startsWith("Slim"))) {
    const info = objectInfo[node.type];
    const optional = new Set(info?.input_order?.optional ?? []);
    const widgets = node.inputs.filter((i) => i.widget).map((i) => i.name);
    const cut = widgets.findIndex((name) => optional.has(name));
    if (cut < 0) continue;
    if (!widgets.slice(cut).every((name) => optional.has(name))) {
      return { problem: `${node.type}: optional widget ${widgets[cut]} comes before required ones (${widgets})` };
    }
    // one value per widget here (no control_after_generate among them: checked by the spec tests)
    node.widgets_values = node.widgets_values.slice(0, node.widgets_values.length - (widgets.length - cut));
    for (const name of widgets.slice(cut)) {
      node.inputs = node.inputs.filter((i) => i.name !== name);
      twin[String(node.id)].inputs[name] = info.input.optional[name][1].default;
      removed.push(`${node.type}.${name}`);
    }
  }
  return { ui, twin, removed: [...new Set(removed)] };
}

function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.keys(value).sort().map((k) => [k, sortKeys(value[k])]));
  }
  return value;
}

for (const file of readdirSync(apiDir).filter((f) => f.endsWith(".json")).sort()) {
  const name = file.replace(/\.json$/, "");
  const api = JSON.parse(readFileSync(join(apiDir, file), "utf8"));
  const result = await page.evaluate(async ({ api, name, layout }) => {
    const app = window.app;
    app.loadApiJson(api, `${name}.json`);
    for (const node of app.graph._nodes) {
      const pos = layout?.[node.id];
      if (pos) node.pos = [...pos];
      for (const widget of node.widgets ?? []) {
        if (widget.name === "control_after_generate") widget.value = "fixed";  // examples must be reproducible
      }
    }
    app.graph.setDirtyCanvas(true, true);
    const prompt = await app.graphToPrompt();
    return { ui: app.graph.serialize(), api: prompt.output };
  }, { api, name, layout: LAYOUT[name] });
  writeFileSync(join(uiDir, `${name}.json`), JSON.stringify(result.ui, null, 2) + "\n");
  writeFileSync(join(apiDir, file), JSON.stringify(result.api, null, 2) + "\n");
  console.log(`wrote workflows/${name}.json and its API twin (${Object.keys(result.api).length} nodes)`);
}

if (screenshot) {
  const ui = JSON.parse(readFileSync(join(uiDir, "slimdiff_calibrate_slim_save.json"), "utf8"));
  await page.evaluate(async (ui) => {
    await window.app.extensionManager?.setting?.set("Comfy.Minimap.Visible", false).catch?.(() => {});
    await window.app.loadGraphData(ui);
  }, ui);
  await page.mouse.click(1100, 950);  // focus the canvas
  await page.keyboard.press(".");  // fit view
  await page.waitForTimeout(1500);
  await page.screenshot({ path: screenshot, clip: { x: 320, y: 255, width: 1630, height: 560 } });
  console.log(`screenshot ${screenshot}`);
}
await browser.close();

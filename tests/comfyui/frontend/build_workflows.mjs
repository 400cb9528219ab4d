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
// does) and fails unless every node type is known and app.graphToPrompt() equals the API twin.
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
page.on("pageerror", (e) => console.error("pageerror:", e.message, e.stack?.split("\n").slice(0, 4).join(" / ")));
await page.goto(url, { waitUntil: "networkidle" });
await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.SlimModel);
await page.keyboard.press("Escape");

if (check) {
  let failures = 0;
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
  }
  await browser.close();
  process.exit(failures ? 1 : 0);
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

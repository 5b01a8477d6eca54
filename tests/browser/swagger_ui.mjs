// Swagger UI, tried as a person would: load /docs in headless Chromium,
// expand PUT and GET of an entry, "Try it out", execute, and check the
// responses the page shows. Saves a screenshot for the CI artifacts.
//
// Usage: node swagger_ui.mjs http://127.0.0.1:PORT [screenshot.png]

import { chromium } from "playwright-core";

const base = process.argv[2];
const shot = process.argv[3] ?? "swagger-ui.png";
if (!base) {
  console.error("usage: node swagger_ui.mjs BASE_URL [SCREENSHOT]");
  process.exit(2);
}

const fail = (msg) => {
  console.error(`FAIL: ${msg}`);
  process.exitCode = 1;
};

// The table the UI writes to; created through the API first.
const created = await fetch(`${base}/v1/tables`, {
  method: "POST",
  body: JSON.stringify({ name: "browser" }),
});
if (created.status !== 201) fail(`creating the table answered ${created.status}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 2000 } });
  const external = [];
  page.on("request", (r) => {
    if (!r.url().startsWith(base)) external.push(r.url());
  });
  await page.goto(`${base}/docs/`);
  await page.waitForSelector(".opblock", { timeout: 30000 });

  // Runs one operation through "Try it out" and returns [status, body].
  async function tryOut(id, params, body) {
    const op = page.locator(`#${id}`);
    await op.locator(".opblock-summary").first().click();
    await op.locator("button.try-out__btn").click();
    for (const [name, value] of Object.entries(params)) {
      await op.locator(`tr[data-param-name="${name}"] input`).first().fill(value);
    }
    if (body !== undefined) {
      await op.locator("textarea.body-param__text").fill(body);
    }
    await op.locator("button.execute").click();
    const row = op.locator(".live-responses-table tbody tr.response").first();
    await row.waitFor({ timeout: 30000 });
    const code = (await row.locator("td.response-col_status").innerText()).trim();
    const shown = await row.locator(".response-col_description pre").first().innerText();
    return [code, shown];
  }

  const [putCode, putBody] = await tryOut(
    "operations-entries-put_entry",
    { table: "browser", key: "greeting" },
    '{"hello": "world"}',
  );
  if (putCode !== "201") fail(`PUT showed status ${putCode}`);
  if (!/"created":\s*true/.test(putBody)) fail(`PUT showed ${putBody}`);

  const [getCode, getBody] = await tryOut(
    "operations-entries-get_entry",
    { table: "browser", key: "greeting" },
  );
  if (getCode !== "200") fail(`GET showed status ${getCode}`);
  if (!/"hello":\s*"world"/.test(getBody)) fail(`GET showed ${getBody}`);

  // Every operation has a summary in the UI.
  const summaries = await page.locator(".opblock-summary-description").allInnerTexts();
  if (summaries.length < 20 || summaries.some((s) => s.trim() === "")) {
    fail(`operations without a summary: ${summaries.length} listed`);
  }
  if (external.length > 0) fail(`the page fetched outside the server: ${external.join(", ")}`);

  // The GET operation with its live response, as a person sees it.
  await page.locator("#operations-entries-get_entry").screenshot({ path: shot });
  console.log(`swagger ui: PUT ${putCode}, GET ${getCode}, ${summaries.length} operations; screenshot ${shot}`);
} finally {
  await browser.close();
}
if (process.exitCode) process.exit(process.exitCode);
console.log("1 passed, 0 failed");

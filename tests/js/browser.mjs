// Drives JsSIP or SIP.js in a real headless browser (Debian's chromium, through
// playwright-core, which downloads no browser of its own) for
// tests/test_interop_wss.py: the page tests/js/page.html is served by a local http
// server on 127.0.0.1 and registers from the browser's own WebSocket.
//
//     node browser.mjs jssip|sipjs URL AOR
//
// Environment: CHROMIUM (default /usr/bin/chromium), BROWSER_PROFILE (an empty
// directory for --user-data-dir) and BROWSER_HOME (HOME of the browser: a wss: server's
// certificate is checked against the NSS database in BROWSER_HOME/.pki/nssdb, where the
// test put its CA; no certificate error is ignored).
// Commands, one a line, on standard input, answered on standard output as by
// tests/js/register.mjs: register, unregister, and close: close the page (the browser
// keeps running until standard input ends), answered "done close - -".  The page's
// console and errors go to standard error.
import { createServer } from "node:http";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { dirname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import esbuild from "esbuild";
import { chromium } from "playwright-core";

const HERE = dirname(fileURLToPath(import.meta.url));
const [lib, url, aor] = process.argv.slice(2);
const log = (...args) => console.error(new Date().toISOString(), ...args);

// JsSIP as one script that defines window.JsSIP
const jssip = esbuild.buildSync({
    entryPoints: [join(HERE, "node_modules/jssip/lib/JsSIP.js")], bundle: true, write: false,
    format: "iife", globalName: "JsSIP", platform: "browser", logLevel: "warning",
}).outputFiles[0].contents;

const JS = "text/javascript; charset=utf-8";
const SIPJS = join(HERE, "node_modules/sip.js/lib");
function respond(req, res) {
    const path = new URL(req.url, "http://x").pathname;
    let body = null;
    let type = JS;
    if (path === "/") {
        body = readFileSync(join(HERE, "page.html"));
        type = "text/html; charset=utf-8";
    } else if (path === "/jssip.js") {
        body = jssip;
    } else if (path === "/clients.mjs") {
        body = readFileSync(join(HERE, "clients.mjs"));
    } else if (path.startsWith("/sip.js/") && path.endsWith(".js")) {
        const file = normalize(join(SIPJS, path.slice("/sip.js/".length)));
        if (file.startsWith(SIPJS + "/")) {
            try { body = readFileSync(file); } catch { body = null; }
        }
    }
    if (body === null) {
        res.writeHead(404, { "Content-Type": "text/plain" }).end("not here\n");
        return;
    }
    res.writeHead(200, { "Content-Type": type, "Cache-Control": "no-store" }).end(body);
}

const http = createServer(respond);
await new Promise((resolve) => http.listen(0, "127.0.0.1", resolve));
const page_url = `http://127.0.0.1:${http.address().port}/?` + new URLSearchParams({ lib, url, aor });

const context = await chromium.launchPersistentContext(process.env.BROWSER_PROFILE, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    timeout: 30000,
    env: { ...process.env, HOME: process.env.BROWSER_HOME },
    // without the background-networking switches chromium's own connections
    // (component updates, sync, QUIC probes) go out; this network refuses them
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const browser_version = context.browser() ? context.browser().version() : "?";
let page = context.pages()[0] || await context.newPage();
page.on("console", (m) => log(`page console.${m.type()}:`, m.text()));
page.on("pageerror", (e) => log("page error:", e));
page.on("websocket", (ws) => {
    log("page websocket open", ws.url());
    ws.on("close", () => log("page websocket closed", ws.url()));
});
page.setDefaultTimeout(20000);
await page.goto(page_url);
await page.waitForFunction(() => typeof window.ask === "function");
log(`chromium ${browser_version}: ${page_url} loaded`);

for await (const line of createInterface({ input: process.stdin })) {
    const cmd = line.trim();
    if (!cmd) continue;
    if (cmd === "close") {
        await page.close();
        page = null;
        process.stdout.write("done close - -\n");
        continue;
    }
    if (!page || (cmd !== "register" && cmd !== "unregister")) {
        log(`unexpected command ${cmd}`);
        process.exit(2);
    }
    try {
        process.stdout.write(await page.evaluate((c) => window.ask(c), cmd) + "\n");
    } catch (err) {
        log(err);
        process.stdout.write(`fail error - ${String(err.message || err).split("\n")[0].replace(/\s+/g, "_")}\n`);
    }
}
await context.close();
http.close();
process.exit(0);

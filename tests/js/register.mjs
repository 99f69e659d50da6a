// Drives JsSIP or SIP.js in Node 20 as a phone for tests/test_interop_wss.py, with the
// `ws` package as the WebSocket (Node 20 has none of its own).  A wss: server's
// certificate is checked against Node's CAs plus NODE_EXTRA_CA_CERTS (the test CA).
//
//     node register.mjs jssip|sipjs URL AOR
//
// Commands, one a line, on standard input (answers on standard output, as
// tests/interop.py: LineClient reads them; the libraries' logs go to standard error):
//     register     the first: start the user agent (it registers); later: a refresh
//     unregister
//     close        answer "done close - -", then exit without unregistering: the
//                  connection ends as when a Node program is killed
import { createInterface } from "node:readline";
import WebSocket from "ws";
import { open, answerLine } from "./clients.mjs";

globalThis.WebSocket = WebSocket;
// SIP.js logs with console.log: keep standard output for the answers
for (const level of ["log", "info", "debug", "warn"]) console[level] = console.error;

const [lib, url, aor] = process.argv.slice(2);
const library = lib === "jssip" ? (await import("jssip")).default : await import("sip.js");
if (lib === "jssip") library.debug.enable("JsSIP:*");
const client = open(lib, library, { url, aor });

for await (const line of createInterface({ input: process.stdin })) {
    const cmd = line.trim();
    if (!cmd) continue;
    if (cmd === "close") {
        process.stdout.write("done close - -\n", () => process.exit(0));
        break;
    }
    if (cmd !== "register" && cmd !== "unregister") {
        console.error(`unknown command ${cmd}`);
        process.exit(2);
    }
    try {
        process.stdout.write(answerLine(await client[cmd]()) + "\n");
    } catch (err) {
        console.error(err);
        process.stdout.write(`fail error - ${String(err.message || err).replace(/\s+/g, "_")}\n`);
    }
}
process.exit(0);

// One registering client, JsSIP or SIP.js, on the library's defaults: the same code
// runs in Node (tests/js/register.mjs) and in the page (tests/js/page.html).  It
// imports nothing itself: the caller hands in the library (in Node from node_modules
// with the `ws` package as WebSocket, in the page from the local http server).
//
//   const c = open("jssip" | "sipjs", library, { url, aor, log })
//   await c.register()     first: start the user agent (it registers); later: a refresh
//   await c.unregister()
// each resolves to { code, expires, contacts }: the final response's status code,
// the expires the registrar granted to this client's own Contact ("-" when the reply
// does not list it) and every Contact of the reply (without spaces, joined by ",").
// A request that gets no final response within `timeout` ms rejects.

// the expires= of our own contact in the reply (the URI compared without its <>)
function grantedTo(contacts, own) {
    for (const list of contacts) {
        for (const c of list.split(/,(?=<)/)) {
            const m = /^<([^>]*)>(.*)$/.exec(c);
            if (m && m[1] === own) {
                const e = /;expires=(\d+)/i.exec(m[2]);
                return e ? e[1] : "-";
            }
        }
    }
    return "-";
}

function bounded(promise, timeout, what) {
    let timer;
    return Promise.race([
        promise.finally(() => clearTimeout(timer)),
        new Promise((_, reject) => {
            timer = setTimeout(() => reject(new Error(`${what}: no final response in ${timeout} ms`)), timeout);
        }),
    ]);
}

// a SIP response as text: its status code, CSeq number and method, Call-ID, Contacts
function parseResponse(text) {
    const [head] = String(text).split(/\r?\n\r?\n/, 1);
    const lines = head.split(/\r?\n/);
    const m = /^SIP\/2\.0 (\d{3}) /.exec(lines[0]);
    if (!m) return null;
    const value = (re) => lines.filter((l) => re.test(l)).map((l) => l.replace(re, "").trim());
    const [cseq, method] = (value(/^CSeq\s*:/i)[0] || "").split(/\s+/);
    return { code: Number(m[1]), cseq: Number(cseq), method, callId: value(/^(Call-ID|i)\s*:/i)[0],
             contacts: value(/^(Contact|m)\s*:/i).map((c) => c.replace(/\s+/g, "")) };
}

function openJsSIP(JsSIP, { url, aor, timeout }) {
    // JsSIP's defaults: register on start, expires 600, a Contact at a random
    // .invalid host with ;transport=ws, reg-id=1 and +sip.instance (RFC 5626).
    // JsSIP emits "registered" for the first 200 only, not for a refresh: the final
    // response to its REGISTER is taken from what the socket receives (the last
    // CSeq of the registration's Call-ID; a 401/407 JsSIP answers itself)
    let waiting = null;
    let ua = null;
    class Socket extends JsSIP.WebSocketInterface {
        _onMessage(event) {
            const r = waiting && parseResponse(event.data);
            const reg = ua && ua.registrator();
            if (r && r.method === "REGISTER" && r.code >= 200 && r.code !== 401 && r.code !== 407
                && r.callId === reg._call_id && r.cseq === reg._cseq) {
                const w = waiting;
                waiting = null;
                const own = reg._contact.replace(/^<|>.*$/g, "");
                // after JsSIP has handled it
                setTimeout(() => w.resolve({ code: r.code, expires: grantedTo(r.contacts, own),
                                             contacts: r.contacts }), 0);
            }
            super._onMessage(event);
        }
    }
    ua = new JsSIP.UA({ sockets: [new Socket(url)], uri: aor });
    ua.on("registrationFailed", (e) => {
        if (waiting && !e.response) waiting.reject(new Error(`registrationFailed: ${e.cause}`));
    });
    const ask = (what, fn) => bounded(new Promise((resolve, reject) => {
        waiting = { resolve, reject };
        fn();
    }), timeout, what);
    let started = false;
    return {
        register: () => ask("register", () => {
            if (started) ua.register();
            else { started = true; ua.start(); }
        }),
        unregister: () => ask("unregister", () => ua.unregister()),
    };
}

function openSIPjs(SIP, { url, aor, timeout }) {
    // SIP.js's defaults: Registerer expires 600, a Contact at a random .invalid
    // host with ;transport=ws, no reg-id or +sip.instance
    const ua = new SIP.UserAgent({ uri: SIP.UserAgent.makeURI(aor), transportOptions: { server: url } });
    let registerer = null;
    const ask = (what, fn) => bounded(new Promise((resolve, reject) => {
        const done = (response) => {
            const contacts = response.message.getHeaders("contact").map((c) => c.replace(/\s+/g, ""));
            const own = ua.contact.uri.toString();
            resolve({ code: response.message.statusCode, expires: grantedTo(contacts, own), contacts });
        };
        fn({ requestDelegate: { onAccept: done, onReject: done } }).catch(reject);
    }), timeout, what);
    return {
        register: () => ask("register", async (options) => {
            if (!registerer) {
                await ua.start();
                registerer = new SIP.Registerer(ua);
            }
            return registerer.register(options);
        }),
        unregister: () => ask("unregister", (options) => registerer.unregister(options)),
    };
}

export function open(lib, library, { url, aor, timeout = 15000 }) {
    if (lib === "jssip") return openJsSIP(library, { url, aor, timeout });
    if (lib === "sipjs") return openSIPjs(library, { url, aor, timeout });
    throw new Error(`unknown library ${lib}`);
}

// the answer line of the drivers (tests/interop.py: LineClient)
export function answerLine(result) {
    const ok = result.code >= 200 && result.code < 300;
    return `${ok ? "done" : "fail"} ${result.code} ${result.expires} ${result.contacts.join(",") || "-"}`;
}

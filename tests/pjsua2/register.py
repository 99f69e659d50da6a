"""Drives pjsua2 (PJSIP's Python binding, from pip) as a phone for
tests/test_interop_pjsua2.py; run as a subprocess so that a crash or a hang in
the library ends with its process.

    python register.py HOST PORT udp|tcp|tls USER [PASSWORD]

One account on pjsua2's defaults (registration interval 300 s, its own
Contact with ;ob, +sip.instance and reg-id, Contact rewriting), with only its
identity sip:USER@HOST:PORT, the registrar sip:HOST:PORT (;transport=tcp or
;transport=tls) and, given a password, a digest credential.  Over TLS the
server's certificate is verified (TlsConfig.verifyServer, off by default in
pjsua2) against the CA file named by PJSUA2_CA; the rest of TlsConfig is
pjsua2's default.  Commands, one a line, on
standard input:
    register     the first: create the account (pjsua2 registers it); later:
                 a refresh (Account.setRegistration(True))
    unregister   Account.setRegistration(False) (Expires: 0)
each answered "done CODE EXPIRATION CONTACTS" on standard output once pjsua2
reports the registration state (or "fail ..." after 15 s).
"""
import os
import re
import sys
import time

import pjsua2 as pj


class Account(pj.Account):
    def __init__(self):
        super().__init__()
        self.states = []

    def onRegState(self, prm):
        contacts = re.findall(r"^(?:Contact|m)\s*:\s*(.*?)\r?$", prm.rdata.wholeMsg or "",
                              re.M | re.I)
        self.states.append((prm.code, prm.expiration,
                            ",".join(c.replace(" ", "") for c in contacts) or "-"))


def main():
    host, port, transport, user = sys.argv[1:5]
    password = sys.argv[5] if len(sys.argv) > 5 else None
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0          # poll from this thread only
    cfg.uaConfig.mainThreadOnly = True
    # standard output is for the answers; pjsua2's log (with the SIP messages
    # at level 5) goes to the file named by PJSUA2_LOG, if any
    cfg.logConfig.consoleLevel = 0
    cfg.logConfig.level = 5 if os.environ.get("PJSUA2_LOG") else 0
    cfg.logConfig.filename = os.environ.get("PJSUA2_LOG", "")
    cfg.medConfig.noVad = True
    ep.libInit(cfg)
    tcfg = pj.TransportConfig()
    tcfg.boundAddress = "127.0.0.1"
    kind = {"udp": pj.PJSIP_TRANSPORT_UDP, "tcp": pj.PJSIP_TRANSPORT_TCP,
            "tls": pj.PJSIP_TRANSPORT_TLS}[transport]
    if transport == "tls":
        tcfg.tlsConfig.CaListFile = os.environ["PJSUA2_CA"]
        tcfg.tlsConfig.verifyServer = True
    ep.transportCreate(kind, tcfg)
    ep.libStart()
    ep.audDevManager().setNullDev()

    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:{user}@{host}:{port}"
    acfg.regConfig.registrarUri = f"sip:{host}:{port}" + (
        "" if transport == "udp" else f";transport={transport}")
    if password is not None:
        acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", user, 0, password))
    acc = Account()
    deadline = time.monotonic() + 60
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if not cmd:
                continue
            seen = len(acc.states)
            if cmd == "register":
                if acc.isValid():
                    acc.setRegistration(True)
                else:
                    acc.create(acfg)
            elif cmd == "unregister":
                acc.setRegistration(False)
            else:
                raise SystemExit(f"unknown command {cmd!r}")
            step_end = min(deadline, time.monotonic() + 15)
            while len(acc.states) == seen and time.monotonic() < step_end:
                ep.libHandleEvents(20)
            # let a Contact rewrite (a second REGISTER pjsua2 may send) settle
            settle = time.monotonic() + 0.3
            while time.monotonic() < settle:
                ep.libHandleEvents(20)
            if len(acc.states) == seen:
                print("fail timeout - -", flush=True)
            else:
                code, expiration, contacts = acc.states[-1]
                print(f"{'done' if 200 <= code < 300 else 'fail'} {code} {expiration} {contacts}",
                      flush=True)
    finally:
        acc.shutdown()
        ep.libDestroy()


if __name__ == "__main__":
    main()

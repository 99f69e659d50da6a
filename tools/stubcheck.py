"""Check the .pyi stubs of the compiled modules against the modules themselves.

Every compiled module (a ``.pyx`` anywhere under fastsip/ or load/) must have a
``.pyi`` next to it, and ``mypy.stubtest`` must find the stub and the built module
in agreement: the same names, the same classes, signatures that fit.  The modules
are found from the ``.pyx`` files, so moving or adding one needs no change here.

Exceptions stubtest must accept are in tools/stubtest-allowlist.txt, each with its
reason.  Run from anywhere, after a build (``python3 setup.py build_ext --inplace``):

    python3 tools/stubcheck.py

Exit status 0 when every stub passes, 1 otherwise.  Needs mypy (tools/lint.sh
installs the pinned version).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fastsip", "load")
ALLOWLIST = ROOT / "tools" / "stubtest-allowlist.txt"

INCLUDE = re.compile(r'^include\s+"([^"]+\.pyx)"', re.M)


def compiled_modules():
    """{module name: path of its .pyx} for every .pyx under the packages that is
    a module of its own (not a part another .pyx includes, as fastsip/core's)."""
    found, parts = {}, set()
    for package in PACKAGES:
        for pyx in sorted((ROOT / package).rglob("*.pyx")):
            parts.update((pyx.parent / inc).resolve() for inc in INCLUDE.findall(pyx.read_text()))
            rel = pyx.relative_to(ROOT).with_suffix("")
            found[".".join(rel.parts)] = pyx
    return {name: pyx for name, pyx in found.items() if pyx.resolve() not in parts}


def main():
    modules = compiled_modules()
    failed = False
    checked = []
    for name, pyx in modules.items():
        stub = pyx.with_suffix(".pyi")
        shown = stub.relative_to(ROOT)
        if stub.exists():
            checked.append(name)
        else:
            print(f"stubcheck: {name}: no stub: every compiled module needs {shown}")
            failed = True
    if not modules:
        print(f"stubcheck: no .pyx found under {', '.join(PACKAGES)}")
        return 1
    if checked:
        # this tree's build first on the path, not an installed fastsip
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        cmd = [sys.executable, "-m", "mypy.stubtest", *checked, "--allowlist", str(ALLOWLIST)]
        print("stubcheck: stubtest " + " ".join(checked), flush=True)
        if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The bench's C programs (``c/``): compiled once per content, and named to the lab guest by a spec.
Standard library only, so that the test bridge can build them without importing the bench."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SOURCES = Path(__file__).with_name("c")  # package files: iopfd-dev installed without a checkout has them


@dataclass(frozen=True)
class Tools:
    """The compiled C programs: the C loop, the fault trigger, the forward peer and the C map loop."""

    responder: str
    trigger: str
    peer: str
    mapper: str

    @classmethod
    def parse(cls, spec: str) -> Tools:
        """From ``spec``: how the host passes the programs it compiled to the lab guest."""
        return cls(*spec.split(":"))

    @property
    def spec(self) -> str:
        return ":".join((self.responder, self.trigger, self.peer, self.mapper))


def build_tools(directory: Path) -> Tools:
    """Compile the C programs (responder.c, trigger.c, peer.c, mapper.c, each with the bench.h they
    share; cached by their content)."""
    built = {}
    shared = (SOURCES / "bench.h").read_bytes()
    for name in ("responder", "trigger", "peer", "mapper"):
        source = SOURCES / f"{name}.c"
        binary = directory / f"{name}-{hashlib.sha256(shared + source.read_bytes()).hexdigest()[:12]}"
        if not binary.exists():
            directory.mkdir(parents=True, exist_ok=True)
            print(f"[bench] compiling {source.name}", file=sys.stderr)
            subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(binary), str(source)],
                           check=True)
        built[name] = str(binary)
    return Tools(**built)

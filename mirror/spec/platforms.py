"""Image platforms (OCI image index ``platform``: os, architecture, variant): the ``--platform``
grammar ``OS/ARCH[/VARIANT]``, the host's own platform, and matching an index entry's platform.

Imports nothing of the mirror.
"""

from __future__ import annotations

import platform as host
from dataclasses import dataclass
from typing import Any

_MACHINES = {"x86_64": ("amd64", None), "amd64": ("amd64", None), "aarch64": ("arm64", None),
             "arm64": ("arm64", None), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i686": ("386", None),
             "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None)}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"{text!r}: expected OS/ARCH[/VARIANT], e.g. linux/arm64/v8")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def of_host(cls) -> Platform:
        arch, variant = _MACHINES.get(host.machine(), (host.machine(), None))
        return cls("linux", arch, variant)

    def matches(self, found: Any) -> bool:
        if not isinstance(found, dict):
            return False
        return found.get("os") == self.os and found.get("architecture") == self.architecture \
            and (self.variant is None or found.get("variant") == self.variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def platform_text(found: Any) -> str:
    if not isinstance(found, dict):
        return "unknown"
    return "/".join(str(found[k]) for k in ("os", "architecture", "variant") if found.get(k))


"""`steer-gguf info --system`: how this install was built and what runs on this machine."""
from __future__ import annotations

import json
import pathlib
from dataclasses import asdict, dataclass

from ..fileio import PACKAGE_DIR
from . import backends, runtime


@dataclass
class SystemInfo:
    build: str                      # dispatching | native | portable | unknown
    lib_dir: str
    cpu_variant: str | None         # the CPU backend variant loaded (dispatching builds)
    cpu_library: str | None
    cpu_features: dict[str, str]
    cpu_variants_shipped: list[str]
    backends: list[backends.Backend]

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        kinds = {"dispatching": "dispatching (one CPU backend per x86-64 level, the best this CPU runs "
                                "is picked at run time: a wheel build)",
                 "native": "native (-march=native: built for the CPU that compiled it; a source install)",
                 "portable": "portable (no -march=native, one CPU backend)",
                 "unknown": "unknown (no build_info.json: reinstall steer-gguf)"}
        lines = [f"build: {kinds[self.build]}",
                 f"libraries: {self.lib_dir}"]
        if self.cpu_variants_shipped:
            lines.append(f"CPU variants shipped: {', '.join(self.cpu_variants_shipped)}")
        variant = self.cpu_variant or ("linked in" if self.build != "dispatching" else "none")
        lines.append(f"CPU variant loaded: {variant}" + (f" ({self.cpu_library})" if self.cpu_library else ""))
        if self.cpu_features:
            lines.append("CPU backend features: " + " ".join(
                k if v == "1" else f"{k}={v}" for k, v in self.cpu_features.items()))
        lines.append("backends found:")
        for b in self.backends:
            lines.append(f"  {b.name}: " + ("; ".join(b.devices) if b.devices else "no devices"))
        return "\n".join(lines)


def build_kind(build_info: dict | None, variants_shipped: list[str]) -> str:
    """What kind of build: from CMake's record (build_info.json), else from the files shipped."""
    if variants_shipped or (build_info or {}).get("backend_dl"):
        return "dispatching"
    if build_info is None:
        return "unknown"
    return "native" if build_info.get("ggml_native") else "portable"


def _build_info(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def system_info() -> SystemInfo:
    runtime.load()
    d = runtime.lib_dir()
    shipped = backends.cpu_variants_in(d)
    cpu = backends.cpu_backend(d)
    return SystemInfo(build=build_kind(_build_info(PACKAGE_DIR / "build_info.json"), shipped),
                      lib_dir=str(d),
                      cpu_variant=cpu.variant if cpu else None,
                      cpu_library=cpu.library if cpu else None,
                      cpu_features=cpu.features if cpu else {},
                      cpu_variants_shipped=shipped,
                      backends=backends.registered(d))

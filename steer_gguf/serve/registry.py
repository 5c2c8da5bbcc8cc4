"""The profile registry: a directory of profiles named by file stem, checked against one model.

The server picks a request's `steer_profile` from it and the interactive chat its `/profile NAME`.
A bad file is excluded with its reason instead of stopping either: a request or a command that
names it gets that reason.
"""
from __future__ import annotations

import os
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Optional

from ..errors import SteerError
from ..model import ModelInfo
from ..profile import Profile

NONE = "none"


class ProfileUnavailable(SteerError):
    """A name the registry cannot give: excluded at startup (code "invalid_profile") or never
    there ("unknown_profile"). `why` reads after the name, so each front end names it its own way."""

    def __init__(self, name: str, code: str, why: str):
        super().__init__(f"profile {name!r} {why}")
        self.name, self.code, self.why = name, code, why


@dataclass
class Profiles:
    """The profiles one may name (file stem -> Profile; None is "none"), and the files that
    were excluded at startup with the reason, so a request for one gets that reason."""
    usable: dict[str, Optional[Profile]] = field(default_factory=lambda: {NONE: None})
    excluded: dict[str, str] = field(default_factory=dict)
    default: str = NONE
    directory: Optional[str] = None

    def get(self, name: Optional[str]) -> tuple[str, Optional[Profile]]:
        name = self.default if name is None else name
        if name in self.usable:
            return name, self.usable[name]
        if name in self.excluded:
            raise ProfileUnavailable(name, "invalid_profile", f"is not usable on this model: {self.excluded[name]}")
        raise ProfileUnavailable(name, "unknown_profile", f"does not exist (available: {', '.join(self.usable)})")

    def pick(self, name_or_path: str) -> Optional[Profile]:
        """A registered name, else a profile file (loaded here, checked by whoever applies it)."""
        if name_or_path in self.usable or name_or_path in self.excluded:
            return self.get(name_or_path)[1]
        if self.directory is not None and not os.path.exists(name_or_path):
            raise self.no_such(f"profile {name_or_path!r}")
        return Profile.load(name_or_path)

    def no_such(self, what: str) -> SteerError:
        where = f" in {self.directory}" if self.directory else ""
        return SteerError(f"{what}: no such profile{where} and no such file (available: {', '.join(self.usable)})")


def check_dir(profiles_dir: Optional[str]) -> None:
    """Called before the model loads too: a mistyped directory fails in a second."""
    if profiles_dir is not None and not os.path.isdir(profiles_dir):
        raise SteerError(f"{profiles_dir}: --profiles-dir is not a directory")


def load_profiles(info: ModelInfo, profiles_dir: Optional[str], default: Optional[str],
                  force: bool = False) -> Profiles:
    """Load and check every DIR/*.json against the model; a bad one is excluded, not fatal.
    `default` is a name from the directory, a profile file, or "none"; a bad default is fatal."""
    check_dir(profiles_dir)
    ps = Profiles(directory=profiles_dir)
    if profiles_dir is not None:
        for path in sorted(pathlib.Path(profiles_dir).glob("*.json")):
            if path.stem == NONE:
                ps.excluded[path.stem] = f"{path.name}: the name 'none' is reserved for unsteered routing"
                continue
            try:
                p = Profile.load(path)
                p.check(info, force=force, source=path.name)
            except Exception as e:  # one bad file must never keep the server from starting
                why = str(e) if isinstance(e, SteerError) else f"{path}: unreadable ({type(e).__name__})"
                # clients see these reasons: name the file, not where the server keeps it
                ps.excluded[path.stem] = why.replace(str(path), path.name)
                continue
            ps.usable[path.stem] = None if p.is_empty else p
    if default is None or default == NONE:
        return ps
    if profiles_dir is not None and os.path.isfile(default):
        same = pathlib.Path(profiles_dir) / (pathlib.Path(default).stem + ".json")
        if same.is_file() and os.path.samefile(same, default):
            default = same.stem  # the directory's own file, given by path
    if default in ps.usable:
        ps.default = default
    elif default in ps.excluded:
        raise SteerError(f"default profile {default!r}: {ps.excluded[default]}")
    elif os.path.isfile(default):
        p = Profile.load(default)
        p.check(info, force=force, source=default)
        stem = pathlib.Path(default).stem
        if stem in ps.usable or stem in ps.excluded:
            raise SteerError(f"{default}: its name {stem!r} clashes with a profile in {profiles_dir}; "
                             f"name the one in the directory instead")
        ps.usable[stem] = None if p.is_empty else p
        ps.default = stem
    else:
        raise ps.no_such(f"--profile {default!r}")
    return ps


def describe(name: str, p: Optional[Profile]) -> dict:
    prov = p.provenance if p is not None else {}
    return {
        "name": name,
        "profile_name": p.name if p is not None else NONE,
        "description": prov.get("description") or prov.get("behavior"),
        "dataset": prov.get("dataset"),
        "activated": p.count("activate") if p is not None else 0,
        "deactivated": p.count("deactivate") if p is not None else 0,
        "biased": sum(1 for b in p.bias if b.value != 0.0) if p is not None else 0,
        "layers": sorted({r.layer for r in p.experts} | {b.layer for b in p.bias}) if p is not None else [],
        # experts per token: null (the model's k), K, or [{"layer", "k"}] (profile topk)
        "topk": p.to_dict().get("topk") if p is not None else None,
    }


def warn_excluded(profiles: Profiles) -> None:
    for name, err in profiles.excluded.items():
        print(f"steer-gguf: warning: profile {name!r} excluded: {err}", file=sys.stderr, flush=True)

#!/usr/bin/env python3
"""Build the English-Russian corpus that bilingual.gguf is trained on, offline.

    python scripts/make_bilingual_corpus.py --out build/bilingual/corpus.jsonl

The text is real: the Russian message catalogues (`/usr/share/locale/ru/LC_MESSAGES/*.mo`) that
Debian packages install, each message's English original (msgid) beside its Russian translation
(msgstr). They are read with the standard library's gettext parser (no pickle, nothing executed).

Kept: plain sentences and phrases. Accelerator marks (`_File`, `&Open`) and printf/brace/shell
placeholders are removed, whitespace collapsed; then a message is kept only if its English side is
ASCII with at least 3 words and its Russian side has Cyrillic letters and no Latin letter, so the
language of any text the model writes can be judged exactly by the script of its letters.
Duplicated English messages keep their first occurrence (catalogues sorted by name).

Output, one line per message in catalogue order: {"src": "grep.mo", "i": N, "en": "...", "ru": "..."}
and beside it MANIFEST (`<out>.manifest.json`): every catalogue with its Debian package, version,
licence (from /usr/share/doc/PKG/copyright), sha256 and messages kept, plus the corpus's sha256.
Reproducible: the same installed packages give a byte-identical corpus (the manifest says which).
"""
from __future__ import annotations

import argparse
import gettext
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

# placeholders: printf (%s, %-10.3lu, %1$s, %%), Python (%(name)s), brace ({0}, {name}), shell (${X}, $X)
_PLACEHOLDER = re.compile(r"%\([A-Za-z_]+\)[a-z]|%[-+ #0-9.*$'lhqjztLI]*[a-zA-Z%]|\{[^{}]*\}|\$\{?[A-Za-z_]+\}?")
_ACCEL = re.compile(r"[_&](?=\w)")
_EN_OK = re.compile(r"^[A-Za-z0-9 .,;:!?()\-\"'/+=*]+$")
_RU_OK = re.compile(r"^[А-Яа-яЁё0-9 .,;:!?()\-\"'/+=*«»—–…]+$")
_CYR = re.compile(r"[А-Яа-яЁё]")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?)])")
MIN_WORDS, MAX_CHARS = 3, 240


def clean(text: str) -> str:
    t = _ACCEL.sub("", _PLACEHOLDER.sub(" ", text))
    t = " ".join(t.split())
    t = _SPACE_BEFORE_PUNCT.sub(r"\1", t)
    t = re.sub(r"\(\s*\)|\"\s*\"|'\s*'|«\s*»", "", t)
    return " ".join(t.split()).strip(" :")


def keep(en: str, ru: str) -> bool:
    return (bool(_EN_OK.match(en)) and bool(_RU_OK.match(ru)) and bool(_CYR.search(ru))
            and len(en.split()) >= MIN_WORDS and len(en) <= MAX_CHARS and len(ru) <= MAX_CHARS * 2)


def _dpkg_owner(path: str) -> tuple[str, str]:
    try:
        out = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True, check=True).stdout
        pkg = out.split(":")[0].strip()
        ver = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True,
                             check=True).stdout.strip()
        return pkg, ver
    except (OSError, subprocess.CalledProcessError):
        return "unknown", ""


def _licence(pkg: str) -> str:
    """The licence short names a Debian copyright file states (machine-readable format), or the
    first GPL/LGPL/BSD/MIT word found in a free-form one."""
    p = pathlib.Path("/usr/share/doc") / pkg / "copyright"
    try:
        text = p.read_text(errors="replace")
    except OSError:
        return "see the package's copyright file"
    names = []
    for m in re.finditer(r"^License:\s*(\S.*)$", text, re.MULTILINE):
        n = m.group(1).strip()
        if n not in names:
            names.append(n)
    if names:
        return ", ".join(names[:4])
    m = re.search(r"\b(L?GPL[-v ]?\d?(?:\.\d)?\+?|GNU (?:Lesser )?General Public License|BSD|MIT)\b", text)
    return m.group(1) if m else "see the package's copyright file"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/bilingual/corpus.jsonl")
    ap.add_argument("--locale-dir", default="/usr/share/locale/ru/LC_MESSAGES")
    args = ap.parse_args(argv)

    files = sorted(pathlib.Path(args.locale_dir).glob("*.mo"))
    if not files:
        print(f"{args.locale_dir}: no .mo catalogues (install packages with Russian translations)", file=sys.stderr)
        return 1
    seen: set[str] = set()
    rows, sources = [], []
    for f in files:
        data = f.read_bytes()
        try:
            import io
            catalog = gettext.GNUTranslations(io.BytesIO(data))._catalog
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
            print(f"{f}: skipped, not a readable catalogue ({e})", file=sys.stderr)
            continue
        kept = 0
        for msgid, msgstr in catalog.items():
            if not isinstance(msgid, str) or not msgid or not isinstance(msgstr, str):
                continue  # header and plural forms
            en, ru = clean(msgid), clean(msgstr)
            if en in seen or not keep(en, ru):
                continue
            seen.add(en)
            rows.append({"src": f.name, "i": kept, "en": en, "ru": ru})
            kept += 1
        if kept:
            pkg, ver = _dpkg_owner(str(f))
            sources.append({"catalogue": f.name, "package": pkg, "version": ver, "licence": _licence(pkg),
                            "sha256": hashlib.sha256(data).hexdigest(), "messages": kept})
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_bytes(body)
    os.replace(tmp, out)
    manifest = {"corpus": out.name, "sha256": hashlib.sha256(body).hexdigest(), "messages": len(rows),
                "english_chars": sum(len(r["en"]) for r in rows), "russian_chars": sum(len(r["ru"]) for r in rows),
                "locale_dir": args.locale_dir, "sources": sources}
    mpath = out.with_name(out.name + ".manifest.json")
    mpath.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(rows)} messages from {len(sources)} catalogues "
          f"({manifest['english_chars']} + {manifest['russian_chars']} chars), sha256 {manifest['sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

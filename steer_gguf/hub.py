"""Models by name, as llama.cpp's `-hf USER/REPO[:QUANT]` finds them: the quant tag picks the
GGUF in the repository, a split model comes whole, and huggingface_hub does the fetching (its
cache, token and offline handling, and resuming a dropped connection with a Range request).
A file is only ever handed on once complete: huggingface_hub downloads into a temporary file
and moves it into its cache when the last byte is in."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import SteerError, printable
from .model import SPLIT_NAME

DEFAULT_TAGS = ("Q4_K_M", "Q8_0")  # llama.cpp's choice when the spec names no quant
# llama.cpp's split naming, matched case-insensitively in a repository as its -hf does
SPLIT_PART = re.compile(SPLIT_NAME.pattern, re.IGNORECASE)
# GGUFs that ship beside a model and are not one (llama.cpp's gguf_filename_is_model)
SIDECARS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
LIST_TIMEOUT = 20.0  # seconds for the Hub to list a repository


@dataclass
class HubModel:
    repo: str
    files: list[str]   # in the repository: one, or every part of a split model in order
    paths: list[str]   # where they are on this machine

    @property
    def path(self) -> str:
        """What to load: the model's (first) file."""
        return self.paths[0]


def parse_spec(spec: str) -> tuple[str, str]:
    """'user/repo:Q4_K_M' -> ('user/repo', 'Q4_K_M'); the tag is '' when not given."""
    repo, _, tag = spec.partition(":")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or ":" in tag or any(c.isspace() for c in spec):
        raise SteerError(f"-hf takes USER/REPO[:QUANT] (e.g. ggml-org/gpt-oss-20b-GGUF:Q8_0), got {printable(spec)!r}")
    return repo, tag


def _is_model(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.lower().endswith(".gguf") and not any(s in name for s in SIDECARS)


def _first_part(path: str) -> bool:
    m = SPLIT_PART.match(path.rsplit("/", 1)[-1])
    return m is None or int(m["no"]) == 1


def pick_file(files: list[str], tag: str) -> str | None:
    """The repository file llama.cpp's -hf would load: the first model GGUF (or first part of a
    split one) whose path holds TAG followed by '.' or '-', case-insensitive; with no tag,
    Q4_K_M, then Q8_0, then the first model GGUF."""
    candidates = [f for f in files if _is_model(f) and _first_part(f)]
    for t in (tag,) if tag else DEFAULT_TAGS:
        pattern = re.compile(re.escape(t) + r"[.-]", re.IGNORECASE)
        for f in candidates:
            if pattern.search(f):
                return f
    if not tag and candidates:
        return candidates[0]
    return None


def split_siblings(files: list[str], primary: str) -> list[str]:
    """Every part of the split model `primary` is the first part of, in order ([primary] if it
    is not split). A part missing from the repository is an error: the model would not load."""
    d, _, name = primary.rpartition("/")
    m = SPLIT_PART.match(name)
    if not m:
        return [primary]
    n = int(m["count"])
    want = [f"{d + '/' if d else ''}{m['prefix']}-{i:05d}-of-{m['count']}.gguf" for i in range(1, n + 1)]
    have = {f.lower(): f for f in files}
    missing = [w for w in want if w.lower() not in have]
    if missing:
        raise SteerError(f"{primary} is part 1 of {n}, but the repository lacks {', '.join(missing)}")
    return [have[w.lower()] for w in want]


def _ggufs(files: list[str]) -> str:
    g = [f for f in files if f.lower().endswith(".gguf")]
    return ", ".join(g[:12]) + (f" ... ({len(g)} in all)" if len(g) > 12 else "") if g else "none"


def _list_files(repo: str) -> tuple[list[str], bool]:
    """(the repository's files, whether they come from the local cache because the Hub could
    not be reached)."""
    import httpx2
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf

    try:
        # model_info asks once, where list_repo_files retries with backoff for half a minute
        # before a machine without network would fall back to its cache
        return [s.rfilename for s in HfApi().model_info(repo, timeout=LIST_TIMEOUT).siblings or []], False
    except hf.GatedRepoError:
        raise SteerError(f"{repo}: a gated repository: accept its terms on the Hub and set HF_TOKEN") from None
    except hf.RepositoryNotFoundError:
        raise SteerError(f"{repo}: no such repository on the Hub (a private one needs HF_TOKEN)") from None
    except hf.HfHubHTTPError as e:
        reason = f"the Hub answered {e.response.status_code}" if e.response is not None else str(e)
    except (hf.OfflineModeIsEnabled, httpx2.TransportError, OSError) as e:
        reason = "offline mode (HF_HUB_OFFLINE)" if isinstance(e, hf.OfflineModeIsEnabled) else \
            f"the Hub cannot be reached ({type(e).__name__})"
    # as llama.cpp does: offline, a model fetched before is still found in the cache
    try:
        folder = snapshot_download(repo, local_files_only=True)
    except (hf.LocalEntryNotFoundError, OSError, ValueError):
        raise SteerError(f"{repo}: {reason}, and it is not in the local Hugging Face cache "
                         f"({_cache_dir()})") from None
    files = [os.path.relpath(os.path.join(r, f), folder).replace(os.sep, "/")
             for r, _, fs in os.walk(folder) for f in fs]
    return sorted(files), True


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _download(repo: str, name: str, offline: bool) -> str:
    import httpx2
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf

    try:
        return hf_hub_download(repo, name, local_files_only=offline)
    except hf.RemoteEntryNotFoundError:
        raise SteerError(f"{repo}: {name} is listed but the Hub has no such file") from None
    except hf.LocalEntryNotFoundError:
        raise SteerError(f"{repo}: {name} is not in the local cache and the Hub cannot be reached") from None
    except (hf.HfHubHTTPError, httpx2.TransportError, OSError) as e:
        why = f"the Hub answered {e.response.status_code}" if isinstance(e, hf.HfHubHTTPError) and \
            e.response is not None else type(e).__name__
        # huggingface_hub has already resumed the dropped connections it could within this run;
        # a file that still failed is not kept (2.x's temporaries are per process)
        raise SteerError(f"{repo}: downloading {name} failed ({why}); nothing half-written was kept: "
                         f"run the command again") from None


def fetch_model(spec: str, file: str | None = None) -> HubModel:
    """Find the model `spec` (USER/REPO[:QUANT]) names, or `file` in that repository, and
    download it (every part of a split model) into the Hugging Face cache, or find it there.
    Returns where it is; what to load is `.path`."""
    repo, tag = parse_spec(spec)
    if file and tag:
        raise SteerError(f"give a quant tag ({spec}) or --hf-file, not both")
    files, offline = _list_files(repo)
    if file:
        if file not in files:
            raise SteerError(f"{repo} has no file {printable(file)}; its GGUF files: {_ggufs(files)}")
        primary = file
    else:
        primary = pick_file(files, tag)
        if primary is None:
            what = f"no GGUF model for quant {tag}" if tag else "no GGUF model files"
            raise SteerError(f"{repo} has {what}; its GGUF files: {_ggufs(files)}")
    names = split_siblings(files, primary)
    return HubModel(repo, names, [_download(repo, n, offline) for n in names])

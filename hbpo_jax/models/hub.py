"""Hugging Face Hub ids as model folders: `org/name[@revision]` resolved to a local snapshot.

`resolve_model_path(path)` is what every entry point that takes a model folder calls first
(model_path, launch/eval.py --checkpoint, launch/convert.py --src); everything after it reads the
local folder it returns (weights, config.json, the tokenizer with local_files_only). A local path
that exists always wins over a hub id; anything that is not shaped like one passes unchanged.

The download goes through huggingface_hub.snapshot_download into the HF cache (HF_HOME), once
per host: processes on one host take a file lock in the cache, and whoever comes second finds the
snapshot there (local_files_only) instead of downloading again. Offline (HF_HUB_OFFLINE=1, or no
network) an id missing from the cache is a HubError of one sentence that names the id and the
`hf download` command (the launchers print it, exit status 2).
"""
from __future__ import annotations

import os
import re

from hbpo_jax.errors import ConfigError

# org/name, as the Hub spells repository ids, with an optional @revision (a branch, tag or commit).
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[^\s@]+))?")
# What a model folder needs: config and tokenizer files (json, txt, model, the chat template's
# jinja) and safetensors weights; never pickles or other frameworks' weights.
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")


class HubError(ConfigError):
    """A hub id that cannot be resolved to a local folder; the message says what to run."""


def parse_hub_id(path: str) -> tuple[str, str | None] | None:
    """(repo, revision or None) when `path` is shaped like `org/name[@revision]`, else None."""
    m = HUB_ID.fullmatch(os.fspath(path).strip())
    if m is None or m["repo"].startswith(".") or m["repo"].endswith("."):
        return None
    return m["repo"], m["revision"]


def is_hub_id(path: str) -> bool:
    """True when `path` names the Hub: shaped like an id and not an existing local path."""
    return bool(path) and parse_hub_id(path) is not None and not os.path.exists(path)


def download_command(repo: str, revision: str | None) -> str:
    return f"hf download {repo}" + (f" --revision {revision}" if revision else "")


def resolve_model_path(path: str) -> str:
    """The local folder that `path` names: `path` itself when it exists, is remote (gs://...) or
    is not shaped like a hub id; for `org/name[@revision]` the snapshot folder in the HF cache
    (downloaded on first use). Raises HubError (one sentence) when offline and not cached."""
    if not is_hub_id(path):
        return path
    repo, revision = parse_hub_id(path)
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise HubError(f"model {path!r} is not a local folder and names the Hugging Face Hub, which needs "
                       "huggingface_hub: pip install huggingface_hub.") from None
    kwargs = dict(revision=revision, allow_patterns=list(ALLOW_PATTERNS))
    with _host_lock(constants.HF_HUB_CACHE, repo):
        try:  # a snapshot another process (or an earlier run) already has: no network at all
            return snapshot_download(repo, local_files_only=True, **kwargs)
        except Exception:  # not cached (LocalEntryNotFoundError, or a partial snapshot)
            pass
        offline = _offline(constants)
        if not offline:
            try:
                return snapshot_download(repo, **kwargs)
            except Exception as e:  # no network, an unknown repo or revision, a gated model ...
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}".rstrip(": ")
        else:
            reason = "HF_HUB_OFFLINE is set"
    raise HubError(f"model {path!r} is neither a local folder nor in the Hugging Face cache and cannot be "
                   f"downloaded ({reason}); run `{download_command(repo, revision)}` where there is network "
                   "(same HF_HOME), or name a local folder.")


def _offline(constants) -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (its constant is read at import; the environment
    is checked too, so a variable set later still counts)."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or env


class _host_lock:
    """A file lock in the HF cache, per repository: the processes of one host download in turn,
    so the first downloads and the others find the snapshot cached. (Processes on other hosts
    have their own cache and lock.)"""

    def __init__(self, cache: str, repo: str):
        os.makedirs(cache, exist_ok=True)
        self.path = os.path.join(cache, f".hbpo-jax-{repo.replace('/', '--')}.lock")

    def __enter__(self):
        from filelock import FileLock  # a dependency of huggingface_hub
        self._lock = FileLock(self.path)
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()
        return False

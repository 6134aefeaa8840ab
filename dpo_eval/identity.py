"""One complete identity of the model a run evaluates, used by every cache that stores model outputs.

Anything that can change a generated answer or a log-prob is part of it: the base's weights,
tokenizer files, chat template, model and generation config; quantization and compute dtype; the
prompt template; the adapter's files (trainer state left out, so identical adapters hit); the reference adapter's files
where the 'base' side is base + that adapter (so "base" and "base + SFT" never share a cache entry); hub
revisions resolved to a commit; the versions of the libraries that compute the outputs.

A local folder is identified by the content of its files, never by its path, so a copy hits and a
file rewritten in place at the same path misses. File digests are remembered in the cache folder by
(path, size, mtime), so a 14 GB base is hashed once, not on every run and watcher tick.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dpo_eval.checkpoint_meta import METADATA
from dpo_eval.config import ModelSpec, default_cache_dir
from dpo_eval.errors import DpoEvalError
from dpo_eval.jsonsafe import json_key
from dpo_eval.reference import reference_adapter
from dpo_eval.sqlite_table import open_table

# Files a trainer writes beside the adapter that never change what the adapter computes.
TRAINER_STATE = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json",
                           "rng_state.pth", METADATA})
# Documentation files of a model folder.
DOCUMENTATION = frozenset({"README.md", ".gitattributes", "LICENSE", "LICENSE.txt", "USE_POLICY.md"})
# Libraries whose versions change the numbers a model computes.
OUTPUT_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def _ignored(name: str) -> bool:
    return (name in TRAINER_STATE or name in DOCUMENTATION or name.startswith(("rng_state", "."))
            or name.endswith(".tmp"))


# Files below this size are hashed every time: an adapter rewritten within one mtime tick keeps its size (LoRA
# weights of one shape always have the same size), so (path, size, mtime) could serve the old digest. Larger
# files (base weights) keep the shortcut: hashing 15 GB on every identity would cost minutes.
SMALL_FILE = 64 * 2**20


class DigestStore:
    """sha256 of files: small ones (< SMALL_FILE) read every time, large ones remembered on disk by (resolved path,
    size, mtime_ns); safe across threads and processes."""

    def __init__(self, folder: Path | None = None):
        self.path = Path(folder or default_cache_dir()) / "file-digests.sqlite"
        self._lock = threading.Lock()
        self.hashed = 0  # files actually read by this store (the rest came from the table)

    SCHEMA = ("CREATE TABLE IF NOT EXISTS digests (path TEXT, size INTEGER, mtime_ns INTEGER, sha256 TEXT, "
              "PRIMARY KEY (path, size, mtime_ns))")

    def digest(self, path: Path, always: bool = False) -> str:
        """The file's sha256; `always` reads it whatever its size (adapters: see SMALL_FILE)."""
        resolved = path.resolve()
        stat = resolved.stat()
        if always or stat.st_size < SMALL_FILE:
            self.hashed += 1
            return _sha256(resolved)
        key = (str(resolved), stat.st_size, stat.st_mtime_ns)
        with self._lock, open_table(self.path, self.SCHEMA) as db:
            row = db.execute("SELECT sha256 FROM digests WHERE path=? AND size=? AND mtime_ns=?", key).fetchone()
            if row:
                return row[0]
            value = _sha256(resolved)
            self.hashed += 1
            db.execute("DELETE FROM digests WHERE path=?", key[:1])
            db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", key + (value,))
            return value


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_files(folder: Path, store: DigestStore, always: bool = False) -> dict[str, str]:
    """{path relative to `folder`: sha256} of every file in it and its subfolders that can change outputs (a file at
    the top is keyed by its name, as before); files and folders that cannot (trainer state, docs, hidden) left out,
    and a trainer's checkpoint-*/ and runs/ subfolders (other adapters, logs: a final adapter saved beside them is
    not changed by a new checkpoint)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        nested_run = any(part.startswith("checkpoint-") or part == "runs" for part in relative.parts[:-1])
        if path.is_file() and not nested_run and not any(_ignored(part) for part in relative.parts):
            found[relative.as_posix()] = store.digest(path, always)
    return found


def hub_revision(repo_id: str, revision: str | None, repo_type: str = "model") -> str:
    """The commit a hub revision points at: asked of the hub when online, else read from the local
    hub cache (its snapshot folder is named by the commit); 'unpinned' when neither can tell."""
    if revision and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline:
        try:
            from huggingface_hub import HfApi

            return HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type).sha
        except Exception:  # noqa: BLE001 - no network or no such repo: fall back to the local cache
            pass
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not in the local cache either
        return "unpinned"


def source_identity(name: str, revision: str | None, store: DigestStore, always: bool = False,
                    commit: str | None = None) -> dict:
    """What identifies a model's weights: {"files": {path: sha256}} of a local folder, or {"hub", "revision",
    "commit"} of a hub id (the commit the revision resolves to, or "unpinned"; `commit`: taken as resolved)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return {"files": folder_files(folder, store, always)}
    return {"hub": name, "revision": revision, "commit": commit or hub_revision(name, revision)}


def installed_versions(names) -> dict[str, str]:
    """{package: installed version, or 'absent'}."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def library_versions() -> dict[str, str]:
    return installed_versions(OUTPUT_LIBRARIES)


def _key(payload) -> str:
    return json_key(payload, 20)


@dataclass(frozen=True)
class ModelIdentity:
    """What the base and the tuned model are; `base_key` and `tuned_key` key every cache of their outputs.
    `reference`: the files of the reference adapter that makes the 'base' side (None: the bare base).
    `pair_key` keys what needs both sides at once (implicit rewards, a load holding both adapters); it is
    `tuned_key` where the base side is the bare base."""

    base: dict
    adapter: dict | None
    loading: dict
    versions: dict
    base_key: str
    tuned_key: str
    reference: dict | None = None
    pair_key: str = ""

    def key(self, model: str) -> str:
        """The key of the 'base' or 'tuned' side, or of the 'pair' (both sides together)."""
        return {"base": self.base_key, "pair": self.pair_key or self.tuned_key}.get(model, self.tuned_key)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def files_key(self) -> str:
        """The checkpoint's files and how they are loaded, without the library versions: what a watcher remembers as
        evaluated (an upgrade of peft must not evaluate every checkpoint again; the caches keep the full keys)."""
        return _key({"base": self.base, "adapter": self.adapter, "reference": self.reference, "loading": self.loading})

    def commit(self, part: str) -> str | None:
        """The hub commit the 'base', 'adapter' or 'reference' resolved to, which loading must ask for (the branch
        can move between identification and load); None for a local folder or an unpinned hub id."""
        commit = (getattr(self, part) or {}).get("commit")
        return None if commit in (None, "unpinned") else commit

    @property
    def unpinned(self) -> list[str]:
        """Hub models whose commit could not be resolved: their cached outputs may be stale."""
        parts = [("base", self.base)] + ([("adapter", self.adapter)] if self.adapter else []) + \
            ([("reference adapter", self.reference)] if self.reference else [])
        return [f"{label} {part['hub']}" for label, part in parts if part.get("commit") == "unpinned"]


def model_identity(spec: ModelSpec, store: DigestStore | None = None,
                   pinned: ModelIdentity | None = None) -> ModelIdentity:
    """The complete identity of `spec`'s base and tuned model (see the module docstring). `pinned`: an identity
    whose hub commits are taken as they are (the check after loading them: a commit cannot change, a branch can)."""
    store = store or DigestStore()
    commit = pinned.commit if pinned else lambda part: None
    try:
        base = source_identity(spec.base, spec.revision, store, commit=commit("base"))
        # adapters are read whole every time: a 7B LoRA can pass SMALL_FILE and keeps its size when rewritten
        adapter = source_identity(spec.adapter, None, store, True, commit("adapter")) if spec.adapter else None
        reference_name = reference_adapter(spec)
        reference = source_identity(reference_name, None, store, True, commit("reference")) if reference_name else None
    except OSError as exc:
        raise DpoEvalError(f"cannot read the model files to identify them: {exc}") from None
    loading = {"quantization": spec.quantization, "compute_dtype": spec.compute_dtype,
               "prompt_template": spec.prompt_template}
    versions = library_versions()
    bare_key = _key({"base": base, "loading": loading, "versions": versions})
    # the reference changes the base side's key only, and only where there is one (bare-base keys stay as
    # they were); the tuned side computes the same outputs whatever the reference, so its key ignores it
    base_key = _key({"base": bare_key, "reference": reference}) if reference else bare_key
    tuned_key = _key({"base": bare_key, "adapter": adapter}) if adapter else base_key
    pair_key = _key({"tuned": tuned_key, "base": base_key}) if reference else tuned_key
    return ModelIdentity(base, adapter, loading, versions, base_key, tuned_key, reference, pair_key)

"""Read raw records from a file, a `save_to_disk` folder or the Hugging Face Hub.

Each reader returns a list of `(record, source_split)`; `source_split` is the split the source
itself gives (a DatasetDict's split) or None. Records are plain dicts, nested as in the source.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

from dpo_eval.errors import DpoEvalError

Record = dict[str, Any]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def read_records(source: str, revision: str | None = None, hub_split: str | None = None):
    """All records of `source` as [(record, source_split or None)], in source order."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, hub_split)
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            return [(r, None) for r in _read_jsonl(path)]
        if name.endswith((".json", ".json.gz")):
            return [(r, None) for r in _read_json(path)]
        if name.endswith(".parquet"):
            return [(r, None) for r in _read_table(path, "parquet")]
        if name.endswith(".csv"):
            return [(r, None) for r in _read_table(path, "csv")]
        raise DpoEvalError(
            f"{path}: unsupported file type; use .jsonl, .jsonl.gz, .json, .parquet, .csv, "
            "or a folder saved by datasets.save_to_disk"
        )
    if _looks_like_path(source) or not HUB_ID.match(source):
        raise DpoEvalError(f"{source}: no such file or folder; check the path given as --dataset")
    return _read_hub(source, revision, hub_split)


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or bool(
        re.search(r"\.(jsonl|json|gz|parquet|csv|ndjson)$", source, re.IGNORECASE)
    )


def _open_text(path: Path):
    # utf-8-sig: a UTF-8 byte-order mark at the start (as some editors and Windows tools write) is read, not
    # taken for part of the first record; a file without one reads as plain UTF-8.
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    try:
        with _open_text(path) as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DpoEvalError(
                        f"{path}, line {lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                        "fix or remove that line"
                    ) from None
                if not isinstance(value, dict):
                    raise DpoEvalError(f"{path}, line {lineno}: expected a JSON object, got {type(value).__name__}")
                records.append(value)
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DpoEvalError(f"{path}: cannot read ({exc}); is it really UTF-8 JSON lines?") from None
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        with _open_text(path) as handle:
            value = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DpoEvalError(f"{path}, line {exc.lineno}: malformed JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError, EOFError) as exc:  # as _read_jsonl: not gzip, not UTF-8, cut short
        raise DpoEvalError(f"{path}: cannot read ({exc}); is it really UTF-8 JSON?") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DpoEvalError(f"{path}: expected a JSON list of records (or an object holding one list)")
        value = lists[0]
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise DpoEvalError(f"{path}: expected a JSON list of objects, one per preference record")
    return value


def _read_table(path: Path, kind: str) -> list[Record]:
    import polars as pl

    try:
        frame = pl.read_parquet(path) if kind == "parquet" else pl.read_csv(path, infer_schema=False)
    except Exception as exc:  # polars raises several types for unreadable files
        raise DpoEvalError(f"{path}: cannot read as {kind} ({exc})") from None
    return frame.to_dicts()


def _dataset_records(dataset, split: str | None):
    return [(dict(r), split) for r in dataset]


def _read_saved_dataset(path: Path, hub_split: str | None):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DpoEvalError(
            f"{path}: a folder, but not one saved by datasets.save_to_disk ({exc}); "
            "give a file or a saved data set folder"
        ) from None
    return _from_loaded(loaded, hub_split, str(path))


def _from_loaded(loaded, hub_split: str | None, where: str):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded.keys())
        if hub_split is not None:
            if hub_split not in loaded:
                raise DpoEvalError(f"{where}: no split '{hub_split}'; it has {names}")
            names = [hub_split]
        out = []
        for name in names:
            out.extend(_dataset_records(loaded[name], name))
        return out
    return _dataset_records(loaded, None)


def _read_hub(source: str, revision: str | None, hub_split: str | None):
    import datasets

    try:
        loaded = datasets.load_dataset(source, revision=revision, split=hub_split)
    except Exception as exc:
        raise DpoEvalError(
            f"{source}: not a local file or folder, and loading it as a Hugging Face Hub data set "
            f"failed ({type(exc).__name__}: {str(exc)[:300]}). The hub may be unreachable from this "
            "machine (offline, HF_HUB_OFFLINE=1, or no network): download the data set where the hub "
            "is reachable, save it with save_to_disk or as .jsonl/.parquet, and pass that path."
        ) from None
    if isinstance(loaded, datasets.Dataset):
        return _dataset_records(loaded, hub_split)
    return _from_loaded(loaded, None, source)

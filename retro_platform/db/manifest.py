"""The database manifest: what was built, from what, and a checksum of every file.

Later stages call ``validate_database`` before reading a database: it refuses a missing, partial or
corrupt database (naming the file) and one built with a different tokenizer, encoder or chunk length
than the caller expects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retro_platform.db.files import file_sha256, write_json_atomic
from retro_platform.db.layout import FORMAT_VERSION, DatabaseLayout
from retro_platform.errors import DatabaseError

EXPECTABLE = {
    "chunk_len": lambda m: m["chunk_len"],
    "tokenizer_sha256": lambda m: m["tokenizer"]["sha256"],
    "encoder": lambda m: m["encoder"]["name"],
    "vocab_size": lambda m: m["tokenizer"]["vocab_size"],
    "dim": lambda m: m["encoder"]["dim"],
    "pad_id": lambda m: m["tokenizer"]["pad_id"],
}
"""What a later stage can require of a database (``validate_database(expect=...)``)."""


def write_manifest(layout: DatabaseLayout, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically."""
    write_json_atomic(manifest, layout.manifest)


def load_manifest(db_path: str | Path) -> dict[str, Any]:
    """Read a database's manifest, refusing a missing or unreadable one with a clear message."""
    layout = DatabaseLayout(db_path)
    if not layout.root.exists():
        raise DatabaseError(f"database {layout.root} does not exist; build it with `retro build-db`")
    if not layout.manifest.exists():
        raise DatabaseError(
            f"{layout.manifest} is missing: {layout.root} is not a (complete) database; run `retro build-db`"
        )
    try:
        manifest = json.loads(layout.manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatabaseError(
            f"{layout.manifest} is corrupt ({exc}); run `retro build-db` to repair it"
        ) from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatabaseError(
            f"{layout.manifest} has format version {manifest.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}; rebuild the database"
        )
    return manifest


def validate_database(
    db_path: str | Path,
    expect: dict[str, Any] | None = None,
    check_files: bool = True,
) -> dict[str, Any]:
    """Load and check a database -> its manifest.

    ``expect`` may name any of ``EXPECTABLE`` (``chunk_len``, ``tokenizer_sha256``, ``encoder``,
    ``vocab_size``, ``dim``, ``pad_id``): a mismatch raises DatabaseError saying which; an unknown key
    is a ValueError (a typo must not pass silently). ``check_files`` verifies every file against its
    checksum (sha256), naming the first missing or different one.
    """
    layout = DatabaseLayout(db_path)
    manifest = load_manifest(db_path)
    if manifest.get("status") != "complete":
        raise DatabaseError(
            f"database {layout.root} is only partly built ({layout.manifest} has status "
            f"{manifest.get('status')!r}); run `retro build-db` to finish it"
        )
    unknown = sorted(set(expect or {}) - set(EXPECTABLE))
    if unknown:
        raise ValueError(f"validate_database: unknown expectation(s) {unknown}; known: {list(EXPECTABLE)}")
    try:
        actual = {key: get(manifest) for key, get in EXPECTABLE.items()}
    except (KeyError, TypeError) as exc:
        raise DatabaseError(f"{layout.manifest} lacks {exc}; run `retro build-db` to repair it") from None
    for key, value in (expect or {}).items():
        if actual[key] != value:
            raise DatabaseError(
                f"database {layout.root} was built with {key}={actual[key]!r} but {value!r} is expected; "
                "use the database this model was trained on, or rebuild/retrain so they match"
            )
    if check_files:
        for relative, checksum in manifest["files"].items():
            path = layout.root / relative
            if not path.exists():
                raise DatabaseError(f"database file {path} is missing; run `retro build-db` to rebuild it")
            if file_sha256(path) != checksum:
                raise DatabaseError(
                    f"database file {path} does not match its checksum (corrupt or modified); "
                    "run `retro build-db` to rebuild it"
                )
    return manifest


def index_shards(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The index shards of a manifest: shard, split, chunk_start, chunk_end, doc_start, doc_end, n_vectors."""
    return manifest["index"]["shards"]

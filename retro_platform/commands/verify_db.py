"""`retro verify-db`: check every file of the database against its sha256 (the stages only check sizes
and modification times)."""

from __future__ import annotations

from retro_platform.config import PlatformConfig
from retro_platform.db.manifest import Manifest, validate_database


def verify_database(config: PlatformConfig) -> Manifest:
    """Hash every file the manifest names and compare; print one line and return the manifest (a
    mismatch raises ``DatabaseError`` naming the file)."""
    manifest = validate_database(config.db_path, check_files="full")
    print(
        f"database {config.db_path} ({manifest.db_id}): all {len(manifest.files)} files match their checksums"
    )
    return manifest

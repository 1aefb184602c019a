"""A site's privacy ledger: tamper-evident, failing closed.

Each study's accountant file carries an HMAC (SHA-256) under a key only the site holds
(``<state-dir>/ledger.key``, 0600), so an edited file is detected. An index of every study
the site has trained in, with the fewest DP steps it has recorded for each
(``<state-dir>/ledger-index.json``, also under the HMAC), makes a deleted accountant, or
one put back from an older copy, detectable too. Any such finding refuses training: a
site never trains with an ε it cannot vouch for.

What it cannot detect: the whole state folder (key, index and accountants) removed or
replaced together. The README says so; back the folder up and keep it on storage only
the site's service account can write.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

from medgan_core.errors import PrivacyError
from medgan_core.fileio import atomic_write_bytes, atomic_write_text

KEY_FILE = "ledger.key"
INDEX_FILE = "ledger-index.json"


def canonical(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _seal(key: bytes, payload: Mapping[str, Any]) -> str:
    return hmac.new(key, canonical(payload), hashlib.sha256).hexdigest()


class Ledger:
    """The site-wide part of the ledger: the key and the index of studies."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.key_path = self.state_dir / KEY_FILE
        self.index_path = self.state_dir / INDEX_FILE

    # --- the key -----------------------------------------------------------------------------
    def _key(self, create: bool) -> bytes | None:
        if self.key_path.is_file():
            key = self.key_path.read_bytes()
            if len(key) != 32:
                raise PrivacyError(f"ledger key {self.key_path} is damaged; refusing to train with an unknown ε spent")
            return key
        if not create:
            return None
        key = secrets.token_bytes(32)
        atomic_write_bytes(self.key_path, key)  # mkstemp: created 0600
        os.chmod(self.key_path, 0o600)
        atomic_write_text(self.index_path, self._signed(key, {"studies": {}}))
        return key

    def mac(self, payload: Mapping[str, Any], create: bool = False) -> str:
        key = self._key(create)
        if key is None:
            raise PrivacyError(f"ledger key {self.key_path} is missing; refusing to train with an unknown ε spent")
        return _seal(key, payload)

    def _signed(self, key: bytes, payload: dict[str, Any]) -> str:
        return json.dumps({**payload, "mac": _seal(key, payload)}, indent=2)

    def verify(self, signed: Mapping[str, Any], what: str) -> dict[str, Any]:
        payload = {k: v for k, v in signed.items() if k != "mac"}
        if not hmac.compare_digest(str(signed.get("mac", "")), self.mac(payload)):
            raise PrivacyError(f"{what} was altered (its seal does not match); refusing to train with an unknown "
                               "ε spent. Restore it from the site's backup")
        return payload

    # --- the index of studies ---------------------------------------------------------------
    def studies(self) -> dict[str, int]:
        """Study id -> fewest DP steps recorded; {} for a site that never trained under DP."""
        key_exists, index_exists = self.key_path.is_file(), self.index_path.is_file()
        if not key_exists and not index_exists:
            if self.state_dir.is_dir() and any(self.state_dir.glob("accountant-*.json")):
                raise PrivacyError(f"{self.state_dir} holds accountants but its ledger key and index are gone; "
                                   "refusing to train with an unknown ε spent")
            return {}
        if not index_exists:
            raise PrivacyError(f"ledger index {self.index_path} is missing although this site has trained; "
                               "refusing to train with an unknown ε spent. Restore it from the site's backup")
        try:
            signed = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PrivacyError(f"ledger index {self.index_path} is unreadable ({exc}); refusing to train") from exc
        payload = self.verify(signed, f"ledger index {self.index_path}")
        return {str(k): int(v) for k, v in dict(payload.get("studies", {})).items()}

    def record(self, study_id: str, steps: int) -> None:
        """Note that this site has recorded at least ``steps`` DP steps in ``study_id``."""
        key = self._key(create=True)
        assert key is not None
        studies = self.studies()
        studies[study_id] = max(int(steps), studies.get(study_id, 0))
        atomic_write_text(self.index_path, self._signed(key, {"studies": studies}))

"""Crypto-shredding: personal fields are sealed with a key per data subject.

A sealed event keeps its other fields readable and carries
``{"_sealed": {"subject": ..., "fields": [...], "box": base64(nonce + ciphertext)}}``.
The event id is bound in as associated data, so a box cannot be moved to another event.
Destroying the subject's key makes every box of theirs unreadable for good, without
rewriting the log; such fields read back as ``None``.
"""

import base64
import json
import os
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEALED = "_sealed"


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def seal(data: dict[str, Any], fields: tuple[str, ...], subject: str, key: bytes,
         event_id: str) -> dict[str, Any]:
    personal = {name: data[name] for name in fields}
    nonce = os.urandom(12)
    box = nonce + AESGCM(key).encrypt(nonce, json.dumps(personal).encode(), event_id.encode())
    sealed = {name: value for name, value in data.items() if name not in fields}
    sealed[SEALED] = {
        "subject": subject, "fields": list(fields), "box": base64.b64encode(box).decode(),
    }
    return sealed


def sealed_subject(data: dict[str, Any]) -> str | None:
    return data[SEALED]["subject"] if SEALED in data else None


def unseal(data: dict[str, Any], key: bytes | None, event_id: str) -> dict[str, Any]:
    """The event's data with its personal fields back, or set to None if the key is gone."""
    envelope = data[SEALED]
    opened = {name: value for name, value in data.items() if name != SEALED}
    personal = dict.fromkeys(envelope["fields"])
    if key is not None:
        box = base64.b64decode(envelope["box"])
        # A box that fails its tag check was tampered with: that raises, it is no redaction.
        personal = json.loads(AESGCM(key).decrypt(box[:12], box[12:], event_id.encode()))
    opened.update(personal)
    return opened

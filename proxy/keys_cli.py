"""``ollama-proxy key new NAME``: a fresh secret, and the config entry that accepts it.

The secret is printed once and stored nowhere: the config holds only its SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import sys
from collections.abc import Sequence

# Recognisable in a leaked file or log, by people and by secret scanners.
PREFIX = "op-"
SECRET_BYTES = 32  # 256 bits of randomness, past the 128 a key needs


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def config_entry(name: str, secret: str) -> str:
    """The YAML list item to paste under ``auth.keys`` or into ``auth.keys_file``."""
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return f'- name: {json.dumps(name, ensure_ascii=False)}\n  key_sha256: "{digest}"\n'


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="ollama-proxy key", description="Client keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="print a fresh secret and its config entry")
    new.add_argument("name", help="the key's name, as metrics, logs and /-/usage show it")
    args = parser.parse_args(argv)
    name = args.name.strip()
    if not name or not name.isprintable():
        parser.error("NAME must not be empty, and must be printable")
    secret = new_secret()
    print(f"secret for {name} (give it to the client; it is stored nowhere): {secret}")
    print()
    print("# under auth.keys in the config, or in auth.keys_file:")
    sys.stdout.write(config_entry(name, secret))

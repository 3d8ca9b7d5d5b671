"""Model names: 'tiny' is the embedded model (built on first use), anything else is a folder or hub name."""

from __future__ import annotations

TINY = "tiny"


def resolve_model(name: str) -> str:
    """'tiny' -> the cached embedded model folder (built if missing); other names pass through
    unchanged so `from_pretrained(name)` loads a local folder or a hub model."""
    if name != TINY:
        return name
    from rlphf_cli.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model())

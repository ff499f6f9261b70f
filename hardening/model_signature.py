"""Intake check: an OpenSSF model-signing (sigstore model-transparency) signature on the
input model, key-based and offline.

``edgeward package --model-signature SIG --model-signing-key PUB.pem`` refuses to sign and
encrypt a model whose publisher signature does not verify, before edgeward's own release
key vouches for it. Only the key-based verifier is used: it needs no network (no Rekor,
no Fulcio, no TUF trust root fetch); keyless sigstore verification is not offered here.
Needs the ``provenance`` extra (model-signing).
"""

from __future__ import annotations

from pathlib import Path

from hardening.errors import CheckFailed, InputError


def verify_model_signature(model: str | Path, signature: str | Path, public_key: str | Path) -> None:
    """Raise ``CheckFailed`` unless ``signature`` (a model-signing sigstore bundle) verifies
    ``model`` under the elliptic-curve ``public_key`` (PEM)."""
    import importlib.util

    if importlib.util.find_spec("model_signing") is None:
        raise InputError("--model-signature needs the 'provenance' extra (model-signing): "
                         "pip install 'edgeward[provenance]'")
    for p in (model, signature, public_key):
        if not Path(p).is_file():
            raise InputError(f"{p}: not found")
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    try:
        verifying.Config().use_elliptic_key_verifier(public_key=str(public_key)).verify(str(model), str(signature))
    except (ValueError, TypeError, KeyError, InvalidSignature) as exc:  # bad signature, digests, format
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CheckFailed(f"{model}: OpenSSF model signature does not verify: {msg}") from None

"""Confidential Containers sealed secrets (guest-components ``confidential-data-hub``).

``sealed.<base64url JWS header>.<base64url payload>.<base64url signature>``: a compact JWS
(ES256) whose header ``kid`` names the P-256 public key (a JWK) that verifies it — a
``kbs://`` resource or a file under the data hub's signing-key directory — and whose payload
is ``{"version":"0.1.0","type":"vault","name":"kbs:///repo/type/tag","provider":"kbs",
"provider_settings":{},"annotations":{}}``. A secret that fails to parse or verify is refused;
there is no switch to skip verification.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from guest.attestation.errors import SealedSecretError
from protocols.jose import JoseError, Jws
from protocols.kbs import ProtocolError, ResourceUri

PREFIX = "sealed."
VERSION = "0.1.0"


def is_sealed(value: str | bytes) -> bool:
    if isinstance(value, str):
        return value.startswith(PREFIX)
    return value.startswith(PREFIX.encode())


@dataclass(frozen=True)
class SealedSecret:
    jws: Jws
    kid: str
    payload: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> SealedSecret:
        text = text.strip()
        if not is_sealed(text):
            raise SealedSecretError("a sealed secret starts with 'sealed.'")
        try:
            jws = Jws.parse(text[len(PREFIX):])
        except JoseError as err:
            raise SealedSecretError(f"malformed sealed secret: {err}") from err
        kid = jws.header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise SealedSecretError("the sealed secret's JWS header has no kid")
        try:
            payload = json.loads(jws.payload)
        except ValueError as err:
            raise SealedSecretError("the sealed secret's payload is not JSON") from err
        if not isinstance(payload, dict):
            raise SealedSecretError("the sealed secret's payload is not a JSON object")
        return cls(jws, kid, payload)

    def vault_resource(self) -> ResourceUri:
        """The KBS resource a (verified) ``vault`` secret points at."""
        if self.payload.get("version") != VERSION:
            raise SealedSecretError(
                f"sealed secret version {self.payload.get('version')!r} is not {VERSION}")
        kind = self.payload.get("type")
        if kind != "vault":
            raise SealedSecretError(
                f"sealed secret type {kind!r} is not supported by the reference data hub "
                "(only 'vault')")
        if self.payload.get("provider") != "kbs":
            raise SealedSecretError(
                f"vault provider {self.payload.get('provider')!r} is not supported (only 'kbs')")
        try:
            return ResourceUri.parse(str(self.payload.get("name", "")))
        except ProtocolError as err:
            raise SealedSecretError(f"vault secret name: {err}") from err

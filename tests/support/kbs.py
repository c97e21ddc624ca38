"""Helpers shared by the KBS / attestation tests: initdata documents, policies, resources,
sealed secrets (built the way guest-components' ``secret seal`` builds them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from protocols.jose import jws_sign, public_jwk


def initdata(kbs_url: str, *, algorithm: str = "sha384", cert: str | None = None,
             extra: str = "") -> str:
    cert_line = f"kbs_cert = '''{cert}'''\n" if cert else ""
    cdh = f'[kbc]\nname = "cc_kbc"\nurl = "{kbs_url}"\n{cert_line}{extra}'
    aa = f'[token_configs.kbs]\nurl = "{kbs_url}"\n'
    return (f'version = "0.1.0"\nalgorithm = "{algorithm}"\n[data]\n'
            f'"aa.toml" = {json.dumps(aa)}\n"cdh.toml" = {json.dumps(cdh)}\n')


def digest_of(toml: str) -> str:
    import tomllib
    algorithm = tomllib.loads(toml)["algorithm"]
    return f"{algorithm}:{hashlib.new(algorithm, toml.encode()).hexdigest()}"


def write_initdata_dir(directory: Path, toml: str) -> Path:
    """What the guest's initdata module writes under /run/confidential-containers/initdata."""
    import tomllib
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "initdata.toml").write_text(toml)
    for name, body in tomllib.loads(toml)["data"].items():
        (directory / name).write_text(body)
    return directory


def policy(resources: dict[str, list[str]], tees: tuple[str, ...] = ("sample",)) -> str:
    lines = [f"tees = {json.dumps(list(tees))}"]
    for path, digests in resources.items():
        lines.append(f'[resources."{path}"]\ninit_data = {json.dumps(digests)}')
    return "\n".join(lines) + "\n"


def put_resource(root: Path, path: str, data: bytes) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def verification_jwk(key: ec.EllipticCurvePrivateKey) -> bytes:
    return json.dumps(public_jwk(key.public_key(), alg="ES256")).encode()


def seal(key: ec.EllipticCurvePrivateKey, kid: str, resource_uri: str,
         kind: str = "vault") -> str:
    payload = {"version": "0.1.0", "type": kind, "name": resource_uri, "provider": "kbs",
               "provider_settings": {}, "annotations": {}}
    return "sealed." + jws_sign(key, json.dumps(payload).encode(), {"kid": kid})

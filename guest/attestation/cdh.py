"""The confidential data hub: KBS resources, sealed secrets, registry credentials.

Sealed values reach the guest from the host (container env values, mounted secret files);
:meth:`DataHub.unseal_spec` replaces them inside the guest before the container's process
starts, so the host only ever handles the sealed form. Unsealed files are written beneath the
container's bundle (guest tmpfs), which the agent removes with the container.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guest.attestation.config import ImageConfig
from guest.attestation.errors import AttestationError, ConfigError, SealedSecretError
from guest.attestation.sealed import SealedSecret, is_sealed
from protocols.jose import JoseError, load_public_jwk
from protocols.kbs import ProtocolError, ResourceUri

log = logging.getLogger(__name__)

SIGNING_KEYS_DIR = Path("/run/confidential-containers/cdh/sealed-secret")
SEALED_FILE_MAX = 1 << 20  # a mounted file larger than this is not inspected for a seal
SEALED_TREE_MAX_FILES = 256

ResourceGetter = Callable[[ResourceUri], bytes]


@dataclass(frozen=True)
class RegistryAuth:
    """What the guest puller needs for one registry."""

    username: str | None
    password: str | None
    ca_pems: tuple[str, ...]  # extra roots to trust for this (and every) registry


class DataHub:
    def __init__(
        self,
        get_resource: ResourceGetter | None,
        image: ImageConfig | None = None,
        signing_keys: Path = SIGNING_KEYS_DIR,
    ) -> None:
        self._get = get_resource
        self.image = image or ImageConfig()
        self.signing_keys = signing_keys

    # -- resources ------------------------------------------------------------------------

    def resource(self, uri: ResourceUri | str) -> bytes:
        if self._get is None:
            raise ConfigError("no KBS is configured (initdata's cdh.toml [kbc] or aa.toml "
                              "[token_configs.kbs])")
        if isinstance(uri, str):
            try:
                uri = ResourceUri.parse(uri)
            except ProtocolError as err:
                raise AttestationError(str(err)) from err
        return self._get(uri)

    # -- sealed secrets -------------------------------------------------------------------

    def _verification_key(self, kid: str) -> bytes:
        if kid.startswith("kbs://"):
            return self.resource(kid)
        base = self.signing_keys.resolve()
        path = (base / kid).resolve()
        if not path.is_relative_to(base) or path == base:
            raise SealedSecretError(f"sealed secret kid {kid!r} escapes {base}")
        try:
            return path.read_bytes()
        except OSError as err:
            raise SealedSecretError(f"sealed secret kid {kid!r}: {err.strerror}") from err

    def unseal(self, text: str) -> bytes:
        secret = SealedSecret.parse(text)
        try:
            key = load_public_jwk(json.loads(self._verification_key(secret.kid)))
        except (ValueError, JoseError) as err:
            raise SealedSecretError(
                f"sealed secret kid {secret.kid!r} is not a P-256 public JWK: {err}") from err
        try:
            secret.jws.verify(key)
        except JoseError as err:
            raise SealedSecretError(f"sealed secret refused: {err}") from err
        return self.resource(secret.vault_resource())

    def unseal_env(self, env: list[str]) -> list[str]:
        out = []
        for entry in env:
            name, sep, value = entry.partition("=")
            if sep and is_sealed(value):
                try:
                    plain = self.unseal(value).decode("utf-8")
                except UnicodeDecodeError as err:
                    raise SealedSecretError(
                        f"env {name}: the unsealed value is not UTF-8 text") from err
                except SealedSecretError as err:
                    raise SealedSecretError(f"env {name}: {err}") from err
                if "\0" in plain:
                    raise SealedSecretError(f"env {name}: the unsealed value contains NUL")
                entry = f"{name}={plain}"
            out.append(entry)
        return out

    def _sealed_file(self, path: Path) -> bool:
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode) or info.st_size > SEALED_FILE_MAX:
                return False
            with path.open("rb") as f:
                return is_sealed(f.read(len("sealed.")))
        except OSError:
            return False

    def _unseal_file(self, src: Path, dst: Path) -> None:
        plain = self.unseal(src.read_text())
        info = src.stat()
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(info.st_mode))
        try:
            os.write(fd, plain)
        finally:
            os.close(fd)
        os.chown(dst, info.st_uid, info.st_gid)

    def _unseal_tree(self, src: Path, dst: Path) -> bool:
        """Copy src (a secret volume) to dst with sealed files unsealed; False if none is."""
        files = [p for p in sorted(src.rglob("*")) if not p.is_symlink() and p.is_file()]
        if len(files) > SEALED_TREE_MAX_FILES or not any(self._sealed_file(p) for p in files):
            return False
        shutil.copytree(src, dst, symlinks=True, ignore=lambda d, names: [
            n for n in names if self._sealed_file(Path(d) / n) and not (Path(d) / n).is_symlink()
        ])
        for path in files:
            if self._sealed_file(path):
                self._unseal_file(path, dst / path.relative_to(src))
        return True

    def unseal_spec(self, spec: dict[str, Any], secrets_dir: Path) -> dict[str, Any]:
        """The OCI spec with sealed env values and sealed bind-mounted files unsealed.

        Returns ``spec`` itself when nothing is sealed; otherwise a changed copy whose mount
        sources point at unsealed copies under ``secrets_dir`` (made 0700 here).
        """
        process = spec.get("process") or {}
        env = list(process.get("env") or [])
        mounts = spec.get("mounts") or []
        new_env = self.unseal_env(env) if any(is_sealed(e.partition("=")[2]) for e in env) \
            else env
        new_mounts = []
        for index, mount in enumerate(mounts):
            source = Path(str(mount.get("source", "")))
            is_bind = mount.get("type") == "bind" or "bind" in (mount.get("options") or []) \
                or "rbind" in (mount.get("options") or [])
            if not is_bind or not source.is_absolute():
                new_mounts.append(mount)
                continue
            target = secrets_dir / str(index)
            changed = False
            if self._sealed_file(source):
                secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._unseal_file(source, target)
                changed = True
            elif source.is_dir() and not source.is_symlink():
                secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                changed = self._unseal_tree(source, target)
            new_mounts.append({**mount, "source": str(target)} if changed else mount)
        if new_env == env and new_mounts == mounts:
            return spec
        out = dict(spec)
        out["process"] = {**process, "env": new_env}
        if mounts:
            out["mounts"] = new_mounts
        log.info("unsealed %d env value(s) and %d mount(s)",
                 sum(a != b for a, b in zip(env, new_env, strict=True)),
                 sum(a is not b for a, b in zip(mounts, new_mounts, strict=True)))
        return out

    # -- registry credentials for the guest puller ----------------------------------------

    def registry_auth(self, registry: str) -> RegistryAuth | None:
        """Credentials and extra CAs for ``registry`` (host[:port]) from cdh.toml's [image].

        Credentials: the docker ``config.json`` resource named by
        ``authenticated_registry_credentials_uri`` (``{"auths": {"<registry>": {"auth":
        base64("user:password")}}}``, or ``username``/``password`` members). CAs:
        ``extra_root_certificates`` (inline PEM, or ``kbs://`` resources holding PEM).
        None when cdh.toml names neither.
        """
        cas = tuple(
            self.resource(entry).decode() if entry.startswith("kbs://") else entry
            for entry in self.image.extra_root_certificates
        )
        username = password = None
        if self.image.registry_credentials_uri is not None:
            raw = self.resource(self.image.registry_credentials_uri)
            try:
                auths = json.loads(raw).get("auths", {})
            except (ValueError, AttributeError) as err:
                raise AttestationError("the registry credentials resource is not a docker "
                                       "config.json") from err
            entry = auths.get(registry) or auths.get(f"https://{registry}") or {}
            if entry.get("auth"):
                try:
                    decoded = base64.b64decode(entry["auth"]).decode()
                except (ValueError, UnicodeDecodeError) as err:
                    raise AttestationError(f"registry {registry}: 'auth' is not base64 of "
                                           "user:password") from err
                username, _, password = decoded.partition(":")
            elif entry.get("username"):
                username, password = entry["username"], entry.get("password", "")
        if username is None and not cas:
            return None
        return RegistryAuth(username, password, cas)

"""Image references as containerd and Docker normalise them.

``busybox`` → ``docker.io/library/busybox:latest``; ``host:5000/team/app@sha256:…`` keeps its
registry, repository and digest. The first path component names a registry when it contains a
``.`` or a ``:``, or is ``localhost``; otherwise the image lives on Docker Hub.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from guest.agent.errors import InvalidArgument

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?$")


class ImageReference(NamedTuple):
    registry: str  # host[:port], as the configuration names it (docker.io for Docker Hub)
    repository: str  # path inside the registry, e.g. library/busybox
    tag: str | None
    digest: str | None

    @property
    def endpoint(self) -> str:
        """host[:port] to connect to (Docker Hub's API lives on another host)."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    @property
    def manifest_ref(self) -> str:
        """What the manifest URL names: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> ImageReference:
    """Parse and normalise an image reference; InvalidArgument names what is wrong."""
    original = text
    if not text or text != text.strip() or len(text) > 4096:
        raise InvalidArgument(f"invalid image reference {original!r}")
    digest: str | None = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidArgument(f"invalid digest in image reference {original!r}")
    tag: str | None = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidArgument(f"invalid tag in image reference {original!r}")
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.match(first):
            raise InvalidArgument(f"invalid registry host in image reference {original!r}")
        registry, repository = first, rest
    else:
        registry, repository = DOCKER_HUB, text
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not repository or not all(_COMPONENT.match(part) for part in repository.split("/")):
        raise InvalidArgument(f"invalid repository name in image reference {original!r}")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageReference(registry=registry, repository=repository, tag=tag, digest=digest)

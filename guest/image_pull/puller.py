"""Pulling an image in the guest, and the ``image_guest_pull`` storage handler built on it.

:class:`ImagePuller` resolves a reference to the guest's platform, fetches and verifies the
manifest and config, and makes sure every layer is in the :class:`~.store.LayerStore`
(fetching each missing one once, however many pulls want it at the same time). Blocking I/O
(sockets, zlib, the unpacker) runs in worker threads; the pull's deadline
(``image_pull_timeout``) and any cancellation stop those threads through a
:class:`~.registry.CancelToken` and are awaited before the error propagates.

:class:`GuestPullStorage` is what the agent's StorageManager calls for the driver
``image_guest_pull``: the sandbox container gets the pause bundle, any other container the
pulled image as an overlay (read-only layers below, a per-container upper/work) mounted at the
storage's mount point; :class:`GuestRootfs` carries what the spec needs from the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from guest.agent import mounts
from guest.agent.errors import (
    AgentError,
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    Unimplemented,
    from_os_error,
)
from guest.image_pull.config import PullConfig
from guest.image_pull.digest import Digest, VerifyingReader, verify_bytes
from guest.image_pull.imagespec import apply_image_config, apply_pause_process
from guest.image_pull.mediatypes import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from guest.image_pull.pause import PAUSE_BUNDLE, is_sandbox, prepare_pause_rootfs
from guest.image_pull.pipeline import Channel, Fetcher
from guest.image_pull.reference import ImageReference, parse_reference
from guest.image_pull.store import LayerStore
from guest.image_pull.timing import PhaseTimer, describe_sides

if TYPE_CHECKING:  # imported on first pull: ssl and http.client cost agent start-up time
    from guest.image_pull.registry import BlobStream, RegistryClient

log = logging.getLogger(__name__)

DRIVER = "image_guest_pull"
MAX_CONFIG_BYTES = 8 << 20
PROGRESS_EVERY = 16 << 20
# The fetch → unpack hand-off: chunks of a MiB (one interpreter round trip per MiB on either
# side), at most PIPELINE_DEPTH in flight per layer (what bounds the memory a pull takes).
PIPELINE_CHUNK = 1 << 20
PIPELINE_DEPTH = 4
MAX_LOWERDIR_DATA = 3900  # mount(2) data is one page; beyond it, layers go by /proc/self/fd
ARCHITECTURES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "s390x": "s390x",
    "ppc64le": "ppc64le",
    "riscv64": "riscv64",
}
T = TypeVar("T")


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = field(
        default_factory=lambda: ARCHITECTURES.get(os.uname().machine, os.uname().machine)
    )
    variant: str = ""

    def matches(self, platform: Mapping[str, Any]) -> bool:
        if platform.get("os") != self.os or platform.get("architecture") != self.architecture:
            return False
        variant = platform.get("variant", "")
        return not self.variant or not variant or variant == self.variant


class PulledImage(NamedTuple):
    reference: ImageReference
    manifest_digest: Digest
    config: dict[str, Any]
    layers: tuple[Path, ...]  # unpacked layer directories, bottom first
    fetched: tuple[str, ...]  # layer digests this pull fetched (the rest were cached)


class _Progress:
    """Counts bytes through a stream, logs every PROGRESS_EVERY, charges the wait for them to
    the timer's ``network`` phase."""

    def __init__(self, raw: BlobStream, what: str, timer: PhaseTimer) -> None:
        self.raw = raw
        self.what = what
        self.timer = timer
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        previous = self.timer.enter("network")
        data = self.raw.read(size)
        self.timer.leave(previous)
        before = self.count // PROGRESS_EVERY
        self.count += len(data)
        if self.count // PROGRESS_EVERY != before:
            log.info("image pull: %s: %d MiB", self.what, self.count >> 20)
        return data


class ImagePuller:
    def __init__(self, config: PullConfig, platform: Platform | None = None) -> None:
        self.config = config
        self.platform = platform or Platform()
        self.store = LayerStore(config.work_dir)
        self._inflight: dict[Digest, asyncio.Event] = {}

    async def pull(self, reference: str) -> PulledImage:
        ref = parse_reference(reference)
        rule = self.config.rule_for(f"{ref.registry}/{ref.repository}")
        if rule is not None and rule.blocked:
            raise PermissionDenied(f"image {ref}: registry {rule.prefix} is blocked")
        from guest.image_pull.registry import CancelToken, RegistryClient

        client = RegistryClient(self.config, CancelToken())
        started = time.monotonic()
        log.info("image pull: %s: starting", ref)
        try:
            async with asyncio.timeout(self.config.timeout):
                image = await self._pull(client, ref)
        except TimeoutError as err:
            log.error("image pull: %s: no result within %g s", ref, self.config.timeout)
            raise DeadlineExceeded(
                f"image {ref}: pull did not finish within {self.config.timeout:g} s"
            ) from err
        except AgentError as err:
            log.error("image pull: %s: failed: %s", ref, err)
            raise
        except OSError as err:  # the guest's own storage (e.g. tmpfs full: ENOSPC)
            log.error("image pull: %s: failed: %s", ref, err)
            raise from_os_error(err, f"image {ref}: unpacking in the guest") from err
        log.info(
            "image pull: %s: %s, %d layers (%d fetched) in %.2f s",
            ref,
            image.manifest_digest,
            len(image.layers),
            len(image.fetched),
            time.monotonic() - started,
        )
        return image

    # -- steps -------------------------------------------------------------------------------

    async def _thread(self, client: RegistryClient, fn: Callable[[], T]) -> T:
        """Run fn in a worker thread; on cancellation stop it and wait for it to end."""
        future = asyncio.get_running_loop().run_in_executor(None, fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            client.token.cancel("the pull was cancelled (deadline or caller)")
            with contextlib.suppress(Exception):
                await future
            raise

    async def _pull(self, client: RegistryClient, ref: ImageReference) -> PulledImage:
        body, media_type, digest = await self._thread(
            client, lambda: client.fetch_manifest(ref, ref.manifest_ref)
        )
        manifest = _json(body, f"manifest of {ref}")
        if media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in manifest:
            child = self._choose(manifest, ref)
            child_digest = Digest.parse(str(child["digest"]))
            body, media_type, digest = await self._thread(
                client, lambda: client.fetch_manifest(ref, str(child_digest))
            )
            manifest = _json(body, f"manifest {child_digest} of {ref}")
        _check_manifest(manifest, media_type, ref)
        config = await self._config(client, ref, manifest["config"])
        layers = manifest.get("layers") or []
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(layers):
            raise InvalidArgument(
                f"image {ref}: {len(layers)} layers but {len(diff_ids)} diff IDs in its config"
            )
        limit = asyncio.Semaphore(self.config.concurrency)
        fetched: list[str] = []

        async def one(descriptor: dict[str, Any], diff_id: str) -> Path:
            async with limit:
                path, was_fetched = await self._layer(client, ref, descriptor, diff_id)
            if was_fetched:
                fetched.append(str(descriptor["digest"]))
            return path

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(one(d, str(i)))
                    for d, i in zip(layers, diff_ids, strict=True)
                ]
        except BaseExceptionGroup as errors:
            raise _first_error(errors) from errors
        return PulledImage(
            reference=ref,
            manifest_digest=digest,
            config=config,
            layers=tuple(task.result() for task in tasks),
            fetched=tuple(fetched),
        )

    def _choose(self, index: dict[str, Any], ref: ImageReference) -> dict[str, Any]:
        entries = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
        for entry in entries:
            if self.platform.matches(entry.get("platform") or {}):
                return entry
        offered = sorted(
            "{}/{}".format(
                (m.get("platform") or {}).get("os", "?"),
                (m.get("platform") or {}).get("architecture", "?"),
            )
            for m in entries
        )
        raise InvalidArgument(
            f"image {ref} has no manifest for {self.platform.os}/{self.platform.architecture}"
            f" (it offers {', '.join(offered) or 'none'})"
        )

    async def _config(
        self, client: RegistryClient, ref: ImageReference, descriptor: dict[str, Any]
    ) -> dict[str, Any]:
        digest = Digest.parse(str(descriptor.get("digest", "")))
        size = int(descriptor.get("size", -1))
        if not 0 <= size <= MAX_CONFIG_BYTES:
            raise InvalidArgument(f"image {ref}: config size {size} out of bounds")
        while (data := self.store.read_blob(digest)) is None and digest in self._inflight:
            await self._inflight[digest].wait()  # another pull is fetching it
        if data is None:
            done = self._inflight[digest] = asyncio.Event()

            def fetch() -> bytes:
                stream = client.open_blob(ref, digest)
                try:
                    reader = VerifyingReader(stream, digest, size, f"image {ref}: config {digest}")
                    content = reader.read(size)
                    reader.verify()
                    return content
                finally:
                    stream.close()

            try:
                data = await self._thread(client, fetch)
                self.store.write_blob(digest, data)
            finally:
                del self._inflight[digest]
                done.set()
        else:
            verify_bytes(data, digest, f"image {ref}: cached config {digest}")
        config = _json(data, f"config of {ref}")
        image_os = config.get("os")
        architecture = config.get("architecture")
        if (image_os and image_os != self.platform.os) or (
            architecture and architecture != self.platform.architecture
        ):
            raise InvalidArgument(
                f"image {ref} is for {image_os}/{architecture}; the guest is "
                f"{self.platform.os}/{self.platform.architecture}"
            )
        return config

    async def _layer(
        self, client: RegistryClient, ref: ImageReference, descriptor: dict[str, Any], diff_id: str
    ) -> tuple[Path, bool]:
        digest = Digest.parse(str(descriptor.get("digest", "")))
        expected_diff = Digest.parse(diff_id)
        media_type = str(descriptor.get("mediaType", ""))
        what = f"image {ref}: layer {digest}"
        if "encrypted" in media_type:
            raise Unimplemented(f"{what} is encrypted ({media_type}); not supported here")
        if "tar" not in media_type:
            raise InvalidArgument(f"{what} has media type {media_type!r}, not a layer")
        size = int(descriptor.get("size", -1))
        if size < 0:
            raise InvalidArgument(f"{what} has no size")
        while True:
            cached = self.store.layer(digest)
            if cached is not None:
                if self.store.layer_diff_id(digest) != str(expected_diff):
                    raise DataLoss(
                        f"{what}: cached with diff ID {self.store.layer_diff_id(digest)}, "
                        f"the image config says {expected_diff}"
                    )
                return cached, False
            busy = self._inflight.get(digest)
            if busy is None:
                break
            await busy.wait()  # another pull is fetching it; then look again
        done = asyncio.Event()
        self._inflight[digest] = done
        try:
            path = await self._thread(
                client, lambda: self._fetch_layer(client, ref, digest, size, expected_diff, what)
            )
        finally:
            del self._inflight[digest]
            done.set()
        return path, True

    def _fetch_layer(
        self,
        client: RegistryClient,
        ref: ImageReference,
        digest: Digest,
        size: int,
        diff_id: Digest,
        what: str,
    ) -> Path:
        """In a worker thread: stream, verify and unpack one layer into the store. The blob is
        fetched and its digest computed by a second thread (:mod:`.pipeline`) while this one
        inflates, hashes the tar and writes the files."""
        from guest.image_pull.unpack import Decompressed, unpack

        started = time.monotonic()
        fetch_timer, unpack_timer = PhaseTimer(), PhaseTimer()
        channel = Channel(PIPELINE_DEPTH, fetch_timer, unpack_timer)
        streams: list[BlobStream] = []

        def produce(channel: Channel) -> None:
            """The fetch side: receive the blob, hash it, hand it over; verify at its end."""
            previous = fetch_timer.enter("network")
            stream = client.open_blob(ref, digest)
            streams.append(stream)
            fetch_timer.leave(previous)
            try:
                received = _Progress(stream, what, fetch_timer)
                verifier = VerifyingReader(received, digest, size, what, fetch_timer)
                while chunk := verifier.read(PIPELINE_CHUNK):
                    channel.put(chunk)
                verifier.verify()
            finally:
                stream.close()

        fetcher = Fetcher(channel, produce, name=f"pull-{digest.hex[:12]}")
        staged = self.store.stage()
        done = False
        try:
            fetcher.start()
            try:
                data = Decompressed(channel, what, unpack_timer, raw_digest=digest)
                stats = unpack(data, staged / "fs", what, client.token.check, unpack_timer)
                data.drain()
            except (DataLoss, InvalidArgument, Unimplemented) as err:
                # Bad content: if the blob is not what its digest says, that is the cause to
                # report (a corrupted or tampered blob), not the tar/gzip symptom: the fetch
                # side goes on to the blob's end and its verdict comes first.
                if err is not fetcher.error:
                    channel.drain()
                raise err
            channel.drain()  # its end means the fetch side verified the blob's size and digest
            done = True
            if data.diff_id != diff_id:
                raise DataLoss(f"{what}: uncompressed digest {data.diff_id}, expected {diff_id}")
            path = self.store.commit_layer(digest, staged, diff_id)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        finally:
            if not done:
                channel.close_reader()  # a fetch side blocked on a full channel stops
                for stream in streams:
                    stream.abort()  # and one blocked in the network
            fetcher.join()
        log.info(
            "image pull: %s: %d bytes (%s, %d uncompressed), %d entries, %d whiteouts, "
            "%d opaque dirs, %d skipped, in %.2f s (%s)",
            what,
            size,
            data.kind,
            data.size,
            stats.entries,
            stats.whiteouts,
            stats.opaque_dirs,
            len(stats.skipped),
            time.monotonic() - started,
            describe_sides(fetch=fetch_timer.stop(), unpack=unpack_timer.stop()),
        )
        return path


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a failed TaskGroup: the first agent error, else the first."""
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    return next((e for e in leaves if isinstance(e, AgentError)), leaves[0])


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError as err:
        raise InvalidArgument(f"{what} is not JSON: {err}") from err
    if not isinstance(document, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return document


def _check_manifest(manifest: dict[str, Any], media_type: str, ref: ImageReference) -> None:
    if manifest.get("schemaVersion") == 1 or "signatures" in manifest:
        raise Unimplemented(f"image {ref} has a Docker schema 1 manifest, which is not supported")
    known = media_type in (OCI_MANIFEST, DOCKER_MANIFEST, "")
    if not known and not ("config" in manifest and "layers" in manifest):
        raise InvalidArgument(f"image {ref}: unsupported manifest type {media_type!r}")
    if not isinstance(manifest.get("config"), dict) or not isinstance(manifest.get("layers"), list):
        raise InvalidArgument(f"image {ref}: manifest without config or layers")


# -- the storage handler -----------------------------------------------------------------------


class GuestRootfs(NamedTuple):
    """A mounted guest-pull rootfs and how it changes the container's spec."""

    mount_point: Path
    image: str
    image_config: dict[str, Any] | None  # None for the pause container
    pause_process: dict[str, Any] | None
    manifest_digest: str = ""

    def apply(self, spec: dict[str, Any]) -> dict[str, Any]:
        if self.pause_process is not None:
            return apply_pause_process(spec, self.pause_process, self.mount_point)
        assert self.image_config is not None
        return apply_image_config(spec, self.image_config, self.mount_point, self.image)


def image_pull_metadata(driver_options: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The ``metadata`` map of ``image_guest_pull=<JSON>`` (Kata's driver option)."""
    for option in driver_options:
        key, sep, value = option.partition("=")
        if sep and key == DRIVER:
            try:
                document = json.loads(value)
                metadata = document.get("metadata") or {}
            except (ValueError, AttributeError) as err:
                raise InvalidArgument(f"bad {DRIVER} driver option: {err}") from err
            if not isinstance(metadata, dict):
                raise InvalidArgument(f"{DRIVER} driver option: metadata must be an object")
            return {str(k): str(v) for k, v in metadata.items()}
    raise InvalidArgument(f"{DRIVER} storage without an {DRIVER}=<JSON> driver option")


class GuestPullStorage:
    """The StorageManager's handler for ``image_guest_pull``."""

    def __init__(
        self,
        puller_factory: Callable[[], ImagePuller],
        shared_root: Path,
        pause_bundle: Path = PAUSE_BUNDLE,
    ) -> None:
        self._factory = puller_factory
        self._puller: ImagePuller | None = None
        self.shared_root = shared_root
        self.pause_bundle = pause_bundle
        self._mounted: dict[Path, _Mount] = {}

    @property
    def puller(self) -> ImagePuller:
        """Made on first use: the agent starts without importing ssl or http.client."""
        if self._puller is None:
            self._puller = self._factory()
        return self._puller

    async def mount(
        self,
        container_id: str,
        source: str,
        driver_options: tuple[str, ...],
        mount_point: str,
        target: str | None = None,
    ) -> GuestRootfs:
        """Pull ``source`` (or take the pause bundle) and mount it at ``mount_point``.

        ``target``: the path to copy into and mount onto, when the caller already opened the
        mount point without following symlinks (the StorageManager passes its /proc/self/fd
        path and owns the directory); without it this handler makes the directories itself."""
        metadata = image_pull_metadata(driver_options)
        if not source:
            raise InvalidArgument(f"{DRIVER} storage without an image reference (source)")
        point, made = self._prepare_target(mount_point, target)
        where = Path(target) if target else point
        entry = _Mount(container_id, overlay=False, made=made)
        try:
            if is_sandbox(metadata):
                process = await asyncio.to_thread(prepare_pause_rootfs, where, self.pause_bundle)
                self._mounted[point] = entry
                log.info("container %s: sandbox rootfs from the pause bundle", container_id)
                return GuestRootfs(point, source, None, process)
            image = await self.puller.pull(source)
            store = self.puller.store
            upper, work = store.container_dirs(container_id)
            try:
                _mount_overlay(image.layers, upper, work, where, shown=str(point))
            except BaseException:
                store.remove_container_dirs(container_id)
                raise
        except BaseException:
            _remove(where, made, contents=True)
            raise
        entry.overlay = True
        self._mounted[point] = entry
        log.info(
            "container %s: rootfs of %s (%s) mounted at %s",
            container_id,
            image.reference,
            image.manifest_digest,
            point,
        )
        return GuestRootfs(
            point, str(image.reference), image.config, None, str(image.manifest_digest)
        )

    def _prepare_target(self, mount_point: str, target: str | None) -> tuple[Path, list[Path]]:
        point = Path(os.path.normpath(mount_point))
        if not point.is_relative_to(self.shared_root) or point == self.shared_root:
            raise InvalidArgument(
                f"{DRIVER} mount point {mount_point} must be below {self.shared_root}"
            )
        where = Path(target) if target else point
        if point in self._mounted or (where.is_dir() and any(where.iterdir())):
            raise InvalidArgument(f"{DRIVER} mount point {point} is in use")
        return point, [] if target else _make_dirs(point)

    def release(self, mount_point: str) -> None:
        target = Path(os.path.normpath(mount_point))
        entry = self._mounted.pop(target, None)
        if entry is None:
            return
        if entry.overlay:
            if mounts.is_mountpoint(str(target)):
                mounts.umount(str(target))
            self.puller.store.remove_container_dirs(entry.container_id)
        _remove(target, entry.made, contents=not entry.overlay)

    @property
    def mount_points(self) -> list[str]:
        return sorted(str(p) for p in self._mounted)


@dataclass
class _Mount:
    container_id: str
    overlay: bool
    made: list[Path]  # directories mount() created, deepest first


def _make_dirs(target: Path) -> list[Path]:
    """Make target and its missing parents; return what was made, deepest first."""
    made: list[Path] = []
    path = target
    while not path.exists() and path != path.parent:
        made.append(path)
        path = path.parent
    target.mkdir(parents=True, exist_ok=True)
    return made


def _remove(target: Path, made: list[Path], *, contents: bool) -> None:
    """Remove target's contents (a pause rootfs copy; never a mounted overlay) and the
    directories mount() made, as far as they are empty."""
    if contents and not mounts.is_mountpoint(str(target)) and not target.is_symlink():
        for child in list(target.iterdir()) if target.is_dir() else []:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    child.unlink()
    for path in made:
        with contextlib.suppress(OSError):
            path.rmdir()


def _mount_overlay(
    layers: tuple[Path, ...], upper: Path, work: Path, target: Path, *, shown: str = ""
) -> None:
    """overlay: the image's layers read-only below (top layer first), the container's own
    upper/work above."""
    lower = ":".join(str(p) for p in reversed(layers))
    data = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if len(data) <= MAX_LOWERDIR_DATA:
        mounts.mount("overlay", str(target), "overlay", 0, data, shown=shown)
        return
    fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in reversed(layers)]
    try:
        lower = ":".join(f"/proc/self/fd/{fd}" for fd in fds)
        data = f"lowerdir={lower},upperdir={upper},workdir={work}"
        if len(data) > MAX_LOWERDIR_DATA:
            raise InvalidArgument(f"image has too many layers ({len(layers)}) for one overlay")
        mounts.mount("overlay", str(target), "overlay", 0, data, shown=shown)
    finally:
        for fd in fds:
            os.close(fd)

"""``python -m guest.image``: build (or find cached) the reference guest initramfs.

The last line on stdout is the image's sha256; the lines before it say where it is and what
it weighs. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from guest.image.build import DEFAULT_EPOCH, Recipe, build

REPO = Path(__file__).resolve().parents[2]


def _env_file(cache: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    env = cache / "env.sh"
    if env.exists():
        for line in env.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
    return values


def default_mirror(sources: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> str:
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


def default_modules_dir(cache: Path) -> Path:
    kernel_root = Path(_env_file(cache).get("COCO_KERNEL_ROOT", cache / "kernel/root"))
    found = sorted((kernel_root / "lib/modules").iterdir())
    if not found:
        raise SystemExit(f"no kernel modules under {kernel_root}: run `make env`")
    return found[-1]


def default_site_packages() -> Path:
    spec = importlib.util.find_spec("google.protobuf")
    if spec is None or spec.origin is None:
        raise SystemExit("protobuf is not importable here: run with the project venv's python")
    return Path(spec.origin).resolve().parents[2]


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return Recipe(
        recipe_dir=args.recipe,
        repo=REPO,
        modules_dir=args.modules_dir or default_modules_dir(args.cache),
        site_packages=args.site_packages or default_site_packages(),
        mirror=args.mirror or default_mirror(),
        suite=args.suite,
        epoch=int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH)),
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m guest.image", description=__doc__)
    p.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("COCO_CACHE", "/var/cache/coco-shim"))
    )
    p.add_argument("--recipe", type=Path, default=REPO / "packaging/guest-image")
    p.add_argument("--modules-dir", type=Path, default=None)
    p.add_argument("--site-packages", type=Path, default=None)
    p.add_argument("--mirror", default=None)
    p.add_argument("--suite", default="bookworm")
    p.add_argument("--force", action="store_true", help="rebuild even if the key is cached")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = build(recipe_from_args(args), args.cache, force=args.force)
    print(f"image:  {result.image}{' (cached)' if result.cached else ''}")
    print(f"size:   {result.size} bytes ({result.size / 2**20:.1f} MiB)")
    print(f"key:    {result.key}")
    print(f"manifest: {result.manifest}")
    print(result.sha256)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

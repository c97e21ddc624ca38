#!/usr/bin/env python3
"""Regenerate the Python modules for every .proto under protocols/api (``make protos``).

Run from anywhere; paths are resolved from the repository root. ``--check`` regenerates into a
temporary directory and exits 1 (listing the files) if the committed modules differ, which is
what ``make test`` runs so a stale generated module cannot land.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
API = REPO / "protocols" / "api"
GEN_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# Services reached over gRPC get grpcio *_pb2_grpc.py stubs, for the tests' grpcio clients and
# servers only (dev extras): the shim itself speaks gRPC through grpclib, bound to the services'
# descriptors (shim/daemon/grpc_server.py, shim/daemon/events.py), and never imports them.
GRPC_PROTOS = {
    "protocols/api/containerd/task/v3/shim.proto",
    "protocols/api/containerd/services/events/v1/events.proto",
    "protocols/api/containerd/runtime/sandbox/v1/sandbox.proto",
    "protocols/api/cri/api.proto",
}


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(REPO)) for p in API.rglob("*.proto"))
    base = ["protoc", f"-I{REPO}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}"]
    if protoc.main([*base, *protos]) != 0:
        raise SystemExit("protoc failed")
    grpc = sorted(set(protos) & GRPC_PROTOS)
    if grpc and protoc.main(["protoc", f"-I{REPO}", f"-I{include}", f"--grpc_python_out={out}",
                             *grpc]) != 0:
        raise SystemExit("protoc (grpc) failed")
    api = out / "protocols" / "api"
    for d in [api, *api.rglob("*")]:
        if d.is_dir() and not (d / "__init__.py").exists():
            (d / "__init__.py").touch()


def generated_files(root: Path) -> set[str]:
    base = root / "protocols" / "api"
    return {str(p.relative_to(root)) for p in base.rglob("*")
            if p.is_file() and (p.name.endswith(GEN_SUFFIXES) or p.name == "__init__.py")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if regenerating changes files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        new = generated_files(out)
        old = generated_files(REPO)
        changed = sorted(f for f in new & old if not filecmp.cmp(out / f, REPO / f, shallow=False))
        added, removed = sorted(new - old), sorted(old - new)
        if args.check:
            if changed or added or removed:
                for label, files in (("changed", changed), ("missing", added), ("stale", removed)):
                    for f in files:
                        print(f"protos: {label}: {f}", file=sys.stderr)
                print("protos: generated modules are out of date; run `make protos`",
                      file=sys.stderr)
                return 1
            print(f"protos: {len(new)} generated files up to date")
            return 0
        for f in removed:
            (REPO / f).unlink()
        for f in new:
            (REPO / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / f, REPO / f)
        print(f"protos: wrote {len(new)} files ({len(changed)} changed, {len(added)} new, "
              f"{len(removed)} removed)")
        return 0


if __name__ == "__main__":
    sys.exit(main())

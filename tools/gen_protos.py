"""Regenerate recstack/v1/ (protobuf + gRPC Python code) from protos/.

    python tools/gen_protos.py           # rewrite the generated files
    python tools/gen_protos.py --check   # exit 1 if the committed files are stale

The proto lives at protos/recstack/v1/ranking.proto, so protoc emits imports of the form
`from recstack.v1 import ranking_pb2`: the generated code resolves inside our namespace and
never as a top-level `ranking_pb2`.
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("recstack") / "v1"
INIT = '"""Generated protobuf / gRPC code for recstack.v1 (see protos/; regenerate with tools/gen_protos.py)."""\n'


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every .proto under protos/recstack/v1 into `out_root`; returns the written files."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    (out_root / PACKAGE).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
        f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out_root / PACKAGE / "__init__.py").write_text(INIT)
    return sorted(p for p in (out_root / PACKAGE).iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that recstack/v1 is up to date")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        stale = []
        for f in files:
            target = ROOT / PACKAGE / f.name
            if not target.exists() or not filecmp.cmp(f, target, shallow=False):
                stale.append(target)
                if not args.check:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, target)
    if args.check and stale:
        print("stale generated files (run python tools/gen_protos.py):", *map(str, stale), sep="\n  ", file=sys.stderr)
        return 1
    print(f"{'checked' if args.check else 'wrote'} {len(files)} files in {ROOT / PACKAGE}"
          + (f" ({len(stale)} updated)" if stale and not args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the Python code for the wire contract: `python -m protos.build` (or `--check` to verify it).

The generated modules (charrnn_pb2.py, charrnn_pb2.pyi, charrnn_pb2_grpc.py) are committed beside
the .proto, so running the server needs no code generator; tests/test_serve_proto.py checks that they
match the .proto. Compiling from the repository root (`-I .`) makes the generated imports read
`from protos.charrnn.v1 import charrnn_pb2`, an importable package path, with no hand edits.
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = Path("protos/charrnn/v1/charrnn.proto")  # relative to ROOT: it names the generated package
GENERATED = ("charrnn_pb2.py", "charrnn_pb2.pyi", "charrnn_pb2_grpc.py")


def build(out_root: Path = ROOT) -> list[Path]:
    """Compile PROTO into out_root/protos/charrnn/v1/; returns the generated files."""
    from grpc_tools import protoc  # a dev dependency: only needed to rebuild

    well_known = resources.files("grpc_tools") / "_proto"
    out = Path(out_root)
    (out / PROTO.parent).mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out / PROTO.parent / name for name in GENERATED]


def descriptor():
    """The FileDescriptorProto compiled from the .proto now (what the generated code must embed)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        if protoc.main(["protoc", f"-I{ROOT}", f"-I{well_known}", f"--descriptor_set_out={out}", str(ROOT / PROTO)]):
            raise RuntimeError(f"protoc failed on {PROTO}")
        fd = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in fd.message_type:  # the Python plugin leaves json_name out of the descriptor it embeds
        for f in message.field:
            f.ClearField("json_name")
    return fd


def stale() -> list[str]:
    """Generated files that differ from a fresh build (empty when up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build(Path(tmp))
        return [f.name for f in fresh if not (ROOT / PROTO.parent / f.name).is_file()
                or not filecmp.cmp(f, ROOT / PROTO.parent / f.name, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m protos.build", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed code is out of date")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        print(f"out of date: {', '.join(bad)} (run python -m protos.build)" if bad else "up to date")
        return 1 if bad else 0
    for path in build():
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The committed Python code for protos/charrnn/v1/charrnn.proto is what `python -m protos.build` makes."""
from __future__ import annotations

import re

import pytest
from google.protobuf import descriptor_pb2

from protos import build
from protos.charrnn.v1 import charrnn_pb2

GENERATED_DIR = build.ROOT / build.PROTO.parent


def tools_version(grpc_module_text: str) -> str:
    return re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_module_text).group(1)


def test_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) builds the code")
    # The contract: the committed module embeds the descriptor the .proto compiles to now.
    committed = descriptor_pb2.FileDescriptorProto.FromString(charrnn_pb2.DESCRIPTOR.serialized_pb)
    assert committed == build.descriptor(), "protos/charrnn/v1/charrnn.proto changed: run python -m protos.build"
    # Byte for byte too, when this grpcio-tools is the version that made the committed files.
    fresh = build.build(tmp_path)
    made_by = tools_version((GENERATED_DIR / "charrnn_pb2_grpc.py").read_text())
    have = tools_version(fresh[2].read_text())
    if made_by != have:
        pytest.skip(f"descriptor checked; the byte comparison needs grpcio-tools {made_by} (installed: {have})")
    for path in fresh:
        assert path.read_text() == (GENERATED_DIR / path.name).read_text(), \
            f"{path.name} differs from a fresh build: run python -m protos.build"

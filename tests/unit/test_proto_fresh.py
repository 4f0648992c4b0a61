"""The committed generated code must be exactly what `make proto` produces from the .proto files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def _protos() -> list[Path]:
    return sorted(SRC.glob("dcl/api/**/*.proto"))


def test_generated_code_matches_proto_sources(tmp_path: Path) -> None:
    protos = _protos()
    assert protos, "no .proto files found"
    for proto in protos:
        rel = proto.relative_to(SRC)
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(proto, tmp_path / rel)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}",
         f"--python_out={out}", f"--pyi_out={out}", f"--grpclib_python_out={out}",
         *[str(p.relative_to(SRC)) for p in protos]],
        check=True, cwd=tmp_path, env=env,
    )
    generated = sorted(p for p in out.rglob("*") if p.is_file())
    assert generated
    stale = []
    for path in generated:
        committed = SRC / path.relative_to(out)
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(path.relative_to(out)))
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def test_log_v1_contract_is_the_reference_one() -> None:
    from dcl.api.log.v1 import log_pb2

    svc = log_pb2.DESCRIPTOR.services_by_name["Log"]
    assert svc.full_name == "log.v1.Log"
    methods = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in svc.methods}
    assert methods == {
        "Produce": ("log.v1.ProduceRequest", "log.v1.ProduceResponse"),
        "Consume": ("log.v1.ConsumeRequest", "log.v1.ConsumeResponse"),
        "ConsumeStream": ("log.v1.ConsumeRequest", "log.v1.ConsumeResponse"),
        "ProduceStream": ("log.v1.ProduceRequest", "log.v1.ProduceResponse"),
        "GetServers": ("log.v1.GetServersRequest", "log.v1.GetServersResponse"),
    }
    fields = {
        name: {f.name: f.number for f in log_pb2.DESCRIPTOR.message_types_by_name[name].fields}
        for name in ("Record", "ProduceRequest", "ProduceResponse", "ConsumeRequest",
                     "ConsumeResponse", "GetServersResponse", "Server")
    }
    assert fields["Record"] == {"value": 1, "offset": 2, "term": 3, "type": 4}
    assert fields["ConsumeResponse"] == {"record": 2}
    assert fields["Server"] == {"id": 1, "rpc_addr": 2, "is_leader": 3}
    assert fields["GetServersResponse"] == {"servers": 1}

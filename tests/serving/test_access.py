"""Access: ModelService off unless an admin token is configured, UNAUTHENTICATED without a token,
PERMISSION_DENIED with a wrong one; TLS with a self-signed certificate made here; loopback by
default; reflection can be switched off."""
from __future__ import annotations

import inspect
import shutil
import socket
import subprocess

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recstack.serving import client, process as P, server as S
from recstack.serving.server import TLSConfig, build_server
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc

TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, make_fake_bundle):
    root = tmp_path_factory.mktemp("access")
    make_fake_bundle(root)
    return root


def _services(channel) -> set[str]:
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    return {s.name for s in answer.list_services_response.service}


def test_admin_service_is_off_without_a_token(artifacts):
    server, port, _ = build_server(artifacts, max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            admin = pb_grpc.ModelServiceStub(ch)
            for call, req in ((admin.GetModelInfo, pb.GetModelInfoRequest()), (admin.Reload, pb.ReloadRequest())):
                with pytest.raises(grpc.RpcError) as e:
                    call(req, timeout=5, metadata=client.admin_metadata("anything"))
                assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "recstack.v1.ModelService" not in _services(ch)
            assert pb_grpc.RankingServiceStub(ch).Rank(client.make_request(1, 3), timeout=5).items
    finally:
        server.stop(None)


def test_admin_token_is_required_and_checked(artifacts, monkeypatch):
    compared = []
    real = S.hmac.compare_digest
    monkeypatch.setattr(S.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    server, port, _ = build_server(artifacts, max_workers=2, admin_token=TOKEN)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            admin = pb_grpc.ModelServiceStub(ch)
            for call, req in ((admin.GetModelInfo, pb.GetModelInfoRequest()), (admin.Reload, pb.ReloadRequest())):
                with pytest.raises(grpc.RpcError) as e:
                    call(req, timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                for wrong in ("wrong", TOKEN[:-1], TOKEN + "x", "Bearer", " " + TOKEN):
                    with pytest.raises(grpc.RpcError) as e:
                        call(req, timeout=5, metadata=client.admin_metadata(wrong))
                    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert TOKEN not in e.value.details()
            assert compared  # the comparison is hmac.compare_digest (constant time)
            info = admin.GetModelInfo(pb.GetModelInfoRequest(), timeout=5, metadata=client.admin_metadata(TOKEN))
            assert info.model_version
            assert client.model_info(f"127.0.0.1:{port}", admin_token=TOKEN).model_version == info.model_version
            assert client.reload(f"127.0.0.1:{port}", admin_token=TOKEN).model_version == info.model_version
            assert "recstack.v1.ModelService" in _services(ch)
    finally:
        server.stop(None)


def test_reflection_can_be_switched_off(artifacts):
    server, port, _ = build_server(artifacts, max_workers=2, reflection_enabled=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                _services(ch)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(None)


def test_listens_on_loopback_by_default(artifacts):
    for fn in (S.build_server, S.create_server, P.serve):
        assert inspect.signature(fn).parameters["host"].default == "127.0.0.1"
    server, port, _ = build_server(artifacts, max_workers=1)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # this host's outward address, if any
            try:
                s.connect(("10.255.255.255", 1))
                ip = s.getsockname()[0]
            except OSError:
                ip = "127.0.0.1"
        if ip.startswith("127."):
            pytest.skip("no non-loopback address on this host")
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((ip, port)) != 0  # not reachable from outside loopback
    finally:
        server.stop(None)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a certificate")
def test_tls_with_a_self_signed_certificate(artifacts, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    server, port, _ = build_server(artifacts, max_workers=2, tls=TLSConfig(str(cert), str(key)))
    try:
        resp = client.rank(f"localhost:{port}", user_id=1, k=3, tls_ca=str(cert), timeout=10)
        assert len(resp.items) == 3
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # plaintext is refused
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.RankingServiceStub(ch).Rank(client.make_request(1, 3), timeout=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        other = tmp_path / "other.pem"  # a client that trusts another CA refuses the server
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k2.pem"),
                        "-out", str(other), "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True, timeout=60)
        with pytest.raises(grpc.RpcError) as e:
            client.rank(f"localhost:{port}", user_id=1, k=3, tls_ca=str(other), timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_a_token_without_the_bearer_scheme_is_refused(artifacts):
    server, port, _ = build_server(artifacts, max_workers=2, admin_token=TOKEN)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            admin = pb_grpc.ModelServiceStub(ch)
            for value in (TOKEN, f"bearer {TOKEN}", f"Basic {TOKEN}", f"Bearer{TOKEN}"):
                with pytest.raises(grpc.RpcError) as e:
                    admin.GetModelInfo(pb.GetModelInfoRequest(), timeout=5, metadata=(("authorization", value),))
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, value
                assert "Bearer" in e.value.details() and TOKEN not in e.value.details()
            assert admin.GetModelInfo(pb.GetModelInfoRequest(), timeout=5, metadata=client.admin_metadata(TOKEN))
    finally:
        server.stop(None)

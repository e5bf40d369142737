"""The Flower app's pieces without a deployment: settings, records, the bundle, certificates,
process tags, the audit."""

import json
import os
import ssl
import subprocess
import sys
import time
import tomllib

import pytest

from shelora_core.checkpoint import atomic_write
from shelora_core.errors import ConfigError, MessageError
from shelora_core.flower import APP_DIR, audit, wire
from shelora_core.flower.launch import RoundWatcher, make_certificates, tagged_processes
from shelora_core.flower.settings import NodeSettings, ServerSettings, run_config_for


def test_run_config_round_trips_the_public_configuration(tiny_config, tmp_path):
    (tmp_path / "server").mkdir()
    rc = run_config_for(tiny_config, server_dir=tmp_path / "server", results_dir=tmp_path)
    s = ServerSettings.from_run_config(rc)
    assert (
        s.config == tiny_config.validate() and s.config.fingerprint() == tiny_config.fingerprint()
    )
    assert s.server_dir == tmp_path / "server" and s.quorum_grace < 0
    # every key the launcher sets is one the app bundle declares (Flower refuses unknown keys)
    bundle = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    assert set(rc) == set(bundle["tool"]["flwr"]["app"]["config"])


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("config", "{}", "'config' is empty"),
        ("config", "{not json", "not JSON"),
        ("config", '{"num_client": 3}', "num_client"),
        ("server-dir", "/nonexistent/server", "server-dir"),
        ("round-timeout", 0.0, "round-timeout"),
        ("round-timeout", "60", "round-timeout"),
        ("quorum-grace", float("nan"), "quorum-grace"),
        ("results-dir", "", "results-dir"),
    ],
)
def test_a_bad_run_config_is_refused_by_key(tiny_config, tmp_path, key, value, match):
    (tmp_path / "server").mkdir()
    rc = run_config_for(tiny_config, server_dir=tmp_path / "server", results_dir=tmp_path)
    rc[key] = value
    with pytest.raises(ConfigError, match=match):
        ServerSettings.from_run_config(rc)


def test_node_config_names_the_client_and_its_directory(tmp_path):
    (tmp_path / "c0").mkdir()
    (tmp_path / "ev").mkdir()
    node = NodeSettings.from_node_config({"partition-id": 0, "client-dir": str(tmp_path / "c0")})
    assert node.partition_id == 0 and node.evaluator_dir is None
    ev = NodeSettings.from_node_config({"partition-id": -1, "evaluator-dir": str(tmp_path / "ev")})
    assert ev.client_dir is None and ev.evaluator_dir == tmp_path / "ev"
    with pytest.raises(ConfigError, match="partition-id"):
        NodeSettings.from_node_config({"partition-id": "0", "client-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="client-dir"):
        NodeSettings.from_node_config({"partition-id": 1, "client-dir": str(tmp_path / "no")})
    with pytest.raises(ConfigError, match="nothing to do"):
        NodeSettings.from_node_config({"partition-id": -1})


def test_bytes_travel_as_raw_uint8_arrays():
    blob = os.urandom(70_000)
    rd = wire.content({"upload": blob, "none": None}, meta={"round": 2}, metrics={"loss": 1})
    assert set(rd.array_records["bytes"]) == {"upload"}
    arr = rd.array_records["bytes"]["upload"]
    assert (arr.dtype, arr.stype, tuple(arr.shape)) == ("uint8", "raw-bytes", (70_000,))
    assert wire.read_blob(arr) == blob
    from flwr.app import Array

    with pytest.raises(MessageError, match="raw-bytes uint8"):
        wire.read_blob(Array(__import__("numpy").zeros(3, dtype="float32")))


def test_the_app_bundle_builds_and_holds_only_its_config():
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(APP_DIR)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert sorted(n for n in names if not n.startswith(".info/")) == ["pyproject.toml"]
    comps = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert comps["components"]["serverapp"] == "shelora_core.flower.server_app:app"
    assert comps["components"]["clientapp"] == "shelora_core.flower.client_app:app"


def test_certificates_made_at_start_verify_127_0_0_1(tmp_path):
    certs = make_certificates(tmp_path)
    assert oct(certs.key.stat().st_mode & 0o777) == "0o600"
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_verify_locations(cafile=str(certs.ca))
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    cert.verify_directly_issued_by(ca)


def test_tagged_processes_finds_a_child_by_its_environment_and_nothing_else():
    tag = f"test{os.getpid()}"
    env = {**os.environ, "SHELORA_DEPLOY_TAG": f"{tag}:supernode-0"}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        for _ in range(50):
            if tagged_processes(tag):
                break
            time.sleep(0.1)
        assert tagged_processes(tag) == [proc.pid]
        assert tagged_processes(tag, "supernode-0") == [proc.pid]
        assert tagged_processes(tag, "supernode-1") == [] and tagged_processes(tag + "x") == []
    finally:
        proc.kill()
        proc.wait()
    assert tagged_processes(tag) == []


def test_the_round_watcher_ignores_an_earlier_runs_records_in_the_same_folder(tmp_path):
    # the TLS demo runs the insecure demo's configuration into the same results folder: its live
    # round lines and its recorded history must be its own rows, not the ones already on disk
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps({"round": r, "seconds": 78.0}) + "\n" for r in (1, 2, 3)))
    seen = []
    watcher = RoundWatcher(path, seen.append)
    watcher.poll()
    assert seen == [] and watcher.records == []
    # the ServerApp rewrites the whole history atomically after each round
    atomic_write(path, (json.dumps({"round": 1, "seconds": 5.0}) + "\n").encode())
    watcher.poll()
    atomic_write(
        path, "".join(json.dumps({"round": r, "seconds": 5.0}) + "\n" for r in (1, 2)).encode()
    )
    watcher.poll()
    watcher.poll()
    assert [(r["round"], r["seconds"]) for r in seen] == [(1, 5.0), (2, 5.0)]
    assert watcher.records == seen
    # no file before the run: every row is this run's
    fresh = RoundWatcher(tmp_path / "new.jsonl", None)
    atomic_write(tmp_path / "new.jsonl", (json.dumps({"round": 1}) + "\n").encode())
    fresh.poll()
    assert fresh.records == [{"round": 1}]


def test_the_audit_records_opened_files_and_counts_private_contexts(tmp_path):
    audit.install()
    target = tmp_path / "public.ctx"
    target.write_bytes(b"x")
    target.read_bytes()
    rep = audit.report()
    assert rep["installed"] and str(target) in rep["opened"]
    assert json.loads(json.dumps(rep)) == rep


def test_the_readme_block_is_generated_from_deployment_json(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("reproduce_mod", root / "reproduce.py")
    rep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rep)
    row = {
        "supernodes": 3,
        "seconds_per_round": 12.34,
        "in_process_seconds_per_round": 2.5,
        "client_load_seconds": 4.0,
        "upload_bytes_per_round": 2_166_038,
        "download_bytes_per_round": 4_894_038,
        "wire_bytes_per_round": 7_100_000,
        "final_accuracy": 0.655,
        "in_process_final_accuracy": 0.655,
        "processes_left": 0,
        "load_average": [1.5, 2.25],
    }
    cfg = {"method": "shelora", "cipher_mode": "delta", "ranks": [8, 16], "rounds": 2}
    data = {
        "scaling": {
            "config": {**cfg, "local_steps": 2},
            "rows": [row, {"supernodes": 20, "skipped": "~19.5 GB needed, 9.0 GB free"}],
            "meta": {"git_commit": "abc", "cpu_count": 2},
        },
        "demo": {
            "supernodes": 3,
            "status": "finished:completed",
            "seconds": {"start": 7.0, "run": 200.0},
            "wire_bytes": {"total-bytes": 21_250_919},
            "processes_stopped": 4,
            "processes_left": 0,
            "server_audit": {"opened": ["<tmp>/keys/server/public.ctx"], "private_contexts": 0},
            "summary": {"run_name": "r", "final_accuracy": 0.655},
            "history": [{"seconds": 70.0, "accuracy": 0.6}, {"seconds": 80.0, "accuracy": 0.655}],
        },
    }
    path = tmp_path / "deployment.json"
    path.write_text(json.dumps(data))
    text = rep.deployment_block(path)
    assert "| 3 | 12.3 | 2.5 | 4.0 | 2.17 | 4.89 | 7.10 | 0.655 / 0.655 | 0 | 1.5-2.25 |" in text
    assert "| 20 | not run: ~19.5 GB needed, 9.0 GB free |" in text
    assert "75.0 s per round" in text and "21.25 MB" in text
    assert "(0 of them secret.ctx or ope.key)" in text and "0 private CKKS contexts" in text


@pytest.fixture()
def flower_task():
    """Flower's task identity, which building a Message needs outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = old


def test_the_server_leaves_out_replies_it_cannot_use_by_reason(flower_task):
    from flwr.app import Error, Message, RecordDict
    from flwr.common.constant import ErrorCode

    from shelora_core.flower.server_app import _problem

    sent = Message(RecordDict(), dst_node_id=5, message_type="train")

    def reply(content):
        return Message(content, reply_to=sent)

    good = wire.content({"upload": b"\x01"}, metrics={"loss": 0.5})
    assert _problem(reply(good), "upload", ("loss",)) is None
    assert _problem(reply(wire.refusal("round", "a stale broadcast"))) == {
        "reason": "round",
        "error": "a stale broadcast",
    }
    lacking = _problem(reply(wire.content({"other": b"1"})), "upload")
    assert lacking["reason"] == "malformed" and "upload" in lacking["error"]
    assert _problem(reply(good), "upload", ("loss", "train"))["reason"] == "malformed"
    gone = Message(
        Error(code=ErrorCode.NODE_UNAVAILABLE, reason="missed heartbeats"), reply_to=sent
    )
    assert _problem(gone)["reason"] == "unavailable"
    crashed = Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason="killed"), reply_to=sent)
    assert _problem(crashed)["reason"] == "crashed"


def test_the_key_holder_publishes_the_public_models_geometry_for_the_server(tiny_config, tmp_path):
    from shelora_core.errors import CheckpointError
    from shelora_core.federation import build_model, split_data
    from shelora_core.flower.keys import GEOMETRY_FILE, publish_keys, read_geometry

    cfg = tiny_config.replace(method="shelora", ranks=(2, 4))
    roles = publish_keys(cfg, tmp_path / "keys")
    got = read_geometry(roles.server)
    model = build_model(cfg, split_data(cfg)[0].num_labels)
    assert got["layers"] == dict(model.layer_shapes)
    assert got["head"] == {k: v.shape for k, v in model.initial_head.items()}
    # only the server's directory gets it; a client's directory has no use for it
    assert not (roles.clients[0] / GEOMETRY_FILE).exists()
    assert read_geometry(tmp_path) is None  # no file: the server falls back to the majority
    (roles.server / GEOMETRY_FILE).write_text('{"layers": 3}')
    with pytest.raises(CheckpointError, match="model geometry"):
        read_geometry(roles.server)

"""deploy/kubernetes.yaml: valid for Kubernetes' schemas, and it does what docs/kubernetes.md says it does.

The probes run against the real coglet server (a stub predictor whose setup and prediction wait for the test), so
their verdicts are checked on each status coglet reports. The egress policy is evaluated address by address.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "kubernetes.yaml"
# docs/security.md: ranges the pods must not reach
BLOCKED = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10",
           "::1/128", "fc00::/7", "fe80::/10"]


def _documents() -> list[dict]:
    return [document for document in yaml.safe_load_all(MANIFESTS.read_text()) if document]


def _one(kind: str) -> dict:
    [document] = [document for document in _documents() if document["kind"] == kind]
    return document


def _predictor() -> dict:
    [container] = [c for c in _one("Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "predictor"]
    return container


@pytest.mark.parametrize("version", ["1.30", kubernetes_validate.latest_version()])
def test_every_manifest_is_valid_for_kubernetes(version):
    kinds = []
    for document in _documents():
        kubernetes_validate.validate(document, version, strict=True)  # strict: unknown fields are errors too
        kinds.append(document["kind"])
    assert sorted(kinds) == ["Deployment", "Job", "Namespace", "NetworkPolicy", "PersistentVolumeClaim",
                             "PersistentVolumeClaim", "Service"]


def test_the_validator_catches_a_misspelt_field():
    deployment = copy.deepcopy(_one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_one_gpu_per_pod_weights_read_only_and_the_caches_on_a_shared_volume():
    container = _predictor()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {item["name"]: item.get("value") for item in container["env"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in _one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    claims = {document["metadata"]["name"]: document for document in _documents()
              if document["kind"] == "PersistentVolumeClaim"}

    def claim_holding(path: str) -> dict:
        [mount] = [mount for root, mount in mounts.items() if path == root or path.startswith(root + "/")]
        return claims[volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]], mount

    weights, mount = claim_holding(env["FLUX_WEIGHTS_DIR"])
    assert mount["readOnly"] is True
    for setting in ("FLUX_LORA_CACHE_DIR", "FLUX_COMPILE_CACHE_DIR"):
        cache, mount = claim_holding(env[setting])
        assert cache["spec"]["accessModes"] == ["ReadWriteMany"] and not mount.get("readOnly")
    assert cache is not weights


# --- the probes, against the real coglet -----------------------------------------------------------------------

STUB = '''
import time
from pathlib import Path
from cog import BaseRunner


def wait_for(name):
    while not Path(name).exists():
        time.sleep(0.05)


class Predictor(BaseRunner):
    def setup(self):
        wait_for("setup-may-end")
        if Path("setup-fails").exists():
            raise RuntimeError("weights missing")

    def run(self, x: int = 1) -> int:
        wait_for("prediction-may-end")
        return x
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe_commands(port: int) -> dict[str, list[str]]:
    """Each probe's command, as the kubelet would run it in the pod, aimed at this port."""
    commands = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = list(_predictor()[probe]["exec"]["command"])
        assert command[0] == "python" and "127.0.0.1:5000/health-check" in command[2]
        commands[probe] = [sys.executable, command[1], command[2].replace(":5000/", f":{port}/"), *command[3:]]
    return commands


def _verdicts(commands: dict[str, list[str]]) -> dict[str, bool]:
    return {probe: subprocess.run(command, capture_output=True, timeout=30).returncode == 0
            for probe, command in commands.items()}


def _status(port: int) -> str:
    return requests.get(f"http://127.0.0.1:{port}/health-check", timeout=5).json()["status"]


def _wait_for_status(port: int, wanted: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if _status(port) == wanted:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"coglet never reported {wanted}")


def _start_coglet(folder: Path, port: int) -> subprocess.Popen:
    (folder / "stub.py").write_text(STUB)
    env = {**os.environ, "COG_PREDICT_TYPE_STUB": "stub.py:Predictor", "PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=folder, env=env,
                            stdout=(folder / "coglet.log").open("wb"), stderr=subprocess.STDOUT)


@pytest.fixture
def coglet(tmp_path):
    port = _free_port()
    process = _start_coglet(tmp_path, port)
    yield tmp_path, port
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_only_an_idle_ready_pod_takes_traffic(coglet):
    folder, port = coglet
    commands = _probe_commands(port)
    _wait_for_status(port, "STARTING")
    assert _verdicts(commands) == {"startupProbe": False, "readinessProbe": False, "livenessProbe": True}

    (folder / "setup-may-end").touch()
    _wait_for_status(port, "READY")
    assert _verdicts(commands) == {"startupProbe": True, "readinessProbe": True, "livenessProbe": True}

    prediction = requests.post(f"http://127.0.0.1:{port}/predictions", json={"input": {"x": 3}},
                               headers={"Prefer": "respond-async"}, timeout=10)
    assert prediction.status_code == 202
    _wait_for_status(port, "BUSY")
    assert _verdicts(commands) == {"startupProbe": True, "readinessProbe": False, "livenessProbe": True}
    (folder / "prediction-may-end").touch()
    _wait_for_status(port, "READY")


def test_a_failed_setup_is_restarted_by_the_liveness_probe(coglet):
    folder, port = coglet
    (folder / "setup-fails").touch()
    (folder / "setup-may-end").touch()
    _wait_for_status(port, "SETUP_FAILED")
    assert _verdicts(_probe_commands(port)) == {"startupProbe": True, "readinessProbe": False, "livenessProbe": False}


# --- the egress policy -------------------------------------------------------------------------------------------

def _egress_allows(address: str) -> bool:
    """Whether the policy's ipBlock rules let the pods reach this address (any port)."""
    ip = ipaddress.ip_address(address)
    for rule in _one("NetworkPolicy")["spec"]["egress"]:
        for peer in rule.get("to", []):
            block = peer.get("ipBlock")
            if block and ip.version == ipaddress.ip_network(block["cidr"]).version \
                    and ip in ipaddress.ip_network(block["cidr"]) \
                    and not any(ip in ipaddress.ip_network(cidr) for cidr in block.get("except", [])):
                return True
    return False


def test_the_egress_policy_blocks_private_ranges_and_allows_the_internet_and_dns():
    policy = _one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == _one("Deployment")["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Egress"]
    for cidr in BLOCKED:
        network = ipaddress.ip_network(cidr)
        for address in (network[0], network[-1], network[network.num_addresses // 2]):
            assert not _egress_allows(str(address)), address
    for address in ("169.254.169.254", "::ffff:10.0.0.1", "fd00::1"):  # cloud metadata; mapped and ULA addresses
        assert not _egress_allows(address), address
    for address in ("8.8.8.8", "1.1.1.1", "172.32.0.1", "2606:4700:4700::1111"):  # public, just outside a range
        assert _egress_allows(address), address

    [dns] = [rule for rule in policy["spec"]["egress"] if any("podSelector" in peer for peer in rule["to"])]
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert sorted((port["port"], port["protocol"]) for port in dns["ports"]) == [(53, "TCP"), (53, "UDP")]

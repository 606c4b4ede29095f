"""deploy/kubernetes.yaml, hardened to the "restricted" Pod Security Standard as far as the cog image allows: checkov
passes but for the checks docs/kubernetes.md lists with their reasons, every pod holds no more power than it needs,
and the server, run as the pod runs it, writes only to the volumes the manifest makes writable (traced with strace)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.test_kubernetes import MANIFESTS, _documents, _one

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.fixtures.servers"]
DOCS = ROOT / "docs" / "kubernetes.md"
WRITABLE = {"predictor": {"/tmp", "/cache"}, "fill": {"/tmp", "/weights"}, "wait-for-weights": set()}


def checkov_binary() -> Path:
    """script/setup installs checkov in a venv of its own beside .venv (its pins conflict with the project's)."""
    candidates = [ROOT / ".venv-checkov", (ROOT / ".venv").resolve().parent / ".venv-checkov"]
    for venv in candidates:
        if (venv / "bin" / "checkov").exists():
            return venv / "bin" / "checkov"
    pytest.fail("checkov is not installed: run script/setup, which creates .venv-checkov")


def checkov(manifest: Path) -> dict:
    command = [str(checkov_binary()), "-f", str(manifest), "--framework", "kubernetes", "-o", "json", "--skip-download"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    assert report["summary"]["parsing_errors"] == 0 and report["summary"]["resource_count"] >= len(_documents())
    return report["results"]


def documented_skips() -> set[tuple[str, str]]:
    """(check, kind) for each row of docs/kubernetes.md's table of skipped checks: | CKV_K8S_23 | Deployment, Job | why |"""
    rows = re.findall(r"^\| (CKV_K8S_\d+) \| ([A-Za-z, ]+) \| .+\|$", DOCS.read_text(), flags=re.MULTILINE)
    return {(check, kind.strip()) for check, kinds in rows for kind in kinds.split(",")}


def test_checkov_passes_but_for_the_documented_skips():
    results = checkov(MANIFESTS)
    assert [(c["check_id"], c["resource"]) for c in results["failed_checks"]] == []
    skipped = {(c["check_id"], c["resource"].split(".")[0]) for c in results["skipped_checks"]}
    assert skipped and skipped == documented_skips()


def test_checkov_fails_a_container_that_may_write_its_root_filesystem(tmp_path):
    documents = copy.deepcopy(_documents())
    [deployment] = [document for document in documents if document["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    manifest = tmp_path / "kubernetes.yaml"
    manifest.write_text(yaml.safe_dump_all(documents))
    failed = {(c["check_id"], c["resource"]) for c in checkov(manifest)["failed_checks"]}
    assert failed == {("CKV_K8S_22", "Deployment.flux.flux-lora")}


def _pod_specs() -> dict[str, dict]:
    return {kind: _one(kind)["spec"]["template"]["spec"] for kind in ("Deployment", "Job")}


def test_every_pod_holds_no_more_power_than_it_needs():
    for kind, pod in _pod_specs().items():
        assert pod["automountServiceAccountToken"] is False, kind
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, kind
        assert not any(key in pod for key in ("hostNetwork", "hostPID", "hostIPC")), kind
        for container in pod.get("initContainers", []) + pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and not context.get("privileged"), container["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            writable = {mount["mountPath"] for mount in container.get("volumeMounts", []) if not mount.get("readOnly")}
            assert writable == WRITABLE[container["name"]], container["name"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        assert "emptyDir" in volumes["tmp"], kind  # /tmp lives and dies with the pod
    init = _pod_specs()["Deployment"]["initContainers"][0]["securityContext"]
    assert init["runAsNonRoot"] is True and init["runAsUser"] >= 10000


def test_everything_lives_in_a_namespace_that_enforces_baseline_and_warns_on_restricted():
    labels = _one("Namespace")["metadata"]["labels"]
    assert labels == {"pod-security.kubernetes.io/enforce": "baseline", "pod-security.kubernetes.io/warn": "restricted",
                      "pod-security.kubernetes.io/audit": "restricted"}
    name = _one("Namespace")["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in _documents() if d["kind"] != "Namespace"} == {name}


# --- where the server writes, traced ----------------------------------------------------------------------------

TRACED = ("open", "openat", "creat", "mkdir", "mkdirat", "rename", "renameat", "renameat2", "unlink", "unlinkat", "link",
          "linkat", "symlink", "symlinkat", "truncate")
WRITES = re.compile(rf"^\d+\s+({'|'.join(TRACED)})\((.*)$")


def written_paths(trace: str, cwd: Path) -> set[Path]:
    """Every path a traced process created, opened for writing, renamed, linked or removed. A path relative to an
    open folder (not AT_FDCWD) is left out: such folders were made by calls seen here."""
    paths = set()
    for line in trace.splitlines():
        match = WRITES.match(line)
        if not match:
            continue
        call, arguments = match.groups()
        if call.startswith("open") and not re.search(r"O_WRONLY|O_RDWR|O_CREAT", arguments):
            continue
        names = re.findall(r'"((?:[^"\\]|\\.)*)"', arguments)
        if call.startswith("symlink"):
            names = names[-1:]  # the link's own path; its target is only text
        relative_to_a_folder = call.endswith("at") or call.endswith("at2")
        for name in names:
            if name.startswith("/"):
                paths.add(Path(name))
            elif not relative_to_a_folder or arguments.startswith("AT_FDCWD"):
                paths.add(cwd / name)
    return paths


def test_written_paths_reads_strace_lines():
    trace = "\n".join([
        '12 openat(AT_FDCWD, "/tmp/a/out.webp", O_RDWR|O_CREAT|O_TRUNC|O_CLOEXEC, 0666) = 15',
        '12 openat(AT_FDCWD, "/src/predict.py", O_RDONLY|O_CLOEXEC) = 3',
        '13 mkdir("/tmp/coglet/predictions/p1", 0777) = 0',
        '13 unlinkat(3, "out-0.webp", 0) = 0',
        '14 openat(AT_FDCWD, "notes.txt", O_WRONLY|O_CREAT, 0644) = 4',
        '14 symlink("/etc/passwd", "/tmp/a/link") = 0',
    ])
    assert written_paths(trace, Path("/src")) == {Path("/tmp/a/out.webp"), Path("/tmp/coglet/predictions/p1"),
                                                  Path("/src/notes.txt"), Path("/tmp/a/link")}


def _pod_environment(mapped: dict[str, Path]) -> dict[str, str]:
    """The predictor container's literal settings, its volumes' paths mapped to folders here; tiny weights instead of
    /weights (the test's are read, never written, as the read-only volume's)."""
    env = {}
    for item in _one("Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in item and item["name"] != "FLUX_WEIGHTS_DIR":
            value = item["value"]
            mount = next((mount for mount in mapped if value == mount or value.startswith(mount + "/")), None)
            env[item["name"]] = str(mapped[mount]) + value[len(mount):] if mount else value
    return env


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to see the writes of coglet's Rust server too")
def test_the_server_writes_only_to_the_volumes_the_manifest_makes_writable(tiny_weights, file_server, tmp_path):
    from tests.fixtures.cog_server import free_port
    from tests.fixtures.lora_factory import make_spec, write_layout
    from tests.test_server import png_bytes
    from weights.tiny.flux import tiny_transformer

    predictor = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    writable = [mount["mountPath"] for mount in predictor["volumeMounts"] if not mount.get("readOnly")]
    mapped = {mount: tmp_path / mount.strip("/") for mount in writable}  # the pod's writable volumes, here
    # the pod's temp folder is /tmp: here, a folder of its own, allowed only if /tmp is a writable volume
    pod_tmp = mapped.get("/tmp", tmp_path / "tmp-on-the-read-only-root")
    for folder in {*mapped.values(), pod_tmp}:
        folder.mkdir()
    transformer = tiny_transformer(guidance_embeds=True)
    lora = write_layout("kohya", make_spec(transformer, seed=5, magnitude=0.5), transformer, tmp_path / "l.safetensors")
    port = free_port()
    # torch records its cache folder in the environment once used: this test process's is not the pod's
    inherited = {key: value for key, value in os.environ.items() if not key.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    env = {**inherited, **_pod_environment(mapped), "TMPDIR": str(pod_tmp), "PORT": str(port),
           "COG_PREDICT_TYPE_STUB": "predict.py:Predictor", "FLUX_ALLOW_PRIVATE_URLS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    trace_file = tmp_path / "strace.txt"
    command = ["strace", "-f", "-qq", "-o", str(trace_file), "-e", "trace=" + ",".join(TRACED),
               sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"]
    # the image's working folder is /src, the project: coglet runs there, as in the pod
    server = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True,
                              stdout=(tmp_path / "coglet.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        _wait_until_ready(f"http://127.0.0.1:{port}", server, tmp_path / "coglet.log")
        request = {"prompt": "x", "num_inference_steps": 1, "num_outputs": 2, "image": _data_uri(png_bytes()),
                   "extra_lora": file_server.add("/style.safetensors", lora.read_bytes())}
        body = requests.post(f"http://127.0.0.1:{port}/predictions", json={"input": request}, timeout=300).json()
        assert body["status"] == "succeeded", body
    finally:
        _stop(server)
    written = written_paths(trace_file.read_text(), ROOT)
    allowed = [*mapped.values(), Path("/tmp/coglet"), Path("/dev")]  # coglet's own /tmp/coglet: in the pod, in /tmp
    assert sorted(str(p) for p in written if not any(p == a or a in p.parents for a in allowed)) == []
    assert any(tmp_path / "cache" in p.parents for p in written), "no LoRA cached: the trace proves less than it should"
    assert any(pod_tmp in p.parents for p in written), "no upload or output: the trace proves less than it should"


def _data_uri(data: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(data).decode()


def _wait_until_ready(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if requests.get(f"{url}/health-check", timeout=2).json().get("status") == "READY":
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"coglet did not become ready:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    """strace, coglet and its worker share a session: end them together."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    try:
        os.killpg(server.pid, signal.SIGKILL)  # a tracee strace left behind
    except ProcessLookupError:
        pass

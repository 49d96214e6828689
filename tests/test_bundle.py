"""Edge bundles: build, verify, tamper detection, reproducibility, and run.py on real digits."""

import io
import json
import os
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest
from PIL import Image

from compressor.data import DataSpec, load_dataset
from compressor.data.loader import to_model_input
from compressor.modeldir import load_model_dir


@pytest.fixture(scope="module")
def bundle(cnn_parent, tmp_path_factory):
    from cli.main import run

    out = tmp_path_factory.mktemp("bundle") / "b.tar.gz"
    assert run(["package", str(cnn_parent), "--target", "onnxruntime-cpu", "--out", str(out)]) == 0
    return out


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


def test_bundle_contents_and_verify(cli, bundle):
    files = _members(bundle)
    assert {"bundle/model.onnx", "bundle/run.py", "bundle/requirements.txt", "bundle/manifest.json"} <= set(files)
    m = json.loads(files["bundle/manifest.json"])
    assert m["preprocessing"]["shape"] == [3, 16, 16] and len(m["labels"]) == 10 and m["metrics"]["params"] > 0
    assert m["build"]["profile"]["latency_ms"]["p50"] > 0 and set(m["files"]) == {k[7:] for k in files} - {"manifest.json"}
    assert "onnxruntime" in files["bundle/requirements.txt"].decode()
    _, out, _ = cli("package", "--verify", bundle)
    assert "bundle OK" in out


def _rewrite(src: Path, dst: Path, change):
    files = _members(src)
    change(files)
    with tarfile.open(dst, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("tamper", ["model", "runpy", "extra"])
def test_tampering_is_detected(cli, bundle, tmp_path, tamper):
    def change(files):
        if tamper == "model":
            b = bytearray(files["bundle/model.onnx"])
            b[len(b) // 2] ^= 1
            files["bundle/model.onnx"] = bytes(b)
        elif tamper == "runpy":
            files["bundle/run.py"] += b"\nprint('hello')\n"
        else:
            files["bundle/extra.py"] = b"import os\n"

    bad = tmp_path / "bad.tar.gz"
    _rewrite(bundle, bad, change)
    _, _, err = cli("package", "--verify", bad, expect=1)
    assert ("checksum mismatch" in err) if tamper != "extra" else ("not in the manifest" in err)


def _manifest_rehashed(files):
    """An attacker's rewrite: the manifest's checksums updated to match the changed files."""
    import hashlib

    m = json.loads(files["bundle/manifest.json"])
    m["files"] = {k[len("bundle/"):]: hashlib.sha256(v).hexdigest() for k, v in files.items()
                  if k.startswith("bundle/") and k != "bundle/manifest.json"}
    files["bundle/manifest.json"] = json.dumps(m).encode()


def test_verify_never_runs_the_bundles_code(cli, bundle, tmp_path):
    marker = tmp_path / "ran"

    def change(files):
        files["bundle/run.py"] = (f"open({str(marker)!r}, 'w').write('x')\n").encode()  # a replaced runner
        _manifest_rehashed(files)

    bad = tmp_path / "replaced.tar.gz"
    _rewrite(bundle, bad, change)
    _, _, err = cli("package", "--verify", bad, expect=1)  # a replaced runner under a re-hashed manifest
    assert not marker.exists(), "verification executed the bundle's run.py"
    assert "run.py differs from the runner this compress version writes (+1/-" in err and len(err.strip().splitlines()) == 1
    _, out, _ = cli("package", "--verify", bad, "--allow-custom-runner")  # opted in: accepted, and said loudly
    assert not marker.exists() and "CUSTOM RUNNER accepted (--allow-custom-runner)" in out and "not who made it" in out


def test_verify_refuses_a_runner_that_does_not_compile(cli, bundle, tmp_path):
    def change(files):
        files["bundle/run.py"] += b"\ndef broken(:\n"
        _manifest_rehashed(files)

    bad = tmp_path / "syntax.tar.gz"
    _rewrite(bundle, bad, change)
    for extra in ([], ["--allow-custom-runner"]):
        _, _, err = cli("package", "--verify", bad, *extra, expect=1)
        assert "run.py does not compile (line" in err


def test_member_outside_bundle_dir_is_refused(cli, bundle, tmp_path):
    def change(files):
        files["elsewhere.txt"] = b"surprise"

    bad = tmp_path / "outside.tar.gz"
    _rewrite(bundle, bad, change)
    _, _, err = cli("package", "--verify", bad, expect=1)
    assert "outside bundle/" in err and len(err.strip().splitlines()) == 1


def test_expected_digest_authenticates_the_archive(cli, bundle, cnn_parent, tmp_path):
    import hashlib

    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    _, out, _ = cli("package", "--verify", bundle, "--expect-sha256", digest.upper())
    assert "bundle OK" in out and "not who made it" not in out
    forged = tmp_path / "forged.tar.gz"
    _rewrite(bundle, forged, _manifest_rehashed)  # self-consistent, but not the archive that was announced
    cli("package", "--verify", forged)
    _, _, err = cli("package", "--verify", forged, "--expect-sha256", digest, expect=1)
    assert "not the bundle you expected" in err
    cli("package", "--verify", bundle, "--expect-sha256", "abc", expect=2)


@pytest.mark.parametrize("field,value", [("files", ["model.onnx"]), ("samples", {"files": 3}), ("model_file", 7),
                                         ("preprocessing", {"shape": "x"})])
def test_malformed_manifest_fields_are_one_line(cli, bundle, tmp_path, field, value):
    def change(files):
        m = json.loads(files["bundle/manifest.json"])
        m[field] = value
        files["bundle/manifest.json"] = json.dumps(m).encode()

    bad = tmp_path / "malformed.tar.gz"
    _rewrite(bundle, bad, change)
    code, _, err = cli("package", "--verify", bad, expect=None)
    assert code in (1, 2) and len(err.strip().splitlines()) == 1 and "Traceback" not in err and "internal" not in err


def test_bundles_are_reproducible(cli, cnn_parent, bundle, tmp_path):
    again = tmp_path / "again.tar.gz"
    cli("package", cnn_parent, "--target", "onnxruntime-cpu", "--out", again)
    a, b = _members(bundle), _members(again)
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("manifest.json"):
            ma, mb = json.loads(a[k]), json.loads(b[k])
            ma.pop("build"), mb.pop("build")
            assert ma == mb
        else:
            assert a[k] == b[k], k


def _digit_pngs(folder: Path, n: int = 40):
    ds = load_dataset(DataSpec("digits"))
    folder.mkdir()
    for i in range(n):
        Image.fromarray(ds.test.images[i, 0].numpy()).save(folder / f"{i:03d}.png")
    return ds.test.labels[:n].tolist(), ds.test.images[:n]


def test_run_py_classifies_real_digits(cnn_parent, bundle, tmp_path):
    with tarfile.open(bundle) as t:
        t.extractall(tmp_path, filter="data")
    labels, images = _digit_pngs(tmp_path / "imgs")
    r = subprocess.run([sys.executable, str(tmp_path / "bundle" / "run.py"), str(tmp_path / "imgs"), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pred = [row["top"][0]["index"] for row in json.loads(r.stdout)]
    lm = load_model_dir(cnn_parent)
    expected = lm.model(to_model_input(images, lm.record.input)).argmax(1).tolist()
    assert pred == expected  # the bundle's preprocessing and model are the training pipeline's
    assert sum(p == y for p, y in zip(pred, labels)) >= 0.8 * len(labels)


def test_gpu_target_bundles_carry_their_runtime(cli, cnn_parent, tmp_path):
    out = tmp_path / "jetson.tar.gz"
    cli("package", cnn_parent, "--target", "jetson", "--out", out, "--no-profile")
    members = _members(out)
    assert json.loads(members["bundle/manifest.json"])["runtime"]["target"] == "jetson"
    assert "cuda-python>=12.2,<12.7" in members["bundle/requirements.txt"].decode()
    cli("package", "--verify", out)  # the same graph is checked with ONNX Runtime on this CPU


@pytest.mark.parametrize("target", ["tensorrt", "tensorrt-cu13", "jetson"])
def test_tensorrt_targets_pin_one_cuda_major(target):
    """Bare `tensorrt`/`cuda-python` resolve to CUDA 13 wheels, which fail with CUDA error 35 under a CUDA 12
    driver: every TensorRT target pins cuda-python to one CUDA major, and the TensorRT wheel to the same."""
    from exporters.bundle import TARGETS

    reqs = TARGETS[target]["requirements"]
    cuda = [r for r in reqs if r.startswith("cuda-python")]
    assert len(cuda) == 1
    low, high = cuda[0].removeprefix("cuda-python>=").split(",<")
    major = int(low.split(".")[0])
    assert float(high) <= major + 1  # never the next CUDA major
    trt = [r for r in reqs if r.startswith("tensorrt")]
    if target == "jetson":
        assert trt == [] and major == 12  # JetPack's own TensorRT, CUDA 12
    else:
        assert len(trt) == 1 and trt[0].startswith(f"tensorrt-cu{major}")


@pytest.mark.skipif(os.environ.get("COMPRESS_SLOW_TESTS") != "1", reason="opt-in: set COMPRESS_SLOW_TESTS=1 (installs the bundle's requirements into a fresh venv)")
def test_bundle_runs_in_a_fresh_venv(bundle, tmp_path):
    with tarfile.open(bundle) as t:
        t.extractall(tmp_path, filter="data")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(tmp_path / "bundle" / "requirements.txt")], check=True, timeout=900)
    labels, _ = _digit_pngs(tmp_path / "imgs")
    r = subprocess.run([str(py), str(tmp_path / "bundle" / "run.py"), str(tmp_path / "imgs"), "--json"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pred = [row["top"][0]["index"] for row in json.loads(r.stdout)]
    assert sum(p == y for p, y in zip(pred, labels)) >= 0.8 * len(labels)


def test_fuzzed_manifests_fail_in_one_line(bundle, tmp_path_factory):
    """Any value in any manifest field: verify passes or raises GateFailed/UserError, never another error."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    from compressor.errors import GateFailed, UserError
    from exporters.bundle import verify

    files = _members(bundle)
    base = json.loads(files["bundle/manifest.json"])
    values = st.recursive(st.none() | st.booleans() | st.integers(-3, 99) | st.text(max_size=6),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                          max_leaves=6)
    paths = [(k,) for k in base] + [("samples", k) for k in base["samples"]] + [("runtime", k) for k in base["runtime"]] \
        + [("preprocessing", k) for k in base["preprocessing"]]

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(paths), value=values)
    def check(path, value):
        m = json.loads(json.dumps(base))
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        out = tmp_path_factory.mktemp("fuzzb") / "b.tar.gz"
        _rewrite(bundle, out, lambda f: f.__setitem__("bundle/manifest.json", json.dumps(m).encode()))
        try:
            verify(out)
        except (GateFailed, UserError) as e:
            assert "\n" not in str(e)

    check()

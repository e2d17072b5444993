"""Dockerfile lint and the docker helper scripts' logic, with a stub `docker` on PATH.

No container engine runs here: the stub records its argv, plays the container for
`docker run` (copies prepared outputs into the /output mount) and emits bytes for
`docker save`, so the scripts' flags, mounts, GPU detection and output checks are tested.
"""
from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "test" / "docker"
# Tools the scripts may use; PATH holds only these (and the stubs), so a real docker or
# nvidia-smi on the machine cannot leak in.
TOOLS = ("bash", "sh", "cat", "mkdir", "rm", "chmod", "mv", "ls", "tr", "printf", "gzip", "tar",
         "dirname", "pwd", "echo", "cp", "env")

STUB_DOCKER = r"""#!/usr/bin/env bash
# Stub docker: record argv, one argument per line, calls separated by "--CALL--".
{ echo "--CALL--"; printf '%s\n' "$@"; } >> "$STUB_LOG"
case "$1" in
  save) printf 'IMAGE-TAR %s' "$2" ;;
  run)
    while [ $# -gt 0 ]; do
      if [ "$1" = "--volume" ] || [ "$1" = "-v" ]; then
        case "$2" in *:/output) cp -R "$STUB_OUTPUTS/." "${2%:/output}/" ;; esac
      fi
      shift
    done ;;
esac
exit 0
"""


def _bin(tmp: Path, gpu: bool) -> str:
    b = tmp / "bin"
    b.mkdir(exist_ok=True)
    for tool in TOOLS:
        where = shutil.which(tool)
        if where and not (b / tool).exists():
            (b / tool).symlink_to(where)
    (b / "docker").write_text(STUB_DOCKER)
    (b / "docker").chmod(0o755)
    if gpu:
        (b / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (b / "nvidia-smi").chmod(0o755)
    return str(b)


def _calls(log: Path) -> list[list[str]]:
    return [c.strip("\n").split("\n") for c in log.read_text().split("--CALL--\n") if c.strip()]


def _write_outputs(root: Path, shape, frame, mask_value=1, json_text=None) -> None:
    seg = root / "images" / "fetal-abdomen-segmentation"
    seg.mkdir(parents=True, exist_ok=True)
    vol = np.zeros(shape, np.uint8)
    if frame >= 0:
        vol[frame, 2:6, 3:8] = mask_value
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.28, 0.28, 1.0))
    sitk.WriteImage(img, str(seg / "output.mha"), True)
    (root / "fetal-abdomen-frame-number.json").write_text(json_text or json.dumps(frame))


def _env(tmp: Path, gpu: bool, **extra) -> dict[str, str]:
    return {"PATH": _bin(tmp, gpu), "HOME": str(tmp), "STUB_LOG": str(tmp / "docker.log"),
            "PYTHON": sys.executable, **extra}


@pytest.fixture
def sample(tmp_path):
    """A tiny input root and expected outputs for test_run.sh."""
    inp = tmp_path / "input" / "images" / "stacked-fetal-ultrasound"
    inp.mkdir(parents=True)
    img = sitk.GetImageFromArray(np.ones((6, 10, 12), np.uint8))
    img.SetSpacing((0.28, 0.28, 1.0))
    sitk.WriteImage(img, str(inp / "case.mha"), True)
    _write_outputs(tmp_path / "expected", (6, 10, 12), frame=4)
    return tmp_path


def _test_run(tmp: Path, gpu: bool, container_outputs: Path):
    env = _env(tmp, gpu, INPUT=str(tmp / "input"), EXPECTED=str(tmp / "expected"),
               OUTPUT=str(tmp / "out"), MODEL_DIR=str(tmp / "model"), STUB_OUTPUTS=str(container_outputs))
    (tmp / "model").mkdir(exist_ok=True)
    return subprocess.run(["bash", str(SCRIPTS / "test_run.sh"), "fq:test"], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("gpu", [False, True])
def test_test_run_uses_the_platform_flags_and_passes_matching_outputs(sample, gpu):
    _write_outputs(sample / "container", (6, 10, 12), frame=4)
    r = _test_run(sample, gpu, sample / "container")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "compare: OK" in r.stdout and "Dice 1.0000" in r.stdout
    calls = _calls(sample / "docker.log")
    assert [c[:2] for c in calls] == [["volume", "create"], ["run", "--rm"], ["volume", "rm"]]
    volume = calls[0][2]
    run = calls[1]
    assert run[-1] == "fq:test"
    for flag in ("--platform=linux/amd64", "--network"):
        assert flag in run
    assert run[run.index("--network") + 1] == "none"
    mounts = [run[i + 1] for i, a in enumerate(run) if a == "--volume"]
    assert sorted(mounts) == sorted([f"{sample / 'input'}:/input:ro", f"{sample / 'out'}:/output",
                                     f"{volume}:/tmp", f"{sample / 'model'}:/opt/ml/model:ro"])
    assert ("--gpus" in run) == gpu
    if gpu:
        assert run[run.index("--gpus") + 1] == "all"
    assert calls[2] == ["volume", "rm", volume]  # the /tmp volume is removed afterwards


@pytest.mark.parametrize("broken, message", [
    ({"frame": 3}, "frame 3, expected 4"),
    ({"frame": 4, "mask_value": 2}, "only 0 and 1"),
    ({"frame": 4, "json_text": "4.0"}, "must be an int"),
    ({"frame": 4, "shape": (5, 10, 12)}, "differs from the input's (6, 10, 12)"),
])
def test_test_run_fails_on_outputs_that_differ(sample, broken, message):
    args = {"shape": (6, 10, 12), **broken}
    _write_outputs(sample / "container", args.pop("shape"), **args)
    r = _test_run(sample, False, sample / "container")
    assert r.returncode == 1
    assert message in r.stdout, r.stdout + r.stderr


def test_test_run_contract_only_without_expected_outputs(sample):
    shutil.rmtree(sample / "expected")
    _write_outputs(sample / "container", (6, 10, 12), frame=2)
    r = _test_run(sample, False, sample / "container")
    assert r.returncode == 0 and "contract checks only" in r.stdout, r.stdout + r.stderr


def test_build_and_export(tmp_path):
    env = _env(tmp_path, False, EXPORT_DIR=str(tmp_path / "export"))
    r = subprocess.run(["bash", str(SCRIPTS / "build.sh"), "fq:1"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert _calls(tmp_path / "docker.log")[-1] == ["build", "--platform=linux/amd64", "--tag", "fq:1", str(REPO)]

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"w")
    r = subprocess.run(["bash", str(SCRIPTS / "export.sh"), "me/fq:1"], env={**env, "MODEL_DIR": str(model)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert _calls(tmp_path / "docker.log")[-1] == ["save", "me/fq:1"]
    assert gzip.decompress((tmp_path / "export" / "me_fq_1.tar.gz").read_bytes()) == b"IMAGE-TAR me/fq:1"
    with tarfile.open(tmp_path / "export" / "model.tar.gz") as tar:  # files at the top: -C model .
        assert sorted(n.lstrip("./") for n in tar.getnames() if n not in (".", "./")) == \
            ["model.json", "model.safetensors"]
    (model / "model.safetensors").unlink()
    r = subprocess.run(["bash", str(SCRIPTS / "export.sh")], env={**env, "MODEL_DIR": str(model)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "does not hold model.json and model.safetensors" in r.stderr


def test_dockerfile_lints_clean_and_matches_the_platform_template():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([hadolint, "--failure-threshold", "warning", str(REPO / "Dockerfile")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (REPO / "Dockerfile").read_text()
    torch_pin = re.search(r"^torch==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    base = re.search(r"^FROM --platform=linux/amd64 pytorch/pytorch:(\S+)", text, re.M)
    assert base and base.group(1).startswith(f"{torch_pin}-cuda") and base.group(1).endswith("-runtime")
    assert "useradd" in text and re.search(r"^USER user$", text, re.M)
    assert re.search(r"^WORKDIR /opt/app$", text, re.M) and "PYTHONUNBUFFERED=1" in text
    assert 'ENTRYPOINT ["python", "inference.py"]' in text
    assert "COPY resources /opt/app/resources" in text
    assert "grep -vE '^(torch|torchvision)=='" in text  # torch is never installed twice
    env = dict(re.findall(r"(\w+)=(\S+)", re.search(r"^ENV (.*?)\n\n", text, re.S | re.M).group(1)))
    assert {"MPLCONFIGDIR", "XDG_CACHE_HOME", "TORCH_HOME"} <= set(env)
    assert not [v for v in env.values() if v.startswith("/tmp")]  # /tmp is an empty volume at run time


def test_dockerignore_keeps_the_context_small():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # everything out, then only what the image needs back in
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"inference.py", "requirements.txt", "fetaliqa", "resources"} <= allowed
    assert not allowed & {".venv", "test", ".git", "runs", "model", "out", "training"}


def test_test_run_never_passes_on_stale_outputs(sample):
    _write_outputs(sample / "out", (6, 10, 12), frame=4)  # a previous run's good outputs
    (sample / "container").mkdir()  # this run's container writes nothing
    r = _test_run(sample, False, sample / "container")
    assert r.returncode == 1 and "must hold exactly output.mha" in r.stdout, r.stdout + r.stderr


def _pins(path: Path) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", path.read_text(), re.M)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in found}


def test_constraints_pin_what_the_requirements_pin_and_reach_the_image():
    # constraints.txt (bash test/make_constraints.sh) pins the whole resolved set: it must agree with
    # every direct pin, and the image must be able to read it
    req, con = _pins(REPO / "requirements.txt"), _pins(REPO / "constraints.txt")
    assert req and {k: con.get(k) for k in req} == req
    assert {"transformers", "timm", "huggingface-hub", "pillow"} <= set(con)  # what open_clip pulls in
    copied = re.findall(r"^COPY (.+) /opt/app/", (REPO / "Dockerfile").read_text(), re.M)[0].split()
    allowed = {ln[1:].strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.startswith("!")}
    assert {"requirements.txt", "constraints.txt"} <= set(copied) <= allowed

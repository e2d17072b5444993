"""inference.py end to end: the output contract, every bad input, model choice, CUDA OOM.

Small cases use a random-weights fetalclip-small model exported once per session; the
full-size case uses the embedded default (resources/model) when it exists.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "test")]
import inference  # noqa: E402
from compare_outputs import check_outputs, input_info  # noqa: E402
from fetaliqa.model import ModelConfig  # noqa: E402

SEG = Path("images/fetal-abdomen-segmentation")
FRAME_JSON = Path("fetal-abdomen-frame-number.json")


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    from fetaliqa.model import ModelConfig, build_model, export_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    export_model(build_model(ModelConfig(backbone="fetalclip-small", heads=("seg",))), out,
                 {"note": "random weights, test fixture"})
    return out


@lru_cache(maxsize=None)
def _sim_stack() -> np.ndarray:
    """A small simulated case: 6 sweeps x 2 frames of 64x80 (read-only, shared)."""
    from fetaliqa.simulate import SimConfig, simulate_case

    stack = simulate_case(11, SimConfig(frames_per_sweep=2, rows=64, cols=80)).stack
    stack.flags.writeable = False
    return stack


def _case(root: Path, array: np.ndarray, name: str = "case.mha", vector: bool = False) -> Path:
    folder = root / "input" / "images" / "stacked-fetal-ultrasound"
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array, isVector=vector)
    img.SetSpacing((0.28, 0.28, 1.0)[: img.GetDimension()])
    sitk.WriteImage(img, str(folder / name), True)
    return folder / name


def _run(capfd, root: Path, *extra: str, model: Path | None = None) -> tuple[int, str, str]:
    argv = ["--input", str(root / "input"), "--output", str(root / "output"), "--device", "cpu",
            "--batch-size", "4", *extra]
    if model is not None:
        argv += ["--model", str(model)]
    rc = inference.run(argv)
    out, err = capfd.readouterr()
    return rc, out, err


def _valid(root: Path, image: Path) -> int:
    shape, geometry = input_info(image)
    assert check_outputs(root / "output", shape, geometry) == []
    return json.loads((root / "output" / FRAME_JSON).read_text())


def test_small_simulated_case_contract_extras_and_stale_outputs(tmp_path, capfd, small_model, monkeypatch):
    image = _case(tmp_path, _sim_stack())
    seg = tmp_path / "output" / SEG
    seg.mkdir(parents=True)
    (seg / "output.mha").write_text("stale")  # leftovers of an earlier run are replaced/removed
    (seg / "old-result.mha").write_text("stale")
    (seg / "old-folder").mkdir()  # the socket's folder must hold one entry, the output
    (seg / "old-folder" / "x.mha").write_text("stale")
    (tmp_path / "output" / FRAME_JSON).write_text("3.0")
    monkeypatch.setenv("FETALIQA_EXTRAS", "1")
    rc, out, err = _run(capfd, tmp_path, model=small_model)
    assert rc == 0, err
    frame = _valid(tmp_path, image)
    assert 0 <= frame < 12 and f"frame {frame}" in out
    assert "removing stale" in err and "old-result.mha" in err
    assert sorted(p.name for p in seg.iterdir()) == ["output.mha"]
    for stage in ("setup", "read", "model_load", "analyse", "write", "total"):
        assert f" {stage} " in out.split("timings (s):")[1]
    assert "device cpu (" in out and "analysed on cpu, batch 4" in out
    assert "embedded default" not in out and "random weights, test fixture" in out
    extras = tmp_path / "output" / "extras"
    result = json.loads((extras / "result.json").read_text())
    assert result["frame"] == frame and len(result["scores"]) == 12 and len(result["good"]) == 12
    assert result["ac_mm"] is None or result["ac_mm"] > 0
    for png in ("quality-curve.png", "overlay.png"):
        assert (extras / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a later run into the same output without extras leaves none of these behind
    monkeypatch.delenv("FETALIQA_EXTRAS")
    rc, out, err = _run(capfd, tmp_path, model=small_model)
    assert rc == 0 and "removed an earlier run's extras" in out and not extras.exists(), err


def test_search_from_option_or_environment(tmp_path, capfd, small_model, monkeypatch):
    """--search, else FETALIQA_SEARCH (an image's ENV), else auto (a small model on the CPU:
    exhaustive); the log names the search that ran and how many frames it scored."""
    _case(tmp_path, _sim_stack())
    rc, out, err = _run(capfd, tmp_path, model=small_model)
    assert rc == 0, err
    assert "batch 4, exhaustive search (auto) (12 of 12 frames scored)" in out
    monkeypatch.setenv("FETALIQA_SEARCH", "fast")
    rc, out, err = _run(capfd, tmp_path, model=small_model)
    assert rc == 0 and "batch 4, fast search (" in out and " of 12 frames scored)" in out, err
    rc, out, err = _run(capfd, tmp_path, "--search", "exhaustive", model=small_model)
    assert rc == 0 and "exhaustive search (12 of 12 frames scored)" in out, err


def _rgb(a):
    return np.stack([a, a // 2, a // 3], axis=-1)


@pytest.mark.parametrize("kind", ["2d", "rgb", "uint16", "float", "odd-size"])
def test_unusual_inputs_are_processed_with_a_warning(tmp_path, capfd, small_model, kind):
    s = np.ascontiguousarray(_sim_stack()[4:6])
    array, vector, want = {
        "2d": (s[0], False, (1, 64, 80)),
        "rgb": (_rgb(s), True, (2, 64, 80)),
        "uint16": (s.astype(np.uint16) * 200, False, (2, 64, 80)),
        "float": (s.astype(np.float32) / 255, False, (2, 64, 80)),
        "odd-size": (np.ascontiguousarray(s[:, :50, :70]), False, (2, 50, 70)),
    }[kind]
    image = _case(tmp_path, array, vector=vector)
    rc, out, err = _run(capfd, tmp_path, model=small_model)
    assert rc == 0, err
    if kind != "odd-size":  # other sizes are simply processed; conversions say what they did
        assert "warning: case.mha:" in err and f"processed as uint8 {want}" in err
    # and every one of these is not the challenge's geometry, which is said with what it means
    n = want[0]
    assert f"warning: {n} frames of {want[1]}x{want[2]}, not the challenge's 840 of 562x744: " in err
    assert ("read as one sweep" in err) == (n % 6 != 0)
    frame = _valid(tmp_path, image)
    assert 0 <= frame < want[0]
    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "output" / SEG / "output.mha")))
    assert vol.shape == want and vol[frame].any()


def test_all_black_stack_gives_a_guess_not_minus_one_or_an_empty_mask(tmp_path, capfd, small_model):
    # the evaluator would score -1 / an empty mask against the last GT frame, Dice 0/0 = +inf
    image = _case(tmp_path, np.zeros((12, 32, 40), np.uint8))
    rc, out, err = _run(capfd, tmp_path, model=small_model)
    assert rc == 0, err
    assert "holds no signal" in err and "frame 1 and a central ellipse" in err
    assert _valid(tmp_path, image) == 1  # the middle of the first of 6 sweeps of 2 frames
    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "output" / SEG / "output.mha")))
    assert vol.shape == (12, 32, 40) and vol[1].sum() > 100 and not np.delete(vol, 1, axis=0).any()


def _broken_models(tmp: Path, good: Path) -> dict[str, Path]:
    no_weights = tmp / "no-weights"
    no_weights.mkdir()
    (no_weights / "model.json").write_text((good / "model.json").read_text())
    mismatched = tmp / "mismatched"
    mismatched.mkdir()
    meta = json.loads((good / "model.json").read_text())
    meta["config"]["decoder_width"] = 16  # weights were made with 32
    (mismatched / "model.json").write_text(json.dumps(meta))
    (mismatched / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    truncated = tmp / "truncated"
    truncated.mkdir()
    (truncated / "model.json").write_text((good / "model.json").read_text())
    (truncated / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    return {"no-weights": no_weights, "mismatched": mismatched, "truncated": truncated,
            "missing": tmp / "nowhere"}


@pytest.mark.parametrize("case, expect", [
    ("no-folder", "no input folder {input}/images/stacked-fetal-ultrasound"),
    ("no-file", "no input image in {input}/images/stacked-fetal-ultrasound"),
    ("two-files", "2 input images in {input}/images/stacked-fetal-ultrasound (a.mha, b.mha)"),
    ("truncated", "cannot read image {input}/images/stacked-fetal-ultrasound/a.mha"),
    ("not-an-image", "cannot read image {input}/images/stacked-fetal-ultrasound/a.mha"),
    ("model-no-weights", "model folder {tmp}/no-weights lacks model.safetensors"),
    ("model-missing", "model folder {tmp}/nowhere does not exist"),
    ("model-mismatched", "cannot load the model in {tmp}/mismatched"),
    ("model-truncated", "cannot load the model in {tmp}/truncated"),
    ("output-unwritable", "cannot write to output folder {tmp}/output"),
    ("bad-search", "unknown --search 'nonsense' (available: auto, exhaustive, fast"),
    ("bad-search-env", "unknown FETALIQA_SEARCH 'nonsense' (available: auto, exhaustive, fast"),
])
def test_bad_input_exits_non_zero_with_one_line(tmp_path, capfd, monkeypatch, small_model, case, expect):
    folder = tmp_path / "input" / "images" / "stacked-fetal-ultrasound"
    model = small_model
    if case != "no-folder":
        folder.mkdir(parents=True)
    if case.startswith("bad-search") or case in ("two-files", "truncated", "not-an-image") or \
            case.startswith(("model", "output")):
        _case(tmp_path, _sim_stack(), name="a.mha")
    if case == "two-files":
        _case(tmp_path, _sim_stack(), name="b.mha")
    if case == "truncated":
        (folder / "a.mha").write_bytes((folder / "a.mha").read_bytes()[:600])
    if case == "not-an-image":
        (folder / "a.mha").write_text("ObjectType = Image\nNDims = 3\n")
    if case.startswith("model-"):
        model = _broken_models(tmp_path, small_model)[case[len("model-"):]]
    if case == "output-unwritable":
        (tmp_path / "output").write_text("a file where the output folder should be")
    if case == "bad-search-env":
        monkeypatch.setenv("FETALIQA_SEARCH", "nonsense")
    rc, out, err = _run(capfd, tmp_path, *(["--search", "nonsense"] if case == "bad-search" else []),
                        model=model)
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fetaliqa: error: ")
    assert expect.format(input=tmp_path / "input", tmp=tmp_path) in lines[0]
    assert not (tmp_path / "output" / FRAME_JSON).exists()
    assert not (tmp_path / "output" / SEG).exists() or not any((tmp_path / "output" / SEG).iterdir())


def test_conversion_warnings_reach_stderr_of_a_real_process(tmp_path, small_model):
    # fd 2 is silenced while ITK reads; in-process tests cannot see that (pytest swaps sys.stderr)
    _case(tmp_path, np.ascontiguousarray(_sim_stack()[:6]).astype(np.uint16) * 200)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, str(REPO / "inference.py"), "--input", str(tmp_path / "input"),
                        "--output", str(tmp_path / "output"), "--model", str(small_model)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "fetaliqa: warning: case.mha: uint16 pixels converted to 8-bit" in r.stderr


def test_cli_error_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, str(REPO / "inference.py"), "--input", str(tmp_path / "x"),
                        "--output", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [f"fetaliqa: error: no input folder {tmp_path}/x/images/"
                                     "stacked-fetal-ultrasound (expected one *.mha or *.tif(f) stack there)"]
    r = subprocess.run(r.args, capture_output=True, text=True, timeout=120,
                       env={**env, "FETALIQA_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "UserError: no input folder" in r.stderr


def test_input_located_through_optional_inputs_json(tmp_path, capfd):
    root = tmp_path / "input"
    other = root / "somewhere"
    other.mkdir(parents=True)
    (other / "x.tiff").write_bytes(b"")
    (root / "inputs.json").write_text(json.dumps([
        {"interface": {"slug": "fetal-abdomen-frame-number", "relative_path": "nope"}},
        {"interface": {"slug": "stacked-fetal-ultrasound", "kind": "Image",
                       "relative_path": "somewhere"}, "image": {"name": "x.tiff"}}]))
    assert inference.locate_input_image(input_root=root) == other / "x.tiff"
    default = root / "images" / "stacked-fetal-ultrasound"
    default.mkdir(parents=True)
    (default / "y.mha").write_bytes(b"")
    (default / ".y.mha.swp").write_bytes(b"")  # hidden files are not inputs
    (root / "inputs.json").write_text("{not json")
    inference._setup_logging(False)
    assert inference.locate_input_image(input_root=root) == default / "y.mha"
    assert "ignoring unreadable" in capfd.readouterr().err
    # a relative path that is not a folder name, or names no folder: the default folder, said so
    for rel, why in ((5, "not a folder name"), ("images/nope", "no such folder")):
        (root / "inputs.json").write_text(json.dumps([{"interface": {"slug": "stacked-fetal-ultrasound",
                                                                     "relative_path": rel}}]))
        assert inference.locate_input_image(input_root=root) == default / "y.mha"
        assert why in capfd.readouterr().err
    (root / "inputs.json").unlink()
    assert inference.locate_input_image(input_root=root) == default / "y.mha"


def test_platform_model_wins_broken_upload_refused_default_otherwise(tmp_path, small_model, monkeypatch):
    import shutil

    platform, resources = tmp_path / "opt-ml-model", tmp_path / "resources"
    monkeypatch.setattr(inference, "MODEL_PATH", platform)
    monkeypatch.setattr(inference, "RESOURCE_PATH", resources)
    with pytest.raises(inference.UserError, match="no model: .* embedded default"):
        inference.resolve_model_dir(None)
    shutil.copytree(small_model, resources / "model")
    platform.mkdir()  # empty, as when no tarball was uploaded
    assert inference.resolve_model_dir(None) == (resources / "model", "embedded default")
    shutil.copytree(small_model, platform / "model")  # tarball made without -C
    assert inference.resolve_model_dir(None) == (platform / "model", "uploaded model tarball")
    (platform / "model" / "model.safetensors").unlink()
    with pytest.raises(inference.UserError, match="opt-ml-model/model lacks model.safetensors"):
        inference.resolve_model_dir(None)  # never silently replace an uploaded model
    shutil.rmtree(platform / "model")
    for f in small_model.iterdir():
        shutil.copy(f, platform)
    assert inference.resolve_model_dir(None) == (platform, "uploaded model tarball")


def test_int8_run_and_automatic_batch_size(tmp_path, capfd, small_model):
    """--int8 quantises the encoder on the CPU and keeps the contract; without --batch-size the
    batch is 16 for small models and 4 on the CPU for FetalCLIP-width encoders."""
    image = _case(tmp_path, _sim_stack())
    rc, out, err = inference.run(["--input", str(tmp_path / "input"), "--output", str(tmp_path / "output"),
                                  "--device", "cpu", "--int8", "--model", str(small_model)]), *capfd.readouterr()
    assert rc == 0, err
    assert 0 <= _valid(tmp_path, image) < 12
    assert "int8 dynamic quantisation" in out and "batch 16" in out

    class Wide:
        config = ModelConfig(backbone="FetalCLIP")
    assert inference.default_batch_size(Wide(), "cpu") == 4 and inference.default_batch_size(Wide(), "cuda") == 16
    assert inference.quantize_for_cpu(Wide, "cuda") is Wide and "for the CPU" in capfd.readouterr().err


def test_cuda_out_of_memory_halves_the_batch_then_falls_back_to_cpu():
    calls = []

    def analyse(stack, model, *, device, batch_size, amp, **kw):
        calls.append((device, batch_size, amp))
        if device.startswith("cuda") and batch_size > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "analysis"

    model = torch.nn.Linear(2, 2)
    limit = 4
    assert inference.analyse_with_fallback(None, model, device="cuda", batch_size=16, amp=True,
                                           analyse=analyse) == ("analysis", "cuda", 4)
    assert calls == [("cuda", 16, True), ("cuda", 8, True), ("cuda", 4, True)]
    calls.clear()
    limit = 0  # not even one frame fits
    assert inference.analyse_with_fallback(None, model, device="cuda:0", batch_size=2, amp=True,
                                           analyse=analyse) == ("analysis", "cpu", 2)
    assert calls == [("cuda:0", 2, True), ("cuda:0", 1, True), ("cpu", 2, False)]
    with pytest.raises(torch.cuda.OutOfMemoryError):  # an OOM on the CPU path is not retried
        inference.analyse_with_fallback(None, model, device="cpu", batch_size=2, amp=False,
                                        analyse=lambda *a, **k: (_ for _ in ()).throw(
                                            torch.cuda.OutOfMemoryError("x")))


def test_contract_kept_when_the_pipeline_returns_no_frame_or_an_empty_mask():
    stack = np.zeros((3, 40, 50), np.uint8)
    stack[:, 10:30, 10:40] = 100
    stack[2, 10:30, 10:40] = 200
    none = SimpleNamespace(frame=-1, mask=np.zeros((40, 50), np.uint8),
                           scores=np.array([np.nan, 0.2, 0.1], np.float32))
    frame, mask = inference.checked_result(none, stack)
    assert frame == 1 and mask.any() and not mask[stack[1] == 0].any()
    none.scores = np.full(3, np.nan, np.float32)  # nothing scored: the frame with most signal
    assert inference.checked_result(none, stack)[0] == 2
    empty = SimpleNamespace(frame=np.int64(0), mask=np.zeros((40, 50), bool), scores=None)
    frame, mask = inference.checked_result(empty, stack)
    assert type(frame) is int and frame == 0 and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    with pytest.raises(RuntimeError, match="frame 3"):
        inference.checked_result(SimpleNamespace(frame=3, mask=mask, scores=None), stack)


def test_sample_inputs_json_names_the_platform_socket():
    entries = json.loads((REPO / "test" / "sample" / "inputs.json").read_text())
    (entry,) = [e for e in entries if e["interface"]["slug"] == "stacked-fetal-ultrasound"]
    assert entry["interface"]["relative_path"] == "images/stacked-fetal-ultrasound"
    assert entry["image"]["name"].endswith(".mha")
    fp = json.loads((REPO / "test" / "sample" / "input.fingerprint.json").read_text())
    assert len(fp["sha256"]) == 64 and fp["shape"] == [840, 562, 744] and len(fp["frame_sums"]) == 840


def test_sample_checksum_mismatch_fails_unless_no_check(tmp_path, monkeypatch):
    """Pixels that differ from the committed checksum (a simulator change, or numpy/SciPy/OpenCV
    other than the pinned ones) stop make_sample and write nothing; --no-check writes the case
    with a warning (a GPU host with its own library versions still gets an input)."""
    sys.path.insert(0, str(REPO / "test" / "sample"))
    import make_sample
    import fetaliqa.simulate as sim

    small = sim.simulate_case(make_sample.SEED, sim.SimConfig(frames_per_sweep=2))
    monkeypatch.setattr(sim, "simulate_case", lambda seed: small)
    other = small.stack.copy()
    other[0, 100:110, 300:310] = 255 - other[0, 100:110, 300:310]  # a real change in one frame
    wrong = tmp_path / "input.fingerprint.json"
    wrong.write_text(json.dumps(make_sample.fingerprint(other)))
    monkeypatch.setattr(make_sample, "CHECKSUM", wrong)
    out = tmp_path / "input"
    image = out / "images" / "stacked-fetal-ultrasound" / make_sample.image_name()
    assert make_sample.main(["--out", str(out)]) == 1 and not image.exists()
    assert make_sample.main(["--out", str(out), "--no-check"]) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(image))), small.stack)
    assert (out / "inputs.json").is_file() and json.loads(wrong.read_text()) == make_sample.fingerprint(other)


def test_sample_check_accepts_rounding_not_changes():
    """The committed sample is the committed sample on any CPU: a few pixels one grey level
    apart (numpy's AVX-512 maths rounds differently) pass the frame-sum check with a note;
    a changed frame, another shape or no fingerprint fail, saying what differs."""
    sys.path.insert(0, str(REPO / "test" / "sample"))
    import make_sample

    rng = np.random.default_rng(0)
    stack = rng.integers(0, 200, (6, 40, 50), dtype=np.uint8)
    want = make_sample.fingerprint(stack)
    assert make_sample.check(make_sample.fingerprint(stack.copy()), want) == (True, "checksum ok")
    rounded = stack.copy()
    rounded[1, :3, 0] += 1  # 145 such pixels in 351 million on an AVX-512 host, at most 2 per frame sum
    rounded[4, 7, 9] -= 1
    ok, what = make_sample.check(make_sample.fingerprint(rounded), want)
    assert ok and "2 frames differ, by at most 3 grey levels" in what
    changed = stack.copy()
    changed[2, 10:20, 10:20] += 1  # 100 grey levels in one frame: beyond rounding
    ok, what = make_sample.check(make_sample.fingerprint(changed), want)
    assert not ok and "1 frame sums differ, by up to 100" in what and "first in frame 2" in what
    ok, what = make_sample.check(make_sample.fingerprint(stack[:5]), want)
    assert not ok and "(5, 40, 50) instead of uint8 (6, 40, 50)" in what
    assert make_sample.check(want, None)[0] is False


@pytest.mark.slow
def test_full_size_sample_case_end_to_end(tmp_path, small_model):
    """The sample case (840x562x744, regenerated and checksum-verified when missing) through
    the real CLI with the embedded default model (a random small model until it exists):
    both outputs validated against the contract, and against test/sample/expected/ when
    those exist and the embedded default ran."""
    sys.path.insert(0, str(REPO / "test" / "sample"))
    import make_sample
    from compare_outputs import compare
    from fetaliqa.model import is_exported_model

    sample = REPO / "test" / "sample" / "input"
    assert make_sample.main(["--out", str(sample)]) == 0
    image = sample / "images" / "stacked-fetal-ultrasound" / make_sample.image_name()
    default = is_exported_model(REPO / "resources" / "model")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(REPO / "inference.py"), "--input", str(sample),
                        "--output", str(tmp_path / "output"),
                        *([] if default else ["--model", str(small_model)])],
                       capture_output=True, text=True, env=env, timeout=3600)
    print(f"\nfull-size case: {time.perf_counter() - t:.1f} s\n{r.stdout}{r.stderr[-2000:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("(embedded default)" in r.stdout) == default
    frame = _valid(tmp_path, image)
    assert 0 <= frame < 840
    written = sitk.ReadImage(str(tmp_path / "output" / SEG / "output.mha"))  # the view needs it alive
    vol = sitk.GetArrayViewFromImage(written)
    assert vol.shape == (840, 562, 744) and vol[frame].any()
    expected = REPO / "test" / "sample" / "expected"
    if default and (expected / FRAME_JSON).is_file():
        problems, summary = compare(tmp_path / "output", expected, min_dice=0.95)
        assert problems == [], problems
        print(f"against expected: {summary}")

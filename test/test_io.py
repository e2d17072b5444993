"""fetaliqa.io: stack reading with conversions, atomic compressed mask/JSON writing."""
from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import SimpleITK as sitk

from fetaliqa import io as fio


def _write(path, array, vector=False, spacing=None, origin=None, compress=True):
    img = sitk.GetImageFromArray(array, isVector=vector)
    if spacing:
        img.SetSpacing(spacing)
    if origin:
        img.SetOrigin(origin)
    sitk.WriteImage(img, str(path), compress)
    return path


def _stack(frames=4, rows=10, cols=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (frames, rows, cols), dtype=np.uint8)


def test_uint8_stack_read_without_copy_and_outlives_its_image(tmp_path):
    a = _stack()
    stack, image = fio.read_stack(_write(tmp_path / "a.mha", a, spacing=(0.28, 0.28, 1.0)))
    assert stack.dtype == np.uint8 and stack.shape == (4, 10, 12)
    assert image.GetSpacing() == pytest.approx((0.28, 0.28, 1.0))
    # the array views the image's buffer (no copy) ...
    assert stack.ctypes.data == sitk.GetArrayViewFromImage(image).ctypes.data
    del image
    gc.collect()
    _ = [np.full((1000, 1000), 7, np.uint8) for _ in range(5)]  # reuse freed memory if dangling
    np.testing.assert_array_equal(stack, a)  # ... and keeps it alive
    stack[0, 0, 0] = 3  # writable, so torch.from_numpy does not warn


@pytest.mark.parametrize("how", ["2d", "rgb", "rgba", "uint16-small", "uint16-large", "float01", "float-nan",
                                 "float-overshoot", "float-inf"])
def test_conversions_warn_and_give_uint8_gray(tmp_path, how):
    a = _stack(frames=2)
    if how == "2d":
        src, want = a[0], a[:1]
    elif how == "rgb":
        src = np.zeros((2, 10, 12, 3), np.uint8)
        src[..., 0] = 255  # pure red -> luma 0.299 * 255 = 76.2
        want = np.full((2, 10, 12), 76, np.uint8)
    elif how == "rgba":
        src = np.stack([a, a, a, np.full_like(a, 255)], axis=-1)
        want = a  # luma of gray (r = g = b) is the gray value; alpha ignored
    elif how == "uint16-small":
        src, want = a.astype(np.uint16), a  # already within 0..255: kept exactly
    elif how == "uint16-large":
        src = np.array([[[0, 500, 1000]]], np.uint16)
        want = np.array([[[0, 128, 255]]], np.uint8)  # 0..1000 -> 0..255, 127.5 rounds to even 128
    elif how == "float01":
        src = np.array([[[0.0, 0.5, 1.0]]], np.float32)
        want = np.array([[[0, 128, 255]]], np.uint8)
    elif how == "float-overshoot":  # normalised, resampling overshoot past 1: not "already 0..255" (black)
        src = np.array([[[0.0, 0.51, 1.02]]], np.float32)
        want = np.array([[[0, 128, 255]]], np.uint8)
    elif how == "float-inf":  # one inf pixel does not set the scale (255 / inf would blacken all)
        src = np.array([[[0.0, 500.0, 1000.0, np.inf, -np.inf]]], np.float32)
        want = np.array([[[0, 128, 255, 255, 0]]], np.uint8)
    else:
        src = np.array([[[np.nan, 100.0, 200.0]]], np.float32)
        want = np.array([[[0, 100, 200]]], np.uint8)
    path = _write(tmp_path / "x.mha", src, vector=how in ("rgb", "rgba"))
    with pytest.warns(fio.InputConversionWarning, match="x.mha") as rec:
        stack, image = fio.read_stack(path)
    assert stack.dtype == np.uint8
    np.testing.assert_array_equal(stack, want)
    msg = str(rec[0].message)
    assert ("2D" in msg) == (how == "2d") and ("gray" in msg) == how.startswith("rgb")


def test_uint8_gray_stack_does_not_warn(tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fio.read_stack(_write(tmp_path / "a.mha", _stack()))


def test_unreadable_inputs_raise_clear_errors(tmp_path):
    good = _write(tmp_path / "a.mha", _stack(), compress=False)
    truncated = tmp_path / "t.mha"
    truncated.write_bytes(good.read_bytes()[:300])
    junk = tmp_path / "j.mha"
    junk.write_text("not an image")
    for path in (truncated, junk, tmp_path / "missing.mha"):
        with pytest.raises(ValueError, match=f"cannot read image {path}"):
            fio.read_stack(path)
    four_d = sitk.Image([3, 3, 3, 2], sitk.sitkUInt8)
    sitk.WriteImage(four_d, str(tmp_path / "4d.mha"))
    with pytest.raises(ValueError, match="4 dimensions"):
        fio.read_stack(tmp_path / "4d.mha")


def test_mask_volume_round_trip_geometry_and_compression(tmp_path):
    ref = sitk.GetImageFromArray(_stack(frames=5, rows=20, cols=30))
    ref.SetSpacing((0.28, 0.3, 2.0))
    ref.SetOrigin((1.0, 2.0, 3.0))
    ref.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    vol = np.zeros((5, 20, 30), np.uint8)
    vol[2, 5:15, 10:20] = 1
    out = tmp_path / "output.mha"
    fio.write_mask_volume(out, vol.astype(bool), ref)  # bool is accepted and stored as uint8
    back = sitk.ReadImage(str(out))
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(fio.read_mask_volume(out), vol)
    for what in ("Spacing", "Origin", "Direction"):
        assert getattr(back, f"Get{what}")() == pytest.approx(getattr(ref, f"Get{what}")())
    assert b"CompressedData = True" in out.read_bytes()[:1000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output.mha"]


def test_mask_volume_from_2d_reference_is_one_frame(tmp_path):
    ref = sitk.GetImageFromArray(_stack(frames=1)[0])
    ref.SetSpacing((0.28, 0.28))
    vol = np.zeros((1, 10, 12), np.uint8)
    vol[0, 2:5, 2:5] = 1
    fio.write_mask_volume(tmp_path / "o.mha", vol, ref)
    back = sitk.ReadImage(str(tmp_path / "o.mha"))
    assert back.GetDimension() == 3 and back.GetSpacing() == pytest.approx((0.28, 0.28, 1.0))


@pytest.mark.parametrize("bad, match", [
    (np.full((4, 10, 12), 2, np.uint8), "only 0 and 1"),
    (np.zeros((10, 12), np.uint8), "must be 3D"),
    (np.zeros((3, 10, 12), np.uint8), r"shape \(3, 10, 12\)"),
    (np.zeros((4, 10, 12), np.float32), "integer/bool"),
])
def test_mask_volume_refuses_what_crashes_the_evaluator(tmp_path, bad, match):
    ref = sitk.GetImageFromArray(_stack())
    with pytest.raises(ValueError, match=match):
        fio.write_mask_volume(tmp_path / "o.mha", bad, ref)
    assert list(tmp_path.iterdir()) == []


def test_failed_writes_keep_the_previous_file_and_leave_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "f.json"
    fio.write_json(out, 12)
    assert json.loads(out.read_text()) == 12 and type(json.loads(out.read_text())) is int
    with pytest.raises(TypeError):
        fio.write_json(out, np.int64(5))  # numpy ints are not JSON: caller must int() them
    with pytest.raises(ValueError):
        fio.write_json(out, float("nan"))
    ref = sitk.GetImageFromArray(_stack())
    mha = tmp_path / "output.mha"
    fio.write_mask_volume(mha, np.zeros((4, 10, 12), np.uint8), ref)
    before = mha.read_bytes()

    def crash(image, path, *a):  # a writer that dies half-way through
        open(path, "wb").write(b"half")
        raise RuntimeError("disk full")
    monkeypatch.setattr(fio.sitk, "WriteImage", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        fio.write_mask_volume(mha, np.ones((4, 10, 12), np.uint8), ref)
    assert mha.read_bytes() == before and json.loads(out.read_text()) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "output.mha"]

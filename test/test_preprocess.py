"""Pad-to-square, resize, normalise and the inverse mapping back to the native grid."""

from __future__ import annotations

import numpy as np
import torch

from fetaliqa.model import ModelConfig
from fetaliqa.preprocess import (frames_to_model_input, iter_frame_batches, masks_to_square, normalize,
                                 pad_resize, square_to_native)


def _ellipse(rows, cols, cy, cx, ay, ax):
    y, x = np.mgrid[:rows, :cols]
    return (((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2 <= 1).astype(np.uint8)


def test_pad_resize_centres_and_keeps_range():
    f = torch.full((1, 562, 744), 200, dtype=torch.uint8)
    out = pad_resize(f, 224)
    assert out.shape == (1, 224, 224) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 255
    # 91 padded rows of 744 -> ~27.4 rows of 224 zero above and below; columns all filled
    assert out[0, :26].max() < 1 and out[0, -26:].max() < 1 and out[0, 29:195].min() > 199
    assert out[0, 112].min() > 199


def test_pad_resize_equals_resizing_the_padded_square():
    """The two-pass resize (columns on the frame's rows, then the padded rows) gives the values
    of one antialiased resize of the zero-padded square, bit for bit, for wide, tall and square
    frames, odd padding, up- and downsampling and both antialiased modes; other modes go the
    one-call way."""
    import torch.nn.functional as F
    from fetaliqa.preprocess import _pads
    g = torch.Generator().manual_seed(0)
    for shape, size in (((3, 562, 744), 224), ((2, 562, 744), 112), ((2, 101, 60), 224), ((2, 40, 40), 112),
                        ((1, 33, 70), 16)):
        f = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        for mode in ("bicubic", "bilinear", "nearest"):
            aa = mode != "nearest"
            want = F.interpolate(F.pad(f.float()[:, None], _pads(*shape[1:])), size=(size, size), mode=mode,
                                 antialias=aa, **({"align_corners": False} if aa else {}))[:, 0].clamp(0, 255)
            got = pad_resize(f, size, mode)
            assert torch.equal(got, want), (shape, size, mode, (got - want).abs().max())


def test_masks_to_square_same_for_uint8_and_wider_dtypes():
    """uint8 masks skip the float copy; the labels land where a float resize puts them."""
    g = torch.Generator().manual_seed(1)
    for shape, size in (((3, 562, 744), 112), ((2, 101, 60), 224), ((2, 33, 70), 16)):
        m = torch.randint(0, 3, shape, dtype=torch.uint8, generator=g)
        got = masks_to_square(m, size)
        assert got.dtype == torch.uint8 and got.shape == (shape[0], size, size)
        assert torch.equal(got.long(), masks_to_square(m.long(), size))
        assert torch.equal(masks_to_square(m.bool(), size), got.bool())


def test_normalize_is_clip_normalisation_gray_to_3():
    x = torch.tensor([[[0.0, 255.0]]])
    y = normalize(x)
    assert y.shape == (1, 3, 1, 2)
    assert torch.allclose(y[0, :, 0, 0], -torch.tensor([0.48145466, 0.4578275, 0.40821073])
                          / torch.tensor([0.26862954, 0.26130258, 0.27577711]))
    cfg = ModelConfig(backbone="fetalclip-small")
    assert frames_to_model_input(torch.zeros(2, 50, 60, dtype=torch.uint8), cfg).shape == (2, 3, 224, 224)


def test_mask_round_trip_dice():
    gt = _ellipse(562, 744, 300, 350, 110, 150)
    sq = masks_to_square(torch.from_numpy(gt)[None], 224)
    assert sq.dtype == torch.uint8 and set(sq.unique().tolist()) <= {0, 1}
    back = square_to_native(sq.float(), 562, 744)[0].numpy() > 0.5
    dice = 2 * (back & gt.astype(bool)).sum() / (back.sum() + gt.sum())
    assert dice >= 0.98, dice
    # a portrait frame (more rows than cols) pads columns instead
    gt2 = _ellipse(300, 200, 150, 100, 60, 40)
    back2 = square_to_native(masks_to_square(torch.from_numpy(gt2)[None]).float(), 300, 200)[0].numpy() > 0.5
    assert 2 * (back2 & gt2.astype(bool)).sum() / (back2.sum() + gt2.sum()) >= 0.98


def test_batches_stream_one_batch_at_a_time():
    stack = np.arange(10 * 4 * 5, dtype=np.uint8).reshape(10, 4, 5)
    got = list(iter_frame_batches(stack, [9, 0, 3, 4, 5], 2))
    assert [i for i, _ in got] == [[9, 0], [3, 4], [5]]
    assert all(b.dtype == torch.uint8 and b.shape[0] <= 2 for _, b in got)
    assert torch.equal(got[0][1][0], torch.from_numpy(stack[9]))

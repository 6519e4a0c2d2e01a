"""The overlays' drawing (dlserver/drawing.py, models/mask_rcnn/render.py and
fill_kernel.py, models/densepose/render.py) against references that are not the code
under test: OpenCV drawing in place on full frames (as the seed drew), and numpy
pasting, blending and morphology written out here."""

from __future__ import annotations

import importlib
import textwrap
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from support import triton_interpreted

from dlserver import drawing
from dlserver.registry import import_model_folder

ROOT = Path(__file__).resolve().parent.parent
# the model folders as the server imports them
render = importlib.import_module(
    f"{import_model_folder(ROOT / 'models' / 'mask_rcnn').__package__}.render")
dp_render = importlib.import_module(
    f"{import_model_folder(ROOT / 'models' / 'densepose').__package__}.render")

M = 28


def _boxes(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Integer boxes of every kind: inside, clipped by each edge, tiny, overlapping."""
    x0 = rng.integers(-12, w + 4, n)
    y0 = rng.integers(-12, h + 4, n)
    size = rng.integers(0, 45, (n, 2))
    return np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], 1)


@pytest.mark.parametrize("thickness", [1, 2, 3, 4, 5, 8, 20])
def test_outlines_equal_cv2_rectangle(thickness):
    """Each box's outline painted on a tensor equals cv2.rectangle drawn in place, the
    later box on top where they meet (rounded corners of thick lines included)."""
    h, w = 60, 90
    boxes = _boxes(np.random.default_rng(thickness), 25, h, w)
    want = np.zeros((h, w), np.int32)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        cv2.rectangle(want, (x0, y0), (x1, y1), i + 1, thickness)
    rects, rect_box, points, point_box = drawing.outlines(boxes, thickness)
    got = drawing.paint(h, w, rects, rect_box + 1, points, point_box + 1, "cpu")
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), want)


def test_paint_rectangles_and_points():
    h, w = 20, 30
    rects = np.array([[2, 3, 10, 8], [-5, -5, 3, 2], [25, 15, 40, 40], [9, 9, 8, 12]])
    points = np.array([[0, 0], [5, 5], [19, 29], [-1, 3], [3, 30]])
    want = np.zeros((h, w), np.int64)
    for v, (x0, y0, x1, y1) in zip((4, 7, 2, 9), rects.tolist()):
        if x1 >= x0:  # an empty rectangle paints nothing
            sub = want[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1]
            np.maximum(sub, v, out=sub)
    for v, (y, x) in zip((5, 1, 3, 8, 8), points.tolist()):
        if 0 <= y < h and 0 <= x < w:
            want[y, x] = max(want[y, x], v)
    got = drawing.paint(h, w, rects, [4, 7, 2, 9], points, [5, 1, 3, 8, 8], "cpu")
    np.testing.assert_array_equal(got.numpy(), want)
    assert not drawing.paint(h, w, np.zeros((0, 4)), [], np.zeros((0, 2)), [], "cpu").any()


def test_text_stamps_equal_put_text_in_place():
    """A label's cached stamp, painted at its origin, equals cv2.putText drawn there
    (clipped at every edge of the frame); overlapping text takes the larger coverage."""
    h, w = 50, 120
    labels = [("person .93", (3, 8)), ("car .5", (90, 30)), ("dog 1.00", (-10, 49)),
              ("traffic light .71", (40, 60)), ("cup .12", (20, 26))]
    want = np.zeros((h, w), np.uint8)
    points, values = [], []
    for text, (x, y) in labels:
        cv2.putText(want, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.35, 255,
                    lineType=cv2.LINE_AA)
        offsets, cover, tw, th = drawing.text_stamp(text, 0.35)
        assert (tw, th) == cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1)[0]
        points.append(offsets + [y, x])
        values.append(cover)
    got = drawing.paint(h, w, np.zeros((0, 4)), [], np.concatenate(points),
                        np.concatenate(values), "cpu").numpy()
    assert want.any()
    np.testing.assert_array_equal(got, want)
    # two labels over each other: the larger coverage
    a = drawing.text_stamp("person .93", 0.35)
    b = drawing.text_stamp("car .5", 0.35)
    both = drawing.paint(h, w, np.zeros((0, 4)), [], np.concatenate([a[0] + [20, 10],
                                                                    b[0] + [21, 12]]),
                         np.concatenate([a[1], b[1]]), "cpu").numpy()
    one = np.zeros((h, w), np.uint8)
    two = np.zeros((h, w), np.uint8)
    cv2.putText(one, "person .93", (10, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.35, 255,
                lineType=cv2.LINE_AA)
    cv2.putText(two, "car .5", (12, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.35, 255,
                lineType=cv2.LINE_AA)
    np.testing.assert_array_equal(both, np.maximum(one, two))


# --- Mask R-CNN's overlay against a numpy reference ----------------------------------------------

def _scene(seed: int = 0, h: int = 72, w: int = 160):
    """Masks and boxes in score order (overlapping, one crossing the frame's edge), with
    the labels' rows apart so that no two labels overlap."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(5, M, M, generator=g) ** 0.5
    boxes = torch.tensor([[4.6, 14.2, 60.3, 66.9], [30.1, 30.7, 90.5, 71.9],
                          [100.2, 40.4, 170.0, 80.0], [70.8, 52.3, 84.1, 60.0],
                          [120.0, 23.5, 150.5, 50.25]])
    scores = [0.97, 0.83, 0.5, 0.31, 0.08]
    names = ["person", "car", "dog", "cup", "traffic light"]
    rgb = torch.rand(h, w, 3, generator=g)
    return rgb, masks, boxes, scores, names


def _reference_paste(masks: np.ndarray, boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """detectron2's paste written out: pixel centres at i + 0.5 mapped into the box's
    M x M cells (centres at 0.5 .. M - 0.5), bilinear, zero outside the mask, float64."""
    out = np.zeros((len(masks), h, w))
    cells = np.arange(M)
    for k, (mask, (x0, y0, x1, y1)) in enumerate(zip(masks, boxes)):
        u = (np.arange(w) + 0.5 - x0) / (x1 - x0) * M - 0.5
        v = (np.arange(h) + 0.5 - y0) / (y1 - y0) * M - 0.5
        wx = np.maximum(0.0, 1.0 - np.abs(u[:, None] - cells[None]))
        wy = np.maximum(0.0, 1.0 - np.abs(v[:, None] - cells[None]))
        out[k] = np.clip(wy @ mask.astype(np.float64) @ wx.T, 0.0, 1.0)
    return out


def _reference_border(hard: np.ndarray, thickness: int) -> np.ndarray:
    """Dilation by thickness // 2 less erosion by the rest (square windows, the frame's
    outside taking no part), of each mask; their union."""
    grow, shrink = thickness // 2, thickness - thickness // 2
    h, w = hard.shape[1:]
    band = np.zeros((h, w), bool)
    for m in hard:
        up = np.pad(m, grow, constant_values=False)
        down = np.pad(m, shrink, constant_values=True)
        dil = np.zeros_like(m)
        ero = np.ones_like(m)
        for dy in range(2 * grow + 1):
            for dx in range(2 * grow + 1):
                dil |= up[dy:dy + h, dx:dx + w]
        for dy in range(2 * shrink + 1):
            for dx in range(2 * shrink + 1):
                ero &= down[dy:dy + h, dx:dx + w]
        band |= dil & ~ero
    return band


def _reference_overlay(rgb, masks, boxes, scores, names, o):
    """The seed's drawing in numpy and OpenCV: fills blended one after another, largest
    box first, colour by score rank; white borders; green boxes and label backgrounds
    and gray text drawn by OpenCV on frame-sized masks."""
    h, w = rgb.shape[:2]
    rgb, masks, boxes = rgb.numpy().astype(np.float64), masks.numpy(), boxes.numpy()
    mattes = _reference_paste(masks, boxes, h, w)
    hard = mattes >= 0.5
    if not o["soft_mattes"]:
        mattes = hard.astype(np.float64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = sorted(range(len(boxes)), key=lambda i: -area[i])
    colours = render.palette(len(boxes)).astype(np.float64)
    out = rgb.copy()
    for i in order:
        a = o["overlay_alpha"] * mattes[i][..., None]
        out = out * (1 - a) + a * colours[i]
    if o["show_mask_borders"]:
        out[_reference_border(hard, o["border_thickness"])] = 1.0
    green = np.zeros((h, w), np.uint8)
    text = np.zeros((h, w), np.uint8)
    for i in order:
        x0, y0, x1, y1 = (int(c) for c in boxes[i].tolist())
        if o["show_boxes"]:
            cv2.rectangle(green, (x0, y0), (x1, y1), 255, o["box_thickness"])
        if o["show_class_names"]:
            label = f"{names[i]} {scores[i]:0.2f}".replace(" 0.", " .")
            (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, o["font_scale"], 1)
            x, y = x0, y0 - 2
            cv2.rectangle(green, (x, y - int(1.3 * th)), (x + tw, y), 255, -1)
            cv2.putText(text, label, (x, y - int(0.3 * th)), cv2.FONT_HERSHEY_SIMPLEX,
                        o["font_scale"], 255, lineType=cv2.LINE_AA)
    out[green > 0] = np.array(render.GREEN) / 255.0
    cover = text[..., None] / 255.0
    out = out * (1 - cover) + cover * np.array(render.GRAY) / 255.0
    return out, mattes.max(0), hard, text


OPTIONS = {"soft_mattes": True, "overlay_alpha": 0.4, "show_mask_borders": True,
           "border_thickness": 1, "show_boxes": True, "show_class_names": True,
           "box_thickness": 1, "font_scale": 0.35}


@pytest.mark.parametrize("changes", [{}, {"soft_mattes": False, "border_thickness": 3,
                                          "box_thickness": 3, "overlay_alpha": 1.0},
                                     {"border_thickness": 2, "show_class_names": False},
                                     {"show_mask_borders": False, "show_boxes": False}])
def test_mask_rcnn_overlay_equals_reference(changes):
    o = {**OPTIONS, **changes}
    rgb, masks, boxes, scores, names = _scene()
    want, want_union, hard, text = _reference_overlay(rgb, masks, boxes, scores, names, o)
    # no pasted value sits within float32 rounding of the 0.5 threshold
    mattes = _reference_paste(masks.numpy(), boxes.numpy(), *rgb.shape[:2])
    assert np.abs(mattes - 0.5).min() > 1e-5
    if o["show_class_names"]:
        assert text.any()
    got, union = render.overlay(rgb, masks, boxes, scores, names, o)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(union.numpy(), want_union, rtol=0, atol=5e-6)  # float32 paste


def test_overlay_bands_equal_whole(monkeypatch):
    """The tensor path's bands of rows (bounded temporaries) change nothing."""
    rgb, masks, boxes, scores, names = _scene(1)
    whole = render.overlay(rgb, masks, boxes, scores, names, OPTIONS)
    monkeypatch.setattr(render, "BAND_ELEMENTS", 5 * 160 * 7)  # 5 masks, 7-row bands
    banded = render.overlay(rgb, masks, boxes, scores, names, OPTIONS)
    for a, b in zip(whole, banded):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fused_fill_kernel_in_the_triton_interpreter(tmp_path):
    """fill_kernel's Triton kernel, run on the CPU by Triton's interpreter (a process of
    its own: TRITON_INTERPRET must be set before triton is imported), against the numpy
    reference: fills, union matte and the hard-mask bit sets."""
    script = textwrap.dedent(f"""
        import importlib, sys, numpy as np, torch
        from pathlib import Path
        from dlserver.registry import import_model_folder
        pkg = import_model_folder(Path({str(ROOT / 'models' / 'mask_rcnn')!r})).__package__
        fill_kernel = importlib.import_module(pkg + ".fill_kernel")
        render = importlib.import_module(pkg + ".render")
        g = torch.Generator().manual_seed(0)
        masks = torch.rand(40, 28, 28, generator=g) ** 0.5
        xy = torch.rand(40, 2, generator=g) * torch.tensor([150.0, 70.0]) - 10
        wh = torch.rand(40, 2, generator=g) * 60 + 0.5
        boxes = torch.cat([xy, xy + wh], 1)
        rgb = torch.rand(72, 160, 3, generator=g)
        colours = torch.rand(40, 3, generator=g)
        out = {{}}
        for soft in (True, False):
            f, u, b = fill_kernel.launch(rgb, masks, boxes, colours, 0.6, soft, render.PER_WORD)
            out.update({{f"fill{{soft}}": f.numpy(), f"union{{soft}}": u.numpy(),
                         f"bits{{soft}}": b.numpy()}})
        np.savez(sys.argv[1], masks=masks.numpy(), boxes=boxes.numpy(), rgb=rgb.numpy(),
                 colours=colours.numpy(), **out)
    """)
    r = triton_interpreted(script, tmp_path / "kernel.npz")
    mattes = _reference_paste(r["masks"], r["boxes"], 72, 160)
    assert np.abs(mattes - 0.5).min() > 1e-5
    hard = mattes >= 0.5
    for soft in (True, False):
        m = mattes if soft else hard.astype(np.float64)
        want = r["rgb"].astype(np.float64)
        for k in range(len(m)):
            a = 0.6 * m[k][..., None]
            want = want * (1 - a) + a * r["colours"][k]
        np.testing.assert_allclose(r[f"fill{soft}"], want, rtol=0, atol=2e-6)
        np.testing.assert_allclose(r[f"union{soft}"], m.max(0), rtol=0, atol=5e-6)
        bits = r[f"bits{soft}"]
        assert bits.shape == (2, 72, 160)
        for k in range(len(m)):
            word, bit = divmod(k, render.PER_WORD)
            np.testing.assert_array_equal((bits[word] >> bit) & 1, hard[k])
        assert not (bits[1] >> (len(m) - render.PER_WORD)).any()  # unused bits clear


def _matte_scene(seed: int, k: int, h: int, w: int) -> tuple:
    """Masks and boxes of every kind for the union matte: inside, clipped by each edge,
    wholly outside the frame, tiny (under a pixel), overlapping."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(k, M, M, generator=g) ** 0.5
    xy = torch.rand(k, 2, generator=g) * torch.tensor([w + 40.0, h + 40.0]) - 30
    wh = torch.rand(k, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 0.02
    wh[: k // 8] = torch.rand(k // 8, 2, generator=g) * 0.9 + 0.02  # tiny
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[-1] = torch.tensor([w + 3.5, 10.0, w + 30.0, 40.0])  # beyond the right edge
    boxes[-2] = torch.tensor([5.0, -40.0, 50.0, -2.5])  # above the top edge
    return masks, boxes


def _union_tensors(masks, boxes, h, w, soft, rows=None):
    """render.union_matte's tensor path (CPU) into a fresh (H, W) zero frame."""
    union = torch.zeros(h, w)
    render.union_matte(union, masks, boxes, render.mask_support(boxes, M), soft, rows=rows)
    return union


def test_union_matte_tensor_path_equals_reference():
    """The matte mode's union on the tensor path: the max of the pasted mattes (numpy,
    float64), thresholded at 0.5 before the max for hard mattes; bands of rows written
    only where asked."""
    h, w = 72, 160
    masks, boxes = _matte_scene(5, 40, h, w)
    mattes = _reference_paste(masks.numpy(), boxes.numpy(), h, w)
    assert np.abs(mattes - 0.5).min() > 1e-5  # nothing within rounding of the threshold
    for soft in (True, False):
        want = (mattes if soft else (mattes >= 0.5).astype(np.float64)).max(0)
        got = _union_tensors(masks, boxes, h, w, soft)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=3e-6)  # float32 paste
        band = _union_tensors(masks, boxes, h, w, soft, rows=(20, 50))
        assert not band[:20].any() and not band[50:].any()
        np.testing.assert_array_equal(band[20:50].numpy(), got[20:50].numpy())


def test_union_matte_falls_back_to_tensors(monkeypatch):
    """A fused kernel that fails (Triton cannot compile for the GPU) costs a warning,
    not the matte: the band it may have scribbled on is rewritten by the tensor path,
    and later calls use tensors."""
    h, w = 72, 160
    masks = torch.rand(2, M, M, generator=torch.Generator().manual_seed(6))
    boxes = torch.tensor([[10.0, 10.0, 40.0, 30.0], [20.2, 5.5, 60.7, 50.1]])  # left part
    want = _union_tensors(masks, boxes, h, w, soft=True, rows=(20, 50))

    class Broken:
        @staticmethod
        def launch_union(union, masks, boxes, soft, rows):
            union[rows[0]:rows[1]] = 7.0  # a partial write before the failure
            raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(render, "_fused", lambda device, paste: Broken if render.FUSED else None)
    monkeypatch.setattr(render, "FUSED", True)
    union = torch.zeros(h, w)
    with pytest.warns(UserWarning, match="a fused kernel failed.*no kernel image"):
        render.union_matte(union, masks, boxes, render.mask_support(boxes, M), True,
                           rows=(20, 50))
    assert not render.FUSED
    assert want[20:50, 70:].sum() == 0 and want[20:50].any()
    np.testing.assert_array_equal(union.numpy(), want.numpy())


def test_fused_union_kernel_in_the_triton_interpreter(tmp_path):
    """fill_kernel's union kernel (the matte mode) on the CPU in Triton's interpreter,
    soft and hard, in bands of rows: against the numpy reference paste and the tensor
    path; and, exactly, pixel-aligned boxes of M pixels (each pixel centre on a cell
    centre) whose pasted values are the mask cells themselves, 0.5 included."""
    h, w = 72, 160
    script = textwrap.dedent(f"""
        import importlib, sys, numpy as np, torch
        from pathlib import Path
        from dlserver.registry import import_model_folder
        pkg = import_model_folder(Path({str(ROOT / 'models' / 'mask_rcnn')!r})).__package__
        fill_kernel = importlib.import_module(pkg + ".fill_kernel")
        data = np.load(sys.argv[1])
        masks, boxes = torch.from_numpy(data["masks"]), torch.from_numpy(data["boxes"])
        out = {{}}
        for soft in (True, False):
            union = torch.full(({h}, {w}), -1.0)
            for rows in ((0, 5), (5, 40), (40, 71)):  # row 71 left alone
                fill_kernel.launch_union(union, masks, boxes, soft, rows)
            out[f"union{{soft}}"] = union.numpy()
            exact = torch.zeros(9, 13)
            fill_kernel.launch_union(exact, torch.from_numpy(data["cells"]),
                                     torch.from_numpy(data["aligned"]), soft, (0, 9))
            out[f"exact{{soft}}"] = exact.numpy()
        none = torch.full((4, 8), -1.0)  # no detections: zeros
        fill_kernel.launch_union(none, masks[:0], boxes[:0], True, (0, 4))
        np.savez(sys.argv[2], none=none.numpy(), **out)
    """)
    masks, boxes = _matte_scene(7, 40, h, w)
    # M = 4 cells over 4-pixel boxes at whole pixels: pixel x samples cell x - x0 exactly
    rng = np.random.default_rng(7)
    cells = rng.choice(np.float32([0.0, 0.25, 0.5, 0.5, 0.75, 1.0]), (5, 4, 4))
    corners = np.array([[0, 0], [2, 3], [9, 5], [-2, -1], [11, 7]], np.float32)
    aligned = np.concatenate([corners, corners + 4], 1)
    src, dst = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(src, masks=masks.numpy(), boxes=boxes.numpy(), cells=cells, aligned=aligned)
    r = triton_interpreted(script, src, dst)
    assert not r["none"].any()
    mattes = _reference_paste(masks.numpy(), boxes.numpy(), h, w)
    assert np.abs(mattes - 0.5).min() > 1e-5  # nothing within rounding of the threshold
    for soft in (True, False):
        got = r[f"union{soft}"]
        assert (got[71] == -1.0).all()  # rows outside the bands untouched
        want = (mattes if soft else (mattes >= 0.5).astype(np.float64)).max(0)
        np.testing.assert_allclose(got[:71], want[:71], rtol=0, atol=3e-6)  # float32 paste
        tensors = _union_tensors(masks, boxes, h, w, soft).numpy()
        np.testing.assert_allclose(got[:71], tensors[:71], rtol=0, atol=2e-7)  # rounding order
        exact = np.zeros((9, 13), np.float32)
        for cell, (x0, y0, _, _) in zip(cells, aligned.astype(int).tolist()):
            v = cell if soft else (cell >= 0.5).astype(np.float32)
            for (y, x), value in np.ndenumerate(v):
                if 0 <= y0 + y < 9 and 0 <= x0 + x < 13:
                    exact[y0 + y, x0 + x] = max(exact[y0 + y, x0 + x], value)
        np.testing.assert_array_equal(r[f"exact{soft}"], exact)


# --- DensePose's box outlines ------------------------------------------------------------------

@pytest.mark.parametrize("thickness,by_person", [(2, False), (3, True), (1, True)])
def test_densepose_borders_equal_cv2(thickness, by_person):
    """Box outlines in the DensePose overlay: cv2.rectangle of the rounded box, the last
    row / column inside it, later people on top, blended by alpha, as the seed drew."""
    h, w = 40, 64
    rgb = np.random.default_rng(0).random((h, w, 3), dtype=np.float32)
    iuv = np.zeros((h, w, 3), np.float32)
    human = np.zeros((h, w), np.int64)
    boxes = np.array([[2.4, 3.6, 30.5, 20.2], [10.0, 10.0, 70.0, 39.6], [-3.0, 25.0, 8.0, 50.0]])
    opts = {"alpha": 0.5, "show_human_index": by_person, "show_uv": False,
            "show_grid": False, "show_border": True, "border_thickness": thickness}
    got = dp_render.overlay(rgb, iuv, human, boxes, opts)
    ids = np.zeros((h, w), np.int32)
    for i, b in enumerate(boxes):
        x0, y0, x1, y1 = (int(round(float(c))) for c in b)
        cv2.rectangle(ids, (x0, y0), (x1 - 1, y1 - 1), i + 1, thickness)
    colour = (dp_render.HUMAN_COLOURS[np.maximum(ids - 1, 0) % 64] if by_person
              else np.ones(3, np.float32))
    want = np.where(ids[..., None] > 0, rgb + (colour - rgb) * np.float32(0.5), rgb)
    assert (ids > 0).sum() > 100
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


# --- GPU ----------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_fused_overlay_equals_tensor_path():
    """On the GPU the fused kernel draws what the tensor path draws, on a 1080p frame
    with 100 objects: colours within float rounding, the same borders, boxes, labels."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    g = torch.Generator().manual_seed(3)
    h, w, k = 1080, 1920, 100
    xy = torch.rand(k, 2, generator=g) * torch.tensor([w, h]) - 50
    wh = torch.rand(k, 2, generator=g) * 500 + 1
    boxes = torch.cat([xy, xy + wh], 1).cuda()
    masks = (torch.rand(k, M, M, generator=g) ** 0.5).cuda()
    rgb = torch.rand(h, w, 3, generator=g).cuda()
    scores = torch.rand(k, generator=g).tolist()
    names = ["person"] * k
    fused = render.overlay(rgb, masks, boxes, scores, names, OPTIONS)
    assert render.FUSED, "the fused kernel failed on this GPU (overlay fell back to tensors)"
    render.FUSED = False
    try:
        tensors = render.overlay(rgb, masks, boxes, scores, names, OPTIONS)
    finally:
        render.FUSED = True
    diff = (fused[0] - tensors[0]).abs().amax(-1)
    # a pixel whose mask value rounds to the other side of 0.5 draws (or not) a border
    print(f"\nfused vs tensors: colour max diff {float(diff.max()):.2e}, pixels over 1e-5: "
          f"{int((diff > 1e-5).sum())}")
    # the kernel blends with fused multiply-adds: last-bit differences (measured on an
    # H200: median 6.0e-8, 3 pixels over 1e-5 where a border flipped)
    assert int((diff > 1e-5).sum()) <= 20 and float(diff.median()) <= 1.2e-7
    # both paths sample in float32 box coordinates, each within ~3e-6 of exact (CPU, against
    # float64); on an H200 they differed by up to 5.0e-6 (run 33)
    torch.testing.assert_close(fused[1], tensors[1], rtol=0, atol=8e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("soft", [True, False])
def test_cuda_fused_union_matte_equals_tensor_path(soft):
    """On the GPU the matte mode's fused union kernel makes what the tensor path makes, on
    a 1080p frame with 100 objects in the model's four bands of rows, without falling
    back (no warning, the kernel still enabled)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    h, w = 1080, 1920
    masks, boxes = _matte_scene(8, 100, h, w)
    masks, boxes = masks.cuda(), boxes.cuda()
    support = render.mask_support(boxes.cpu(), M)

    def union_in_bands():
        union = torch.zeros(h, w, device="cuda")
        for a in range(0, h, 270):
            render.union_matte(union, masks, boxes, support, soft, rows=(a, a + 270))
        return union

    assert render._fill_kernel() is not None, "triton could not be imported"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = union_in_bands()
    fell_back = [str(w.message) for w in caught if "fused" in str(w.message)]
    assert render.FUSED and not fell_back, f"the fused union kernel failed: {fell_back}"
    render.FUSED = False
    try:
        tensors = union_in_bands()
    finally:
        render.FUSED = True
    diff = (fused - tensors).abs()
    print(f"\nfused vs tensors (soft={soft}): max diff {float(diff.max()):.2e}, pixels "
          f"differing: {int((diff > 0).sum())}")
    if soft:  # float32 box coordinates, fused multiply-adds: up to 3.7e-6 on an H200 (run 33)
        torch.testing.assert_close(fused, tensors, rtol=0, atol=8e-6)
    else:  # a pixel whose value rounds to the other side of 0.5 flips
        assert int((diff > 0).sum()) <= 20

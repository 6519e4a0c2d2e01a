"""docs/images/make_model_pictures.py: it runs, its PNGs stay small and are the ones
committed in docs/images, and the depth maps it draws are the planted scene's (numpy
oracle from the scene's distances)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "images" / "make_model_pictures.py"
spec = importlib.util.spec_from_file_location("make_model_pictures", SCRIPT)
pictures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pictures)


def test_pictures_are_written_small_and_match_the_committed_ones(tmp_path) -> None:
    written = pictures.main(tmp_path)  # raises when the RAFT vectors aren't the plate's shift
    # the planted pass is gone again: the model module is shared with the tests that follow
    flow = importlib.import_module(
        f"{pictures.import_model_folder(pictures.ROOT / 'models' / 'raft').__package__}.flow")
    assert flow.flow_pairs is not pictures.translation_search_flow
    assert sorted(p.name for p in written) == sorted(
        p.name for p in SCRIPT.parent.glob("*.png") if p.name.startswith(("raft_", "depth_")))
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size < 150_000, path
        # pixels, not bytes: another CPU (float rounding of the resizes) or zlib build may
        # change a last bit or the compressed stream, never the picture
        made = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        committed = cv2.imread(str(SCRIPT.parent / path.name), cv2.IMREAD_UNCHANGED)
        assert made.shape == committed.shape and int(
            np.abs(made.astype(np.int16) - committed).max()) <= 1, (
            f"docs/images/{path.name} is not what the script makes now: run "
            f".venv/bin/python docs/images/make_model_pictures.py")


def test_depth_per_frame_and_per_sequence_are_the_scenes() -> None:
    _, per_frame, per_sequence, (low, high) = pictures.depth_maps()
    inverse = 1.0 / np.array(pictures.BOX_Z)
    wall = 1.0 / pictures.WALL_Z
    assert (low, high) == (np.float32(wall), np.float32(inverse.max()))
    for frame, box in enumerate(inverse):
        # per frame: every frame stretched on its own, the box 1 whatever its distance
        np.testing.assert_allclose(per_frame[frame][5, 5], 1.0, rtol=1e-6)
        np.testing.assert_allclose(per_frame[frame][-5, -5], 0.0, atol=1e-6)
        # per sequence: one mapping, wall → 0 and the nearest box → 1
        want = (box - wall) / (inverse.max() - wall)
        np.testing.assert_allclose(per_sequence[frame][5, 5], want, rtol=1e-5)
        np.testing.assert_allclose(per_sequence[frame][-5, -5], 0.0, atol=1e-6)

"""sureid.tracking against the real BoxMOT and OpenCV: MOTChallenge files, the HOG detector,
tracking a generated video (three coloured figures walking in their own lanes, their true boxes
as a MOT det file) through BoT-SORT, StrongSORT and Deep OC-SORT with SUREID embeddings and
without re-ID, BoxMOT's ``reid_model`` path, the outputs, the appearance-cost table and
``sureid track``."""

from __future__ import annotations

import os
import runpy
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("boxmot")

from sureid import SureidError  # noqa: E402
from sureid.encoder import SureidReIDEncoder  # noqa: E402
from sureid.tracking import (  # noqa: E402
    TRACKERS,
    HogPeopleDetector,
    appearance_cost,
    boxes_with_area,
    hog_rows,
    make_tracker,
    mode_names,
    person_boxes,
    read_frame,
    read_mot_detections,
    read_mot_tracks,
    track_video,
    tracker_label,
    write_mot_tracks,
)

# Tiny models gain nothing from intra-op threads; on a busy machine they cost many times more.
pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES, WIDTH, HEIGHT, FPS = 20, 320, 240, 10
FIGURE = (30, 64)  # width, height
# shirt colour (BGR), first left x, top y, pixels per frame: one lane each
FIGURES = (((40, 40, 220), 10, 20, 8), ((60, 200, 60), 280, 90, -8), ((220, 90, 40), 60, 165, 5))
SETTLED = 5  # frames a tracker gets to confirm its tracks before ids are checked


# --------------------------------------------------------------------------------------------
# A generated video and its detections
# --------------------------------------------------------------------------------------------


def figure_box(figure: int, index: int) -> list[float]:
    """x1, y1, x2, y2 of figure ``figure`` in frame ``index`` (0-based)."""
    _, x0, top, step = FIGURES[figure]
    left = x0 + step * index
    return [left, top, left + FIGURE[0], top + FIGURE[1]]


def draw_figure(frame: np.ndarray, box, shirt, index: int) -> None:
    """A person-like figure in ``box``: head, shirt, legs that swing as it walks."""
    x1, y1, x2, y2 = (int(v) for v in box)
    cx, w = (x1 + x2) // 2, x2 - x1
    cv2.circle(frame, (cx, y1 + 7), 7, (140, 170, 220), -1)
    cv2.rectangle(frame, (x1 + 3, y1 + 14), (x2 - 3, y1 + 38), shirt, -1)
    swing = 4 if index % 2 else -4
    for dx in (-w // 5 + swing, w // 5 - swing):
        cv2.rectangle(frame, (cx + dx - 3, y1 + 38), (cx + dx + 3, y2 - 1), (40, 40, 40), -1)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """(video path, det.txt path): an MJPG .avi of FRAMES frames on a textured background and
    the figures' true boxes (score 0.9), plus one box outside the frame in frame 6."""
    folder = tmp_path_factory.mktemp("scene")
    rng = np.random.default_rng(0)
    background = cv2.GaussianBlur(
        rng.integers(60, 200, (HEIGHT, WIDTH, 3), dtype=np.uint8), (7, 7), 0
    )
    video = folder / "scene.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT))
    lines = []
    for index in range(FRAMES):
        frame = background.copy()
        for figure, (shirt, *_rest) in enumerate(FIGURES):
            box = figure_box(figure, index)
            draw_figure(frame, box, shirt, index)
            lines.append(f"{index + 1},-1,{box[0]},{box[1]},{FIGURE[0]},{FIGURE[1]},0.9,-1,-1,-1")
        writer.write(frame)
    writer.release()
    lines.append(f"6,-1,{WIDTH + 10},10,30,60,0.8,-1,-1,-1")  # no area in the frame
    det = folder / "det.txt"
    det.write_text("\n".join(lines) + "\n")
    return video, det


@pytest.fixture(scope="module")
def encoder(model_dir):
    return SureidReIDEncoder(model_dir, device="cpu")


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


def ids_per_figure(tracks: np.ndarray) -> list[set[int]]:
    """For each figure, the ids of the tracks on it (IoU > 0.5) from frame SETTLED + 1 on;
    every figure must be covered in each of those frames."""
    found: list[set[int]] = [set() for _ in FIGURES]
    for index in range(SETTLED, FRAMES):
        rows = tracks[tracks[:, 0] == index + 1]
        for figure in range(len(FIGURES)):
            truth = figure_box(figure, index)
            overlaps = [iou(truth, row[2:6]) for row in rows]
            assert overlaps and max(overlaps) > 0.5, f"figure {figure} untracked in frame {index}"
            found[figure].add(int(rows[int(np.argmax(overlaps)), 1]))
    return found


def assert_one_id_each(tracks: np.ndarray) -> None:
    found = ids_per_figure(tracks)
    assert all(len(ids) == 1 for ids in found), found
    assert len(set.union(*found)) == len(FIGURES), found


# --------------------------------------------------------------------------------------------
# MOTChallenge files
# --------------------------------------------------------------------------------------------


def test_mot_tracks_round_trip(tmp_path):
    rows = np.array(
        [[2, 1, 10, 20, 40, 80, 0.9], [1, 2, 0.5, 1.25, 30.75, 61, 0.5], [1, 1, 5, 6, 7, 8, 1.0]]
    )
    path = write_mot_tracks(tmp_path / "tracks.txt", rows)
    lines = path.read_text().splitlines()
    assert lines[0] == "1,1,5.00,6.00,2.00,2.00,1.0000,-1,-1,-1"  # by frame, then id; w, h
    back = read_mot_tracks(path)
    order = np.lexsort((rows[:, 1], rows[:, 0]))
    np.testing.assert_allclose(back, rows[order], atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["tracks.txt"]  # no temporary file left
    if os.name != "nt":
        umask = os.umask(0)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    dets = read_mot_detections(path)
    assert sorted(dets) == [1, 2] and dets[1].dtype == np.float32 and dets[1].shape == (2, 5)
    np.testing.assert_allclose(dets[2], [[10, 20, 40, 80, 0.9]], atol=1e-6)
    empty = tmp_path / "empty.txt"
    write_mot_tracks(empty, np.zeros((0, 7)))
    assert empty.read_text() == "" and read_mot_detections(empty) == {}
    assert read_mot_tracks(empty).shape == (0, 7)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1,-1,10,20,30,abc,0.5", "not a number"),
        ("1,-1,10,20,30", "5 comma-separated column"),
        ("1,-1,10,nan,30,40,0.5", "NaN or infinite"),
        ("1,-1,10,20,-30,40,0.5", "negative width or height"),
        ("0,-1,10,20,30,40,0.5", "whole number >= 1"),
        ("1,-1,10,20,30,40,2.5", "outside \\[0, 1\\].*rescale"),
    ],
)
def test_bad_mot_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "det.txt"
    path.write_text(f"1,-1,1,2,3,4,0.5,-1,-1,-1\n\n{line}\n")
    with pytest.raises(SureidError, match=message) as caught:
        read_mot_detections(path)
    assert f"{path}:3:" in str(caught.value)


def test_missing_mot_file_and_bad_track_rows(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_mot_detections(tmp_path / "nope.txt")
    with pytest.raises(SureidError, match="add 1 to BoxMOT's 0-based"):
        write_mot_tracks(tmp_path / "t.txt", [[1, 0, 1, 2, 3, 4, 0.5]])
    with pytest.raises(SureidError, match=r"\[M, 7\]"):
        write_mot_tracks(tmp_path / "t.txt", [[1, 1, 1, 2]])
    assert not (tmp_path / "t.txt").exists()


# --------------------------------------------------------------------------------------------
# Detector, boxes
# --------------------------------------------------------------------------------------------


def test_hog_rows_map_margins_through_a_sigmoid_and_suppress_overlaps():
    rects = [[10, 10, 64, 128], [12, 12, 64, 128], [200, 10, 64, 128]]
    rows = hog_rows(rects, [0.0, 2.0, -1.0], nms_iou=0.4)
    assert rows.dtype == np.float32 and rows.shape == (2, 5)
    np.testing.assert_allclose(
        rows[:, 4], [1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(1.0))], rtol=1e-6
    )
    np.testing.assert_allclose(rows[0, :4], [12, 12, 76, 140])  # the better of the overlapping
    assert hog_rows([], []).shape == (0, 5)


def test_hog_detector_gives_scored_boxes(scene):
    detector = HogPeopleDetector()
    assert (detector.win_stride, detector.scale, detector.padding) == (8, 1.05, 8)
    rows = detector(read_frame(scene[0], 3))
    assert rows.dtype == np.float32 and rows.ndim == 2 and rows.shape[1] == 5
    assert ((rows[:, 4] >= 0) & (rows[:, 4] <= 1)).all()
    assert (rows[:, 2] > rows[:, 0]).all() and (rows[:, 3] > rows[:, 1]).all()
    assert detector(np.zeros((100, 50, 3), np.uint8)).shape == (0, 5)  # smaller than a window
    with pytest.raises(SureidError, match="uint8"):
        detector(np.zeros((240, 320, 3), np.float32))


def test_boxes_without_area_are_dropped_and_person_boxes_fit_the_frame():
    rows = np.array([[0, 0, 10, 10, 0.5], [330, 0, 340, 10, 0.5], [5, 5, 5, 9, 0.5]], np.float32)
    assert boxes_with_area(rows, 320, 240).tolist() == [[0, 0, 10, 10, 0.5]]
    boxes = person_boxes((576, 768, 3), 32)
    assert boxes.shape == (32, 4)
    assert np.allclose(boxes[:, 2] - boxes[:, 0], 65) and np.allclose(
        boxes[:, 3] - boxes[:, 1], 130
    )
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 768).all() and (boxes[:, 3] <= 576).all()
    small = person_boxes((100, 40, 3), 8)
    assert (small[:, 3] <= 100).all() and (small[:, 2] <= 40).all()


# --------------------------------------------------------------------------------------------
# Tracking
# --------------------------------------------------------------------------------------------


def run_scene(scene, encoder, tracker, tmp_path, **kwargs):
    video, det = scene
    modes = {"sureid": encoder, "no re-ID": None}
    return track_video(
        video, modes, detections=det, tracker=tracker, out_dir=tmp_path, progress=False, **kwargs
    )


@pytest.mark.parametrize(
    "tracker",
    [
        "botsort",
        pytest.param("strongsort", marks=pytest.mark.slow),
        pytest.param("deepocsort", marks=pytest.mark.slow),
    ],
)
def test_track_video_keeps_one_id_per_figure(scene, encoder, tracker, tmp_path):
    result = run_scene(scene, encoder, tracker, tmp_path)
    assert result.frames == FRAMES and result.written_mode == "sureid"
    assert result.dropped_boxes == 1 and result.boxes == [3] * FRAMES
    assert_one_id_each(result.tracks)  # with SUREID embeddings
    assert_one_id_each(np.asarray(result.modes["no re-ID"].rows))  # and without re-ID
    for run in result.modes.values():
        assert len(run.appearance_ms) == len(run.tracker_ms) == FRAMES
    assert result.modes["no re-ID"].tracker_label == tracker_label(tracker, False)
    assert max(result.modes["no re-ID"].appearance_ms) < 5  # nothing to embed
    # the written tracks are the first mode's, and the file holds them
    assert sorted(result.files) == ["tracks.png", "tracks.txt"]
    np.testing.assert_allclose(
        read_mot_tracks(tmp_path / "tracks.txt"),
        result.tracks[np.lexsort(result.tracks[:, :2].T[::-1])],
        atol=0.011,
    )
    from PIL import Image

    with Image.open(tmp_path / "tracks.png") as sheet:
        assert sheet.size[0] > 0 and sheet.size[1] >= 3 * 128  # a row per track, >= 3 tracks
    table = result.table()
    assert "| sureid (written) | " + tracker in table and "| no re-ID | " in table
    assert result.end_to_end_fps("sureid") > 0


def test_strongsort_without_reid_runs_on_constant_embeddings():
    assert tracker_label("strongsort", False).startswith("strongsort, constant embeddings")
    assert tracker_label("botsort", False) == "botsort, use_embeddings=False"
    assert tracker_label("deepocsort", True) == "deepocsort"
    with pytest.raises(SureidError, match="not one of"):
        make_tracker("sort")


def test_boxmot_reid_model_path_calls_the_encoder(scene, encoder):
    """BoxMOT's own appearance path: the encoder as ``reid_model``, plain [N, 6] detections;
    the tracker calls ``encoder.get_features`` on each frame with boxes."""
    calls = []

    class Counting(SureidReIDEncoder):
        def get_features(self, boxes, image):
            calls.append(len(boxes))
            return super().get_features(boxes, image)

    counting = Counting(encoder.model, device="cpu")
    tracker = make_tracker("botsort", reid_model=counting, frame_rate=FPS)
    dets = read_mot_detections(scene[1])
    capture = cv2.VideoCapture(str(scene[0]))
    rows = []
    for index in range(FRAMES):
        ok, frame = capture.read()
        assert ok
        found = boxes_with_area(dets[index + 1], WIDTH, HEIGHT)
        numpy_dets = np.column_stack([found, np.zeros(len(found), np.float32)])
        out = tracker.update(numpy_dets, frame)
        assert out.shape[1] == 8
        rows += [[index + 1, row[4] + 1, *row[:4], row[5]] for row in out.tolist()]
    capture.release()
    assert calls == [3] * FRAMES
    assert_one_id_each(np.asarray(rows))


def test_track_video_checks_its_inputs_before_running(scene, encoder, tmp_path):
    video, det = scene
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        track_video(video, {"s": encoder}, detections=det, out_dir=a_file, progress=False)
    with pytest.raises(FileNotFoundError, match="no such video"):
        track_video(tmp_path / "nope.avi", {"s": encoder}, detections=det, progress=False)
    with pytest.raises(SureidError, match="appearance is empty"):
        track_video(video, {}, detections=det, progress=False)
    with pytest.raises(SureidError, match="pass a SureidReIDEncoder"):
        track_video(video, {"s": "demo-sureid"}, detections=det, progress=False)
    with pytest.raises(SureidError, match=r"\[N, 5\] rows"):
        track_video(video, {"s": encoder}, detector=lambda f: np.ones((5, 4)), progress=False)
    with pytest.raises(SureidError, match=r"outside \[0, 1\]"):
        track_video(video, {"s": encoder}, detector=lambda f: [[1, 2, 30, 60, 3.0]], progress=False)
    result = track_video(video, {"s": encoder}, detections=det, max_frames=4, progress=False)
    assert result.frames == 4 and result.files == {}


def test_rows_given_per_frame_are_checked_as_the_detectors_are(scene, encoder):
    video, _ = scene
    run = partial(track_video, video, {"s": encoder}, max_frames=3, progress=False)
    box = [100.0, 20.0, 130.0, 84.0]
    with pytest.raises(SureidError, match=r"frame 1 of the detections .*\[N, 5\] rows"):
        run(detections={1: np.array([box])})  # no score column
    with pytest.raises(SureidError, match=r"frame 2 of the detections .*outside \[0, 1\]"):
        run(detections={2: [[*box, 7.5]]})
    with pytest.raises(SureidError, match="counted from 1"):
        run(detections={0: [[*box, 0.9]], 1: [[*box, 0.9]]})  # 0-based frames
    # an empty frame is a frame without people
    result = run(detections={1: [], 2: np.zeros((0, 5)), 3: [[*box, 0.9]]})
    assert result.boxes == [0, 0, 1]


def test_inverted_or_nan_boxes_from_a_detector_raise_instead_of_vanishing(scene, encoder):
    video, _ = scene
    run = partial(track_video, video, {"s": encoder}, max_frames=2, progress=False)
    with pytest.raises(SureidError, match=r"x2 < x1.*x2 = x \+ w"):
        run(detector=lambda f: np.array([[130.0, 20, 100, 84, 0.9]]))  # x, y, w, h by mistake?
    with pytest.raises(SureidError, match="NaN"):
        run(detector=lambda f: np.array([[np.nan, 20, 100, 84, 0.9]]))


def test_detections_past_the_end_of_the_video_are_reported(scene, encoder, caplog):
    video, _ = scene
    box = [100.0, 20.0, 130.0, 84.0, 0.9]
    with caplog.at_level("WARNING", logger="sureid.tracking"):
        result = track_video(
            video, {"s": encoder}, detections={1: [box], 30: [box], 31: [box]}, progress=False
        )
    assert result.frames == FRAMES
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "ended after 20 frames" in said and "2 frame(s) of boxes, 30 to 31" in said
    caplog.clear()
    with caplog.at_level("WARNING", logger="sureid.tracking"):  # stopped on purpose: no warning
        track_video(video, {"s": encoder}, detections={30: [box]}, max_frames=3, progress=False)
    assert not caplog.records


def test_the_callers_frame_rate_wins_and_image_sequences_are_videos(scene, encoder, tmp_path):
    video, det = scene
    capture = cv2.VideoCapture(str(video))
    for i in range(3):  # the first frames as a MOTChallenge-style image sequence
        ok, frame = capture.read()
        assert ok and cv2.imwrite(str(tmp_path / f"{i + 1:06d}.png"), frame)
    capture.release()
    pattern = tmp_path / "%06d.png"
    result = track_video(
        pattern, {"s": encoder}, detections=det, tracker_kwargs={"frame_rate": 25}, progress=False
    )
    assert result.frames == 3 and result.boxes == [3, 3, 3]
    assert result.modes["s"].tracker.buffer_size == 25  # BoT-SORT: track_buffer 30 x 25 / 30


def test_mode_names_keep_two_models_of_one_folder_name_apart(tmp_path):
    for parent in ("a", "b"):
        (tmp_path / parent / "student").mkdir(parents=True)
    models = [str(tmp_path / "a" / "student"), str(tmp_path / "b" / "student"), "demo-dense"]
    assert mode_names(models) == ["student", "student (2)", "demo-dense"]
    assert mode_names(["no re-ID"]) == ["no re-ID (1)"]


def test_hog_refuses_frames_it_cannot_read():
    with pytest.raises(SureidError, match="uint8 HxWx3 BGR"):
        HogPeopleDetector()(np.zeros((200, 200, 4), np.uint8))


# --------------------------------------------------------------------------------------------
# The appearance cost
# --------------------------------------------------------------------------------------------


def test_appearance_cost_has_a_row_per_encoder_and_a_column_per_box_count(encoder):
    frame = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    cost = appearance_cost(
        {"dense": encoder, "sureid": encoder, "no re-ID": None}, frame, repeats=1, warmup=0
    )
    assert [r.name for r in cost.rows] == ["dense", "sureid", "no re-ID"]
    assert cost.box_counts == (1, 8, 32) and cost.baseline == "dense"
    for row in cost.rows[:2]:
        assert all(row.ms[n] > 0 and row.speedup[n] > 0 for n in (1, 8, 32))
    assert cost.rows[0].speedup == {1: 1.0, 8: 1.0, 32: 1.0}
    assert cost.rows[2].speedup is None and cost.rows[2].ms == {1: 0.0, 8: 0.0, 32: 0.0}
    table = cost.table()
    assert "ms/frame, 32 boxes" in table and "speed-up vs dense (1 / 8 / 32 boxes)" in table
    assert "| no re-ID | - | 0 | 0 | 0 | n/a" in table
    with pytest.raises(SureidError, match="baseline"):
        appearance_cost({"a": encoder}, frame, baseline="b")


# --------------------------------------------------------------------------------------------
# sureid track, examples/track_video.py
# --------------------------------------------------------------------------------------------


def test_cli_tracker_choices_match_the_library():
    from sureid.cli import build_parser

    args = build_parser().parse_args(["track", "v.avi"])
    assert (args.model, args.compare, args.no_reid_baseline, args.tracker) == (
        "demo-sureid", [], True, "botsort"
    )  # fmt: skip
    assert (
        not build_parser()
        .parse_args(["track", "v.avi", "--without-no-reid-baseline"])
        .no_reid_baseline
    )
    for name in TRACKERS:
        assert build_parser().parse_args(["track", "v.avi", "--tracker", name]).tracker == name


def test_cli_user_errors_are_one_line(scene, model_dir, tmp_path, capsys):
    from sureid.cli import main

    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["track", str(scene[0]), "--model", str(model_dir), "--out", str(a_file)]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["track", str(tmp_path / "nope.avi"), "--model", str(model_dir)]) == 2
    assert "no such video" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_track_end_to_end(scene, model_dir, tmp_path, capsys):
    from sureid.cli import main

    video, det = scene
    out = tmp_path / "out"
    argv = ["track", str(video), "--model", str(model_dir), "--compare", str(model_dir),
            "--detections", str(det), "--out", str(out), "--cost-repeats", "1",
            "--device", "cpu", "--annotated-video"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    name = Path(model_dir).name
    assert f"speed-up vs {name} (2)" in printed  # the comparison is the baseline
    assert (
        f"| {name} (written) | botsort |" in printed
        and "| no re-ID | botsort, use_embeddings" in printed
    )
    assert_one_id_each(read_mot_tracks(out / "tracks.txt"))
    capture = cv2.VideoCapture(str(out / "tracks.avi"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    capture.release()
    assert (out / "tracks.png").stat().st_size > 0


@pytest.mark.slow
def test_example_tracks_with_the_hog_detector(scene, model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = [str(scene[0]), "--model", str(model_dir), "--compare", str(model_dir),
            "--out", str(out), "--max-frames", "6", "--device", "cpu"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["examples/track_video.py", *argv])
    runpy.run_path("examples/track_video.py", run_name="__main__")
    printed = capsys.readouterr().out
    assert "ms/frame, 1 box" in printed and "HOG people detector" in printed
    assert (out / "tracks.txt").is_file() and (out / "tracks.png").is_file()


@pytest.mark.slow
def test_boxmot_says_nothing_below_warnings_in_a_fresh_process():
    """BoxMOT configures its logger (INFO) when its trackers are first imported; the trackers
    SUREID makes say nothing below warnings even then."""
    import subprocess

    script = "from sureid.tracking import make_tracker; make_tracker('botsort', reid=False)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "BotSort:" not in done.stderr + done.stdout

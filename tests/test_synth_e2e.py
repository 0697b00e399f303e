"""The CLI end to end on the bundled photos: real MediaPipe, real degradations, real shards."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from collections import Counter

import cv2
import numpy as np
import pytest
import webdataset as wds

from haodiff_data.cli import main
from haodiff_data.intake.sources import ASSETS_DIR
from haodiff_data.shards.schema import decode_sample

from conftest import interrupt_after_shards

BASE = ["--no-progress", "--samples-per-shard", "2"]


def synth(out: Path, *extra: str) -> int:
    return main(["synth", "--out", str(out), *BASE, *extra])


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def samples_by_key(folder: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    assert synth(out, "-k", "2", "--limit", "6", "--workers", "1", "--seed", "7") == 0
    return out


def test_shards_read_back_with_plain_webdataset(reference_run):
    paths = sorted(str(p) for p in reference_run.glob("*.tar"))
    assert [Path(p).name for p in paths] == [f"haodiff-r000-{i:06d}.tar" for i in range(3)]
    samples = list(wds.WebDataset(paths, shardshuffle=False).decode("rgb8"))
    assert [s["__key__"] for s in samples] == [f"s{i:09d}" for i in range(6)]
    for s in samples:
        hq, lq = s["hq.png"], s["lq.png"]
        assert hq.shape == lq.shape == (512, 512, 3) and hq.dtype == np.uint8
        residual = s["residual.npy.gz"]  # webdataset's own .gz then .npy handlers
        assert residual.dtype == np.int16
        np.testing.assert_array_equal(residual, lq.astype(np.int16) - hq.astype(np.int16))
        meta = s["json"]
        assert meta["schema"] == 1 and meta["seed"] == 7 and meta["key"] == s["__key__"]
        assert meta["segmenter"]["name"] == "mediapipe"
        assert meta["first_order"] in ("none", "hmb", "generic")
        assert meta["source"]["sha256"] and len(meta["source"]["crop"]["box"]) == 4
    summary = json.loads((reference_run / "summary-r000.json").read_text())
    assert summary["samples_written"] == 6 and summary["samples_rejected"] == 0
    assert sum(summary["parameters"]["first_order"].values()) == 6
    # A worker holds the MediaPipe models and numpy images: its peak RSS is measured, not 0.
    assert 100 < summary["this_invocation"]["worker_peak_rss_mib"] < 4096
    assert "peak_rss_mib" not in summary["this_invocation"]["stage_ms_per_sample"]


def test_summary_counts_people_and_hmb_beside_the_recipe(reference_run, capsys):
    members = samples_by_key(reference_run)
    metas = [json.loads(m["json"]) for m in members.values()]
    seg = json.loads((reference_run / "summary-r000.json").read_text())["segmentation"]
    with_person = [m for m in metas if m["segmenter"]["person_found"]]
    hmb = [m for m in metas if m["first_order"] == "hmb"]
    assert seg["samples"] == 6 and seg["samples_with_person"] == len(with_person) > 0
    assert seg["hmb_samples"] == len(hmb) and seg["hmb_share"] == round(len(hmb) / 6, 4)
    assert seg["hmb_per_group"] == dict(sorted(Counter(m["hmb"]["group"] for m in hmb).items()))
    assert seg["recipe_p_hmb"] == pytest.approx(1 / 3, abs=1e-4) and seg["recipe_p_hmb_over"] == "person"
    for m, sample in zip(metas, members.values()):
        persons = cv2.imdecode(np.frombuffer(sample["persons.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        parts = cv2.imdecode(np.frombuffer(sample["parts.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        # Every labelled pixel belongs to exactly one person, ids 1..n with none missing.
        assert np.array_equal(persons > 0, parts > 0)
        assert set(np.unique(persons)) == set(range(m["segmenter"]["persons"] + 1))
        if m["first_order"] == "hmb":
            assert 1 <= m["hmb"]["person"] <= m["segmenter"]["persons"]
    assert main(["inspect", str(reference_run), "--out", str(reference_run / "look"), "--max-samples", "1"]) == 0


def test_shards_without_persons_read_as_one_person_and_replay(reference_run, tmp_path, capsys):
    members = samples_by_key(reference_run)
    metas = {k: json.loads(m["json"]) for k, m in members.items()}
    key = next(k for k, m in metas.items() if m["first_order"] == "hmb" and m["segmenter"]["persons"] == 1)
    # As written before person instances existed: no persons.png, no hmb.person.
    old = {k: v for k, v in members[key].items() if k != "persons.png"}
    meta = metas[key]
    del meta["hmb"]["person"]
    old["json"] = json.dumps(meta).encode()
    sample = decode_sample({"__key__": key, **old})
    assert sample.persons is None and np.array_equal(sample.person_map(), (sample.parts > 0).astype(np.uint8))
    with wds.TarWriter(str(tmp_path / "old.tar"), encoder=False) as tar:
        tar.write({"__key__": key, **old})
    assert main(["replay", str(tmp_path / "old.tar"), "--key", key]) == 0
    checks = json.loads(capsys.readouterr().out)["checks"]
    assert checks["lq"] == checks["mask"] == checks["params_from_seed"] == "identical"


def test_mask_is_hmb_weight_region_only_for_hmb(reference_run):
    for members in samples_by_key(reference_run).values():
        meta = json.loads(members["json"])
        mask = cv2.imdecode(np.frombuffer(members["mask.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 255}
        if meta["first_order"] != "hmb":
            assert not mask.any()


def test_worker_count_does_not_change_bytes(reference_run, tmp_path):
    assert synth(tmp_path, "-k", "2", "--limit", "6", "--workers", "2", "--seed", "7") == 0
    assert shard_bytes(tmp_path) == shard_bytes(reference_run)


def test_node_partitions_together_equal_single_node(reference_run, tmp_path, monkeypatch):
    args = ["-k", "2", "--limit", "6", "--workers", "1", "--seed", "7"]
    assert synth(tmp_path, *args, "--num-nodes", "2", "--node-rank", "0") == 0
    # Rank 1 as torchrun/accelerate launch it: the partition comes from WORLD_SIZE and RANK alone.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert synth(tmp_path, *args) == 0
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert any("-r000-" in n for n in names) and any("-r001-" in n for n in names)
    keys = []
    for path in tmp_path.glob("*.tar"):
        with tarfile.open(path) as tar:
            keys += [info.name.partition(".")[0] for info in tar if info.name.endswith(".json")]
    assert sorted(keys) == sorted(samples_by_key(reference_run))  # none missing, none written twice
    assert samples_by_key(tmp_path) == samples_by_key(reference_run)  # byte-identical members per key
    per_node = [json.loads((tmp_path / f"summary-r{r:03d}.json").read_text())["samples_written"] for r in (0, 1)]
    assert sum(per_node) == 6 and min(per_node) > 0  # sources are dealt out, so 2 + 1 photos x 2 crops


def test_replay_reproduces_every_sample(reference_run, capsys):
    for key in samples_by_key(reference_run):
        assert main(["replay", str(reference_run), "--key", key]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["checks"]["lq"] == "identical"
        assert report["checks"]["hq_from_source"] == "identical"
        assert report["checks"]["params_from_seed"] == "identical"


def test_replay_detects_a_tampered_sample(reference_run, tmp_path, capsys):
    members = samples_by_key(reference_run)
    key = next(iter(members))
    meta = json.loads(members[key]["json"])
    meta["final"]["jpeg_quality"] = 100 if meta["final"]["jpeg_quality"] != 100 else 99
    members[key]["json"] = json.dumps(meta).encode()
    with wds.TarWriter(str(tmp_path / "t.tar"), encoder=False) as tar:
        tar.write({"__key__": key, **members[key]})
    assert main(["replay", str(tmp_path / "t.tar"), "--key", key]) == 1
    assert "DIFFERENT" in capsys.readouterr().out


def test_degrade_same_seed_is_identical_other_seed_differs(reference_run, tmp_path):
    same, other = tmp_path / "same", tmp_path / "other"
    assert main(["degrade", str(reference_run), "--out", str(same), "--seed", "7", *BASE, "--workers", "2"]) == 0
    assert shard_bytes(same) == shard_bytes(reference_run)
    assert main(["degrade", str(reference_run), "--out", str(other), "--seed", "8", *BASE, "--workers", "1"]) == 0
    a, b = samples_by_key(reference_run), samples_by_key(other)
    assert a.keys() == b.keys()
    assert all(a[k]["hq.png"] == b[k]["hq.png"] and a[k]["parts.png"] == b[k]["parts.png"] for k in a)
    assert any(a[k]["lq.png"] != b[k]["lq.png"] for k in a)


def test_inspect_writes_contact_sheet_and_plots(reference_run, tmp_path):
    assert main(["inspect", str(reference_run), "--out", str(tmp_path), "--max-samples", "3"]) == 0
    sheet = cv2.imread(str(tmp_path / "contact_sheet.png"))
    assert sheet.shape[1] == 4 * 192 and sheet.shape[0] == 24 + 3 * 192  # three samples: one column
    assert (tmp_path / "parameters.png").stat().st_size > 1000


def test_existing_output_needs_resume_and_same_settings(reference_run):
    assert synth(reference_run, "-k", "2", "--limit", "6", "--workers", "1", "--seed", "7") == 2
    assert synth(reference_run, "-k", "2", "--limit", "6", "--workers", "1", "--seed", "8", "--resume") == 2
    # A finished run resumed with the same settings has nothing left to do and changes nothing.
    before = shard_bytes(reference_run)
    assert synth(reference_run, "-k", "2", "--limit", "6", "--workers", "1", "--seed", "7", "--resume") == 0
    assert shard_bytes(reference_run) == before


def test_bad_inputs_are_rejected_with_reasons(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.png").write_bytes((ASSETS_DIR / "astronaut.png").read_bytes())
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.png").write_bytes(b"not an image at all")
    (src / "truncated.jpg").write_bytes((ASSETS_DIR / "bus.jpg").read_bytes()[:5000])
    cv2.imwrite(str(src / "tiny.png"), np.zeros((40, 40, 3), np.uint8))
    out = tmp_path / "out"
    assert synth(out, str(src), "--workers", "2") == 3
    rejects = [json.loads(line) for line in (out / "rejects-r000.jsonl").read_text().splitlines()]
    reasons = {Path(r["source"]).name: r["reason"] for r in rejects}
    assert set(reasons) == {"empty.jpg", "text.png", "truncated.jpg", "tiny.png"}
    assert reasons["empty.jpg"].startswith("empty file")
    assert reasons["text.png"].startswith("not an image")
    assert reasons["truncated.jpg"].startswith("corrupt or truncated")
    assert reasons["tiny.png"].startswith("too small")
    assert len(samples_by_key(out)) == 1
    summary = json.loads((out / "summary-r000.json").read_text())
    assert summary["samples_written"] == 1 and summary["samples_rejected"] == 4


@pytest.fixture(scope="module")
def twelve_sources(tmp_path_factory) -> tuple[list[str], Path]:
    """Twelve one-sample sources, one shard each, so a stop lands between shards; and their run."""
    src = tmp_path_factory.mktemp("twelve")
    for i in range(12):
        (src / f"p{i}.jpg").write_bytes((ASSETS_DIR / "bus.jpg").read_bytes())
    args = [str(src), "-k", "1", "--seed", "3", "--no-progress", "--samples-per-shard", "1"]
    clean = tmp_path_factory.mktemp("clean")
    assert synth_cmd(clean, *args, "--workers", "1").returncode == 0
    return args, clean


def synth_cmd(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "haodiff_data.cli", "synth", "--out", str(out), *args],
                          capture_output=True, text=True)


@pytest.mark.parametrize("how,workers", [("kill", "1"), ("ctrl-c", "2"), ("term", "2")])
def test_a_stopped_run_resumes_to_the_uninterrupted_shards(twelve_sources, tmp_path, how, workers):
    args, clean = twelve_sources
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "haodiff_data.cli", "synth", "--out", str(out), *args, "--workers", workers]
    stopped = interrupt_after_shards(cmd, out, 3, how)
    if how != "kill":
        # One line saying what to do, no traceback from the main process or any worker.
        code, what = (130, "interrupted") if how == "ctrl-c" else (143, "terminated (SIGTERM)")
        assert stopped.returncode == code
        assert f"haodiff-data synth: {what}: the shards committed in {out} are kept, rerun with --resume" \
            in stopped.stderr
        assert "Traceback" not in stopped.stderr
    assert 3 <= len(list(out.glob("*.tar"))) < 12
    assert synth_cmd(out, *args, "--workers", workers, "--resume").returncode == 0
    assert len(shard_bytes(clean)) == 12
    assert shard_bytes(out) == shard_bytes(clean)
    assert not list(out.glob(".*.tmp"))


def test_no_person_is_noted_or_rejected_under_require_person(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "wall.png"), np.full((600, 600, 3), 128, np.uint8))
    out = tmp_path / "out"
    assert synth(out, str(src), "-k", "2", "--workers", "1") == 0
    for members in samples_by_key(out).values():
        meta = json.loads(members["json"])
        assert meta["segmenter"]["person_found"] is False and meta["first_order"] != "hmb"
        assert "no person" in meta["first_order_note"]
    strict = tmp_path / "strict.yaml"
    strict.write_text("first_order:\n  require_person: true\n")
    out2 = tmp_path / "out2"
    assert synth(out2, str(src), "-k", "2", "--workers", "1", "--recipe", str(strict)) == 3
    (reject,) = [json.loads(line) for line in (out2 / "rejects-r000.jsonl").read_text().splitlines()]
    assert reject["reason"].startswith("no person found") and reject["samples"] == [0, 1]


def test_labels_segmenter_uses_precomputed_maps(tmp_path):
    src, labels = tmp_path / "in", tmp_path / "labels"
    src.mkdir()
    labels.mkdir()
    (src / "astronaut.png").write_bytes((ASSETS_DIR / "astronaut.png").read_bytes())
    label_map = np.zeros((512, 512), np.uint8)
    label_map[60:200, 180:330] = 2  # head
    label_map[200:500, 320:440] = 10  # left upper arm
    cv2.imwrite(str(labels / "astronaut.png"), label_map)
    out = tmp_path / "out"
    assert synth(out, str(src), "--segmenter", "labels", "--labels-dir", str(labels), "--workers", "1") == 0
    (members,) = samples_by_key(out).values()
    parts = cv2.imdecode(np.frombuffer(members["parts.png"], np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(parts, label_map)
    meta = json.loads(members["json"])
    assert meta["segmenter"]["name"] == "labels"
    assert meta["segmenter"]["groups"] == ["head", "left_upper_limb", "whole_body"]


def test_an_unexpected_failure_rejects_that_source_and_the_run_goes_on(tmp_path, monkeypatch):
    import haodiff_data.synth as synth_module

    real = synth_module.make_sample

    def flaky(hq, parts, index, *args):
        if index == 1:
            raise RuntimeError("boom")
        return real(hq, parts, index, *args)

    monkeypatch.setattr(synth_module, "make_sample", flaky)
    out = tmp_path / "out"
    assert synth(out, "-k", "1", "--workers", "1") == 3
    (reject,) = [json.loads(line) for line in (out / "rejects-r000.jsonl").read_text().splitlines()]
    assert reject["reason"] == "processing failed: RuntimeError: boom" and reject["samples"] == [1]
    assert reject["source"].endswith("bus.jpg")
    assert sorted(samples_by_key(out)) == ["s000000000", "s000000002"]


def test_bench_json_reports_every_stage(capsys):
    assert main(["bench", "--json", "--samples", "2", "--end-to-end-samples", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    stages = result["stage_ms_one_core"]
    assert set(stages) == {"intake", "segmentation", "trajectory_psf", "hmb_blur", "generic", "encode_write"}
    assert all(v > 0 for v in stages.values())
    expected = stages["trajectory_psf"] + stages["hmb_blur"] + stages["generic"]
    assert abs(result["degrade_ms_per_sample"] - expected) < 0.02


def test_person_crops_of_a_wide_photo_show_a_person(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "zidane.jpg").write_bytes((ASSETS_DIR / "zidane.jpg").read_bytes())  # 1280x720: crops at native size
    out = tmp_path / "out"
    assert synth(out, str(src), "-k", "4", "--workers", "1") == 0
    boxes = set()
    for members in samples_by_key(out).values():
        meta = json.loads(members["json"])
        assert meta["source"]["crop"]["mode"] == "person" and meta["source"]["working_size"] is None
        boxes.add(tuple(meta["source"]["crop"]["box"]))
        parts = cv2.imdecode(np.frombuffer(members["parts.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert meta["segmenter"]["person_found"] and (parts > 0).mean() > 0.01
    assert len(boxes) > 1  # K crops of one image differ

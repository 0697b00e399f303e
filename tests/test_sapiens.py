import json
import os
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from haodiff_data.segment import make_segmenter  # noqa: E402
from haodiff_data.segment.sapiens import MEAN, padded_size  # noqa: E402


class TinySapiens(nn.Module):
    """Same contract as a Sapiens lite seg export: (B, 3, 1024, 768) -> (B, C, 512, 384) logits.

    Class 0 (background) wins where the normalised input is ~0, i.e. the mean colour and the
    padding; elsewhere class 2 wins in the top quarter of the model's input (rows < 256 of 1024)
    and class 1 below. Argmax thus depends on content and on position in the padded frame.
    """

    def __init__(self, channels: int = 28):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.avg_pool2d(x.abs().mean(dim=1, keepdim=True), 2)
        rows = torch.arange(s.shape[2], device=x.device).view(1, 1, -1, 1)
        top = (rows < 128).to(s.dtype)
        background = torch.full_like(s, 0.25)
        rest = torch.full_like(s, -100.0).expand(-1, self.channels - 3, -1, -1)
        return torch.cat([background, s, s + top - 0.5, rest], dim=1)


@pytest.fixture(scope="module")
def tiny_torchscript(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny_seg_torchscript.pt2"
    torch.jit.script(TinySapiens().eval()).save(str(path))
    return str(path)


def _half_white(height: int, width: int) -> np.ndarray:
    """Top half white, bottom half the normalisation mean (which the model sees as background)."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = np.round(MEAN).astype(np.uint8)
    image[: height // 2] = 255
    return image


def _expected(height: int, width: int) -> np.ndarray:
    """Labels the tiny model must give when the image is padded to 3:4 (centred) and not stretched."""
    ph, _ = padded_size(height, width)
    top = (ph - height) // 2
    quarter = ph / 4 - top  # the model's top quarter, in original rows
    rows = np.arange(height)[:, None]
    labels = np.where(rows < quarter, 2, 1)
    labels = np.where(rows >= height // 2, 0, labels)
    return np.broadcast_to(labels, (height, width)).astype(np.uint8)


def _check(labels: np.ndarray, expected: np.ndarray, tolerance: int = 2) -> None:
    """Equal except within ``tolerance`` rows of a class boundary (bilinear upsampling)."""
    boundary = np.zeros(expected.shape[0], bool)
    changes = np.flatnonzero(np.diff(expected[:, 0].astype(int))) + 1
    for row in changes:
        boundary[max(0, row - tolerance) : row + tolerance] = True
    assert np.array_equal(labels[~boundary], expected[~boundary])


def test_padded_size_is_three_by_four_portrait():
    assert padded_size(512, 512) == (683, 512)
    assert padded_size(1024, 768) == (1024, 768)
    assert padded_size(1000, 300) == (1000, 750)
    assert padded_size(300, 800) == (1067, 800)


def test_square_crop_is_padded_then_cropped_back(tiny_torchscript):
    seg = make_segmenter("sapiens", checkpoint=tiny_torchscript)
    assert seg.name == "sapiens" and seg.model_id == "tiny_seg_torchscript.pt2" and not seg.per_source
    labels = seg.segment([_half_white(512, 512)])[0].parts
    assert labels.shape == (512, 512) and labels.dtype == np.uint8
    expected = _expected(512, 512)
    # Padding 512 -> 683 rows puts the model's quarter line at row 170.75 - 85 = 85.75; a stretched
    # input would put it at row 128, so these rows tell the two apart.
    assert (expected[:85] == 2).all() and (expected[87:256] == 1).all()
    _check(labels, expected)
    assert (labels[90:250] == 1).all() and (labels[:80] == 2).all() and not labels[260:].any()


def test_batches_equal_single_images_for_mixed_sizes(tiny_torchscript):
    seg = make_segmenter("sapiens", checkpoint=tiny_torchscript, batch_size=2)
    images = [_half_white(512, 512), _half_white(300, 800), _half_white(1000, 300)]
    batched = [s.parts for s in seg.segment(images)]
    for image, labels in zip(images, batched):
        assert labels.shape == image.shape[:2]
        assert np.array_equal(labels, seg.segment([image])[0].parts)
        _check(labels, _expected(*image.shape[:2]))


def test_exported_program_with_static_batch(tmp_path):
    path = tmp_path / "tiny_seg_bfloat16.pt2"
    program = torch.export.export(TinySapiens().eval(), (torch.zeros(1, 3, 1024, 768),))
    torch.export.save(program, str(path))
    seg = make_segmenter("sapiens", checkpoint=str(path), batch_size=4)
    assert seg.static_batch == 1
    images = [_half_white(512, 512), _half_white(512, 512)]
    for labels in (s.parts for s in seg.segment(images)):
        _check(labels, _expected(512, 512))


def test_clear_errors(tmp_path):
    missing = tmp_path / "nope_torchscript.pt2"
    with pytest.raises(FileNotFoundError, match="nope_torchscript.pt2"):
        make_segmenter("sapiens", checkpoint=str(missing))
    with pytest.raises(ValueError, match="needs checkpoint"):
        make_segmenter("sapiens")
    wrong = tmp_path / "wrong_torchscript.pt2"
    torch.jit.script(TinySapiens(channels=20).eval()).save(str(wrong))
    seg = make_segmenter("sapiens", checkpoint=str(wrong))
    with pytest.raises(ValueError, match=r"wrong_torchscript\.pt2.*\(1, 20, 512, 384\)"):
        seg.segment([_half_white(64, 64)])
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt2: cannot load"):
        make_segmenter("sapiens", checkpoint=str(garbage))
    seg = make_segmenter("sapiens", checkpoint=str(wrong))
    seg.close()
    with pytest.raises(RuntimeError, match="closed"):
        seg.segment([_half_white(64, 64)])


def _run_synth(out, *extra: str) -> int:
    from haodiff_data.cli import main
    from haodiff_data.intake.sources import ASSETS_DIR

    return main(["synth", str(ASSETS_DIR / "astronaut.png"), "--out", str(out), "--no-progress", "--segmenter",
                 "sapiens", *extra])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_checkpoint_that_cannot_load_stops_the_run_before_any_sample(tmp_path, capsys, workers):
    # A zip archive with a TorchScript name but no program in it: only loading can tell.
    broken = tmp_path / "broken_torchscript.pt2"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("broken/constants.pkl", b"not a pickle")
    out = tmp_path / "out"
    assert _run_synth(out, "--checkpoint", str(broken), "--workers", workers) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "broken_torchscript.pt2" in err and "cannot load" in err
    assert not list(out.glob("*.tar")) and not list(out.glob("rejects-*"))


def test_wrong_file_kind_and_missing_device_stop_the_run(tmp_path, capsys, tiny_torchscript):
    text = tmp_path / "notes_torchscript.pt2"
    text.write_text("hello")
    assert _run_synth(tmp_path / "a", "--checkpoint", str(text)) == 2
    assert "not a TorchScript or torch.export archive" in capsys.readouterr().err
    assert _run_synth(tmp_path / "b", "--checkpoint", str(tmp_path / "missing.pt2")) == 2
    assert "missing.pt2" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert _run_synth(tmp_path / "c", "--checkpoint", tiny_torchscript, "--device", "cuda") == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert _run_synth(tmp_path / "d", "--checkpoint", tiny_torchscript, "--device", "tpu") == 2
    assert "--device" in capsys.readouterr().err
    assert not [p for d in "abcd" for p in (tmp_path / d).glob("*.tar")]


def test_default_workers_account_for_the_model(tmp_path, monkeypatch):
    from haodiff_data import synth

    monkeypatch.setattr(synth, "cpu_count", lambda: 32)
    big = tmp_path / "big_torchscript.pt2"
    with open(big, "wb") as f:
        f.truncate(1_358_871_599)  # the 0.3B file's size, sparse
    monkeypatch.setattr(synth, "available_memory", lambda: 8 * 2**30)
    # The service holds the model once: (8 GiB - 4.5 x 1.36 GB) / 0.5 GiB = 4 workers on the CPU;
    # on a GPU the model is in device memory and 8 GiB / 0.5 GiB = 16 workers fit.
    assert synth.default_workers("sapiens", str(big), "cpu") == 4
    assert synth.default_workers("sapiens", str(big), "cuda") == 16
    assert synth.default_workers("mediapipe") == 16
    monkeypatch.setattr(synth, "available_memory", lambda: 64 * 2**30)
    # 32 workers, not 10 as when every worker held its own copy (64 GiB / (4.5 x 1.36 GB + 0.5 GiB)).
    assert synth.default_workers("sapiens", str(big), "cpu") == 32
    monkeypatch.setattr(synth, "available_memory", lambda: 4 * 2**30)
    assert synth.default_workers("sapiens", str(big), "cpu") == 1  # the model alone does not fit: one worker


def test_standin_has_the_real_contract_and_loads_through_the_segmenter(tmp_path):
    from haodiff_data.segment.sapiens_standin import SapiensStandin, StandinConfig, write_standin

    cfg = StandinConfig(width=32, depth=1, heads=2, head_channels=8)
    path = tmp_path / "standin_torchscript.pt2"
    params = write_standin(str(path), cfg, seed=3)
    assert params == sum(p.numel() for p in SapiensStandin(cfg).parameters())
    traced = torch.jit.load(str(path))
    x = torch.randn(2, 3, 1024, 768)
    with torch.inference_mode():
        torch.manual_seed(3)  # the same random weights as the saved file
        assert torch.allclose(traced(x), SapiensStandin(cfg).eval()(x), atol=1e-4)
        assert traced(x).shape == (2, 28, 512, 384)  # traced at batch 1, runs at any batch
    seg = make_segmenter("sapiens", checkpoint=str(path), batch_size=2)
    images = [np.random.default_rng(i).integers(0, 256, (512, 512, 3), dtype=np.uint8) for i in range(3)]
    out = seg.segment(images)
    assert [s.parts.shape for s in out] == [(512, 512)] * 3 and max(int(s.parts.max()) for s in out) < 28
    assert np.array_equal(out[2].parts, seg.segment(images[2:])[0].parts)


def test_sapiens_size_default_is_0_3b():
    from haodiff_data.segment.sapiens_standin import SapiensStandin, StandinConfig

    with torch.device("meta"):
        params = sum(p.numel() for p in SapiensStandin(StandinConfig()).parameters())
    assert 0.30e9 < params < 0.34e9  # the backbone is 0.3B; data_spec C.3 gives 0.336 B with its head


def test_bench_times_a_sapiens_checkpoint(tiny_torchscript, capsys):
    from haodiff_data.cli import main

    assert main(["bench", "--json", "--samples", "1", "--end-to-end-samples", "2", "--workers", "1",
                 "--segmenter", "sapiens", "--checkpoint", tiny_torchscript]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["segmenter"] == "sapiens tiny_seg_torchscript.pt2 on cpu"
    assert set(result["segment_images_per_s"]) == {"1", "4"}  # the CPU's batches
    assert all(v > 0 for v in result["segment_images_per_s"].values())
    e2e = result["end_to_end"]
    assert e2e["samples"] == 2 and 0 < e2e["segmentation_share"] < 1
    assert e2e["stage_ms_per_sample_in_run"]["segment"] > 0


def test_bench_without_a_checkpoint_times_a_standin(monkeypatch, capsys):
    from haodiff_data.cli import main
    from haodiff_data.segment import sapiens_standin

    written = []

    def small(path, cfg=None, device="cpu", seed=0):  # the real writer, at a test's size
        written.append(path)
        return write(path, sapiens_standin.StandinConfig(width=32, depth=1, heads=2, head_channels=8), device, seed)

    write = sapiens_standin.write_standin
    monkeypatch.setattr(sapiens_standin, "write_standin", small)
    assert main(["bench", "--json", "--samples", "1", "--end-to-end-samples", "0", "--segmenter", "sapiens"]) == 0
    captured = capsys.readouterr()
    assert "random-weight Sapiens-0.3B-sized stand-in" in captured.err
    assert json.loads(captured.out)["segmenter"].startswith("sapiens sapiens_0.3b_random_torchscript.pt2 on cpu")
    assert len(written) == 1 and not os.path.exists(written[0])  # a temporary file, removed after


def test_precision_is_applied_recorded_and_checked(tmp_path):
    from haodiff_data.segment.sapiens_standin import StandinConfig, write_standin

    path = tmp_path / "standin_torchscript.pt2"
    write_standin(str(path), StandinConfig(width=32, depth=1, heads=2, head_channels=8))
    images = [np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8) for i in range(2)]
    fp32 = make_segmenter("sapiens", checkpoint=str(path))
    bf16 = make_segmenter("sapiens", checkpoint=str(path), precision="bf16")
    assert fp32.model_id == "standin_torchscript.pt2" and bf16.model_id == "standin_torchscript.pt2@bf16"
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    a, b = fp32.segment(images), bf16.segment(images)
    same = np.mean([np.mean(x.parts == y.parts) for x, y in zip(a, b)])
    assert 0.5 < same < 1.0  # the same model, computed in another precision: close, not identical
    with pytest.raises(ValueError, match="tf32 applies to CUDA"):
        make_segmenter("sapiens", checkpoint=str(path), precision="tf32")
    with pytest.raises(ValueError, match="takes no precision"):
        make_segmenter("mediapipe", precision="bf16")


def _members(out, suffix: str) -> list[bytes]:
    import tarfile

    found = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            found += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(suffix)]
    return found


def test_seg_precision_reaches_the_samples_and_is_refused_where_meaningless(tmp_path, capsys, tiny_torchscript):
    assert _run_synth(tmp_path / "a", "--checkpoint", tiny_torchscript, "--seg-precision", "bf16") == 0
    metas = [json.loads(m) for m in _members(tmp_path / "a", ".json")]
    assert metas and {m["segmenter"]["model_id"] for m in metas} == {"tiny_seg_torchscript.pt2@bf16"}
    assert _run_synth(tmp_path / "b", "--checkpoint", tiny_torchscript, "--seg-precision", "tf32") == 2
    assert "--seg-precision" in capsys.readouterr().err and not list((tmp_path / "b").glob("*.tar"))


def _service(checkpoint: str, seg_batch: int, slots: int):
    from haodiff_data.run import process_context
    from haodiff_data.segment.service import SegmentationService

    return SegmentationService(process_context(), checkpoint, "cpu", None, seg_batch, slots=slots, threads=1)


def test_service_packs_requests_of_several_workers_into_one_forward(tiny_torchscript):
    import threading

    images = [_half_white(48, 40), _half_white(40, 56), _half_white(64, 30), _half_white(30, 30)]
    service = _service(tiny_torchscript, seg_batch=8, slots=2)
    clients = [service.client(), service.client()]
    got: dict[int, list] = {}

    def ask(n: int) -> None:
        got[n] = clients[n].segment(images[2 * n : 2 * n + 2])

    # Both requests are sent while the model loads; small images fit the queue's pipe whole, so
    # the service finds them both waiting when it starts reading.
    threads = [threading.Thread(target=ask, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    service.start()
    for t in threads:
        t.join(timeout=60)
    stats = service.close()
    assert stats == {"process": "service", "seg_batch": 8, "forwards": 1, "images": 4, "images_per_forward": 4.0,
                     "forwards_mixing_requests": 1}
    alone = make_segmenter("sapiens", checkpoint=tiny_torchscript, batch_size=1)
    for n in range(2):
        for image, seg in zip(images[2 * n : 2 * n + 2], got[n]):
            expected = alone.segment([image])[0]  # the same labels as in a forward of its own
            assert np.array_equal(seg.parts, expected.parts) and np.array_equal(seg.persons, expected.persons)


def test_a_service_that_dies_mid_run_fails_its_workers_with_a_message(tiny_torchscript):
    from haodiff_data.segment.service import ServiceError

    service = _service(tiny_torchscript, seg_batch=4, slots=1)
    service.start()
    client = service.client()
    assert client.model_id == "tiny_seg_torchscript.pt2" and len(client.segment([_half_white(32, 32)])) == 1
    service._process.kill()  # what the OOM killer would do
    with pytest.raises(ServiceError, match=r"tiny_seg_torchscript\.pt2 on cpu was killed by signal 9.*mid-run"):
        client.segment([_half_white(32, 32)])
    assert service.close() is None and service._process.exitcode == -9


def test_output_bytes_do_not_depend_on_workers_or_seg_batch(tmp_path, tiny_torchscript):
    import multiprocessing

    from haodiff_data.cli import main

    runs = {}
    for workers, seg_batch in (("1", "1"), ("2", "4")):
        out = tmp_path / f"w{workers}b{seg_batch}"
        # The bundled photos: one at the crop size, two searched for a person first.
        assert main(["synth", "--out", str(out), "--no-progress", "-k", "2", "--segmenter", "sapiens",
                     "--checkpoint", tiny_torchscript, "--workers", workers, "--seg-batch", seg_batch]) == 0
        runs[workers] = json.loads((out / "summary-r000.json").read_text())["this_invocation"]["sapiens_forwards"]
        assert not multiprocessing.active_children()  # workers and service joined
    assert [p.read_bytes() for p in sorted((tmp_path / "w1b1").glob("*.tar"))] == \
        [p.read_bytes() for p in sorted((tmp_path / "w2b4").glob("*.tar"))]
    # 2 person searches + 6 crops either way; one image per forward in-process at --seg-batch 1, and
    # with 2 workers at most one forward per request (5 requests of at most 2 images).
    assert runs["1"] == {"process": "in-process", "seg_batch": 1, "forwards": 8, "images": 8,
                         "images_per_forward": 1.0, "forwards_mixing_requests": 0}
    assert runs["2"]["process"] == "service" and runs["2"]["images"] == 8 and 2 <= runs["2"]["forwards"] <= 5


def test_ctrl_c_stops_workers_and_the_segmentation_process_and_resumes(tmp_path, tiny_torchscript):
    import subprocess
    import sys

    from conftest import interrupt_after_shards
    from haodiff_data.intake.sources import ASSETS_DIR

    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"p{i}.jpg").write_bytes((ASSETS_DIR / "bus.jpg").read_bytes())
    args = [str(src), "-k", "1", "--no-progress", "--samples-per-shard", "1", "--segmenter", "sapiens",
            "--checkpoint", tiny_torchscript, "--workers", "2", "--seg-batch", "2"]
    synth = [sys.executable, "-m", "haodiff_data.cli", "synth", "--out"]
    stopped = interrupt_after_shards([*synth, str(tmp_path / "stopped"), *args], tmp_path / "stopped", 2, "ctrl-c")
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
    assert "haodiff-data synth: interrupted: the shards committed in" in stopped.stderr
    assert subprocess.run([*synth, str(tmp_path / "stopped"), *args, "--resume"], capture_output=True).returncode == 0
    assert subprocess.run([*synth, str(tmp_path / "clean"), *args], capture_output=True).returncode == 0
    assert [p.read_bytes() for p in sorted((tmp_path / "stopped").glob("*.tar"))] == \
        [p.read_bytes() for p in sorted((tmp_path / "clean").glob("*.tar"))]


def test_seg_batch_is_refused_without_sapiens(tmp_path, capsys):
    from haodiff_data.cli import main

    assert main(["synth", "--out", str(tmp_path), "--seg-batch", "4"]) == 2
    assert "--seg-batch applies to --segmenter sapiens only" in capsys.readouterr().err

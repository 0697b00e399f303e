"""Hostile inputs, bad arguments and write failures: a message and an exit code, never a traceback."""

import errno
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

import haodiff_data.cli as cli
from haodiff_data import atomic
from haodiff_data.cli import main
from haodiff_data.intake.sources import ASSETS_DIR
from haodiff_data.shards import writer

BASE = ["--no-progress", "--workers", "1"]


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def rejects(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "rejects-r000.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small")
    assert main(["synth", "--out", str(out), *BASE, "-k", "1", "--samples-per-shard", "1", "--seed", "5"]) == 0
    assert len(shard_bytes(out)) == 3
    return out


@pytest.mark.parametrize("argv,flag", [
    (["synth", "--seed", "-1"], "--seed"),
    (["synth", "--seed", str(2**53)], "--seed"),
    (["synth", "-k", "0"], "--samples-per-image/-k"),
    (["synth", "-k", "-2"], "--samples-per-image/-k"),
    (["synth", "--limit", "0"], "--limit"),
    (["synth", "--workers", "0"], "--workers"),
    (["synth", "--samples-per-shard", "0"], "--samples-per-shard"),
    (["synth", "--num-nodes", "0"], "--num-nodes"),
    (["synth", "--node-rank", "-1"], "--node-rank"),
    (["synth", "--prefix", "a/b"], "--prefix"),
    (["degrade", "x", "--workers", "-1"], "--workers"),
    (["bench", "--samples", "0"], "--samples"),
    (["inspect", "x", "--max-samples", "0"], "--max-samples"),
])
def test_bad_arguments_are_rejected_before_any_work(argv, flag, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(out)] if argv[0] in ("synth", "degrade") else argv)
    assert exc.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err
    assert not out.exists()


def _integers(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [i for v in value for i in _integers(v)]
    return [value] if isinstance(value, int) and not isinstance(value, bool) else []


def test_every_json_integer_is_exact_in_double_based_readers(small_run):
    metas = []
    for shard in sorted(small_run.glob("*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    seeds = [m["hmb"]["psf_seed"] for m in metas if m["hmb"]] + [
        o["noise"]["noise_seed"] for m in metas for o in (m["generic_first"], m["generic_second"]) if o]
    assert seeds
    values = _integers(metas)
    assert values and max(values) < 2**53


def test_node_rank_outside_the_partition_and_out_a_file(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["synth", "--out", str(out), "--num-nodes", "2", "--node-rank", "2"]) == 2
    assert "--node-rank must be in [0, 2), got 2" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    for argv in (["synth"], ["degrade", str(tmp_path)], ["inspect", str(tmp_path)]):
        assert main([*argv, "--out", str(a_file)]) == 2
        assert f"--out {a_file} is a file, not a folder" in capsys.readouterr().err
    assert not out.exists()


def test_inspect_without_shards_and_replay_of_a_missing_key(tmp_path, small_run, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert f"haodiff-data inspect: error: no shards (*.tar) in {tmp_path}" in capsys.readouterr().err
    assert main(["replay", str(small_run), "--key", "s999"]) == 2
    assert "sample 's999' not found" in capsys.readouterr().err


def test_an_internal_key_error_is_not_reported_as_bad_arguments(monkeypatch):
    def broken(args):
        raise KeyError("internal")

    monkeypatch.setitem(cli.COMMANDS, "inspect", broken)
    with pytest.raises(KeyError, match="internal"):
        main(["inspect", "x"])


def _rewrite_json(src: Path, dst: Path, change) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin:
            data = tin.extractfile(info).read()
            if info.name.endswith(".json"):
                meta = json.loads(data)
                change(meta)
                data = json.dumps(meta).encode()
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_unknown_schema_version_is_a_message_in_replay_and_inspect(small_run, tmp_path, capsys):
    shards = tmp_path / "v99"
    shards.mkdir()
    _rewrite_json(small_run / "haodiff-r000-000000.tar", shards / "x.tar", lambda m: m.update(schema=99))
    assert main(["replay", str(shards), "--key", "s000000000"]) == 2
    assert "shard schema version 99 is not supported" in capsys.readouterr().err
    assert main(["inspect", str(shards)]) == 2
    assert "shard schema version 99 is not supported" in capsys.readouterr().err


def test_degrade_records_a_truncated_shard_and_names_itself(small_run, tmp_path, capsys):
    shards = tmp_path / "in"
    shards.mkdir()
    (shards / "a.tar").write_bytes((small_run / "haodiff-r000-000000.tar").read_bytes())
    whole = small_run / "haodiff-r000-000001.tar"
    with tarfile.open(whole) as tar:
        third_data = tar.getmembers()[2].offset_data
    (shards / "b.tar").write_bytes(whole.read_bytes()[: third_data + 100])  # cut inside a member
    out = tmp_path / "out"
    assert main(["degrade", str(shards), "--out", str(out), *BASE]) == 3
    err = capsys.readouterr().err
    assert "haodiff-data degrade: 1 samples" in err and "Traceback" not in err
    (reject,) = rejects(out)
    assert reject["source"] == str(shards / "b.tar") and reject["reason"].startswith("unreadable shard:")


class _FullDisk:
    """A file that takes ``budget`` bytes, then fails as a full disk does."""

    def __init__(self, f, budget: int):
        self._f, self._left = f, budget

    def write(self, data) -> int:
        if len(data) > self._left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_disk_full_is_one_message_its_own_exit_code_and_resumable(small_run, tmp_path, monkeypatch, capsys):
    opened = []

    def open_on_a_filling_disk(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if str(path).endswith(".tar.tmp"):
            opened.append(path)
            return _FullDisk(f, 10**9 if len(opened) < 2 else 100_000)  # the second shard hits a full disk
        return f

    out = tmp_path / "out"
    argv = ["synth", "--out", str(out), *BASE, "-k", "1", "--samples-per-shard", "1", "--seed", "5"]
    monkeypatch.setattr(writer, "open", open_on_a_filling_disk, raising=False)
    assert main(argv) == cli.EXIT_WRITE_FAILED == 4
    err = capsys.readouterr().err
    assert "haodiff-data synth: error: cannot write" in err and "No space left on device" in err
    assert "Traceback" not in err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert list(shard_bytes(out)) == ["haodiff-r000-000000.tar"]
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert shard_bytes(out) == shard_bytes(small_run)


def test_a_failed_small_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full(path, mode="r", *args, **kwargs):
        return _FullDisk(open(path, mode, *args, **kwargs), 3)

    monkeypatch.setattr(atomic, "open", full, raising=False)
    with pytest.raises(atomic.OutputWriteError, match=r"cannot write .*state.json: No space left on device"):
        atomic.atomic_write_bytes(tmp_path / "state.json", b"0123456789")
    assert list(tmp_path.iterdir()) == []


def test_hostile_file_names_and_links_are_sources_or_rejects(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    src.mkdir()
    odd = os.fsdecode(b"bus-\xff\xfe.jpg")  # not UTF-8
    (src / odd).write_bytes((ASSETS_DIR / "bus.jpg").read_bytes())
    os.symlink(src / odd, src / "again.jpg")  # the same file under another name
    os.symlink("/nonexistent.jpg", src / "dangling.jpg")
    os.symlink("loop.jpg", src / "loop.jpg")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "in", "in/*.jpg", "--out", str(out), *BASE]) == 3
    assert "Traceback" not in capsys.readouterr().err
    reasons = sorted((Path(r["source"]).name, r["reason"]) for r in rejects(out))
    assert reasons == [("dangling.jpg", "dangling symlink (points to /nonexistent.jpg)"),
                       ("loop.jpg", "symlink loop")]
    (shard,) = out.glob("*.tar")
    with tarfile.open(shard) as tar:
        (meta,) = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    # The sorted listing meets again.jpg first; its resolved path is the odd name, byte for byte.
    assert meta["source"]["path"] == "in/again.jpg"
    assert os.fsencode(meta["source"]["resolved"]) == os.fsencode(src / odd)
    monkeypatch.chdir(ASSETS_DIR)  # replay from another folder finds the source by its resolved path
    assert main(["replay", str(out), "--key", meta["key"]]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checks"]["hq_from_source"] == "identical"


def test_inspect_sheet_spreads_over_sources_as_a_grid(tmp_path, capsys):
    from haodiff_data.report import stratified_keys

    index = [(f"s{i:09d}", f"src{i // 8}") for i in range(24)]  # three sources, eight samples each
    assert stratified_keys(index, 4) == ["s000000000", "s000000008", "s000000016", "s000000001"]
    many = [(f"s{i:09d}", f"src{i}") for i in range(100)]
    assert stratified_keys(many, 4) == ["s000000000", "s000000025", "s000000050", "s000000075"]
    out = tmp_path / "out"
    assert main(["synth", "--out", str(out), *BASE, "-k", "6"]) == 0  # the bundled photos, K = 6
    # The astronaut is 512x512: its six samples share one HQ crop, and the summary says so.
    assert json.loads((out / "summary-r000.json").read_text())["samples_repeating_a_crop"] >= 5
    assert "samples repeat the HQ crop of an earlier sample" in capsys.readouterr().err
    assert main(["inspect", str(out), "--out", str(tmp_path / "sheet")]) == 0
    sheet = __import__("cv2").imread(str(tmp_path / "sheet" / "contact_sheet.png"))
    assert sheet.shape == (24 + 8 * 192, 2 * 4 * 192, 3)  # sixteen samples: two columns of eight

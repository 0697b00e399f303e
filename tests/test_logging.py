"""One console setup for the haodiff_model commands: rank 0 shows INFO, other ranks only warnings
and errors (tagged with their rank), in haodiff-data's `<prog>: error: ...` style and exit codes."""

import logging
import os
import signal
import time

import pytest

from haodiff_data.cli import Terminated
from haodiff_model.log import EXIT_USAGE, LOGGER_NAME, setup_logging, sigterm_as_ctrl_c


@pytest.fixture(autouse=True)
def restore_logger():
    """Leave the package logger as the test found it (other tests run in this process)."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def _say(capsys: pytest.CaptureFixture) -> tuple[str, str]:
    log = logging.getLogger("haodiff_model.train.loop")  # a module logger, as the trainers use
    log.info("step 1/2  loss 0.5")
    log.warning("mask head saturated")
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_rank_zero_shows_info_on_stdout_and_warnings_in_the_cli_style(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    setup_logging("haodiff-train dpg")
    out, err = _say(capsys)
    assert out == "step 1/2  loss 0.5\n"  # bare, as the former print()
    assert err == "haodiff-train dpg: warning: mask head saturated\n"


def test_other_ranks_drop_info_and_tag_warnings(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    setup_logging("haodiff-train dpg")
    out, err = _say(capsys)
    assert out == ""
    assert err == "haodiff-train dpg rank 1: warning: mask head saturated\n"

    setup_logging("haodiff-train dpg", rank=0)  # an explicit rank wins; a second setup replaces the first
    out, err = _say(capsys)
    assert out == "step 1/2  loss 0.5\n" and err.count("\n") == 1


def test_errors_show_on_every_rank_with_haodiff_datas_exit_code(monkeypatch, capsys, tmp_path):
    from haodiff_data.cli import EXIT_USAGE as DATA_EXIT_USAGE
    from haodiff_model.restore.convert import main as convert_main

    assert EXIT_USAGE == DATA_EXIT_USAGE == 2
    monkeypatch.setenv("RANK", "1")
    code = convert_main(["--dpg", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == EXIT_USAGE and captured.out == ""
    assert captured.err.startswith("haodiff-restore convert rank 1: error: ") and "missing.pth" in captured.err


@pytest.mark.parametrize("stop,code,what", [(KeyboardInterrupt, 130, "interrupted"),
                                             (Terminated, 143, "terminated (SIGTERM)")])
@pytest.mark.parametrize("module,argv,prog,hint", [
    ("haodiff_model.train.dpg", ["dpg", "--config", "c.yaml"], "haodiff-train dpg", "rerun with --resume"),
    ("haodiff_model.restore.cli", ["a.png", "--out", "o", "--base", "b", "--weights", "w"], "haodiff-restore",
     "the same command continues"),
])
def test_ctrl_c_and_sigterm_are_one_line_and_an_exit_code(monkeypatch, capsys, module, argv, prog, hint, stop, code,
                                                          what):
    import importlib

    def interrupted(*_args):
        raise stop

    monkeypatch.setenv("RANK", "0")
    if prog == "haodiff-train dpg":
        from haodiff_model.cli import main

        monkeypatch.setattr(importlib.import_module(module), "main_dpg", interrupted)
    else:
        from haodiff_model.restore.cli import main

        monkeypatch.setattr(importlib.import_module(module), "cmd_restore", interrupted)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: {what}: ") and hint in err and err.count("\n") == 1


def test_sigterm_stops_a_command_like_ctrl_c_and_only_while_it_runs():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_as_ctrl_c():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode, long before this ends
    assert isinstance(Terminated(), KeyboardInterrupt)  # so every Ctrl-C path (cleanup, resume hint) applies
    assert signal.getsignal(signal.SIGTERM) is before

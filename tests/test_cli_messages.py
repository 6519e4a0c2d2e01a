"""`dlserver infer` / `models`: messages a person can act on, the token kept out of ps,
and no output folder left behind by a run that wrote nothing. In-process (cli.main)."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path
from typing import Iterator

import pytest
from support import ROOT, TEST_MODELS, TcpServer

from dlserver import cli

PLATE = ROOT / "examples" / "plate.0001.exr"


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple:
    status = cli.main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DLSERVER_TOKEN", raising=False)


@pytest.fixture(scope="module")
def tcp_server() -> Iterator[TcpServer]:
    server = TcpServer(token="s3cret-token")
    try:
        yield server
    finally:
        server.stop()


# --- item 19: messages ----------------------------------------------------------------------

def test_input_without_a_name_says_how_to_name_it(capsys, tmp_path: Path) -> None:
    status, _, err = run(capsys, "infer", "--model", "blur", "--input", "plate.exr",
                         str(PLATE), str(tmp_path / "out.exr"))
    assert status == 1
    assert "dictionary update sequence" not in err
    assert "--input 'plate.exr': use --input NAME=PATTERN" in err
    assert "the first input is the positional argument" in err
    assert not (tmp_path / "out.exr").exists()


def test_input_options_are_parsed_by_name() -> None:
    assert cli.parse_extra_inputs(["mask=m.####.exr", "b=x=y.exr"]) == {
        "mask": "m.####.exr", "b": "x=y.exr"}
    for bad in ("=m.exr", "mask=", "mask"):
        with pytest.raises(ValueError, match="use --input NAME=PATTERN"):
            cli.parse_extra_inputs([bad])
    with pytest.raises(ValueError, match="given twice"):
        cli.parse_extra_inputs(["a=1.exr", "a=2.exr"])


def test_a_missing_single_file_is_named_without_a_frame(capsys, tmp_path: Path) -> None:
    missing = tmp_path / "nosuch.exr"
    status, _, err = run(capsys, "infer", "--model", "blur", str(missing),
                         str(tmp_path / "out" / "o.exr"))
    assert status == 1
    assert f"input file missing: {missing}" in err
    assert "None" not in err
    assert not (tmp_path / "out").exists()


def test_missing_frames_of_a_sequence_name_their_frames(capsys, tmp_path: Path) -> None:
    shutil.copy(PLATE, tmp_path / "p.0001.exr")
    status, _, err = run(capsys, "infer", "--model", "blur", str(tmp_path / "p.####.exr"),
                         str(tmp_path / "out" / "o.####.exr"), "--frames", "1-3")
    assert status == 1
    assert f"2 input files missing, e.g. frame 2: {tmp_path / 'p.0002.exr'}; frame 3:" in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_model_lists_the_models(capsys, tmp_path: Path) -> None:
    status, _, err = run(capsys, "infer", "--model", "blurr", "--models-dir", str(TEST_MODELS),
                         str(PLATE), str(tmp_path / "out" / "o.exr"))
    assert status == 1
    assert "the embedded server has no model 'blurr'; its models: " in err
    listed = err.split("its models: ", 1)[1].split(" (", 1)[0].split(", ")
    assert {"blur", "identity", "failing"} <= set(listed)
    assert "dlserver models" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [
    ["--model", "blur", "--set", "radius=1"],          # refused before any frame
    ["--model", "failing", "--models-dir", str(TEST_MODELS)],  # the first frame fails
])
def test_no_output_folder_from_a_run_that_wrote_nothing(capsys, tmp_path: Path,
                                                        args: list) -> None:
    status, _, err = run(capsys, "infer", *args, str(PLATE),
                         str(tmp_path / "a" / "b" / "o.exr"))
    assert status == 1, err
    assert not (tmp_path / "a").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_existing_output_folder_is_kept_and_a_good_run_makes_it(capsys,
                                                                   tmp_path: Path) -> None:
    (tmp_path / "kept").mkdir()
    status, _, err = run(capsys, "infer", "--model", "failing", "--models-dir",
                         str(TEST_MODELS), str(PLATE), str(tmp_path / "kept" / "o.exr"))
    assert status == 1 and (tmp_path / "kept").is_dir(), err
    status, _, err = run(capsys, "infer", "--model", "blur", str(PLATE),
                         str(tmp_path / "new" / "deeper" / "o.exr"))
    assert status == 0, err
    assert (tmp_path / "new" / "deeper" / "o.exr").is_file()


def test_infer_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["infer", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model NAME the model to run, e.g. blur (`dlserver models` lists them" in text
    assert "--token-file FILE" in text and "--tls-ca FILE" in text
    parser = cli.build_parser()
    infer = parser._subparsers._group_actions[0].choices["infer"]  # type: ignore[union-attr]
    for action in infer._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help text"


# --- item 10: the token out of ps; where to give it ------------------------------------------

def test_token_on_the_command_line_warns(capsys) -> None:
    status, _, err = run(capsys, "models", "--server", "127.0.0.1:9", "--token", "x")
    assert status == 1
    assert "warning: --token on the command line is visible to every user" in err
    assert "--token-file FILE or DLSERVER_TOKEN" in err


def test_token_file_and_environment_do_not_warn(capsys, tcp_server: TcpServer,
                                                tmp_path: Path, monkeypatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(tcp_server.token + "\n")
    token_file.chmod(stat.S_IRUSR)
    server = f"127.0.0.1:{tcp_server.port}"
    status, out, err = run(capsys, "models", "--server", server, "--token-file",
                           str(token_file))
    assert status == 0, err
    assert "identity" in out and "warning" not in err
    monkeypatch.setenv("DLSERVER_TOKEN", tcp_server.token)
    status, out, err = run(capsys, "models", "--server", server)
    assert status == 0 and "identity" in out and "warning" not in err, err


def test_a_missing_token_says_where_to_give_it(capsys, tcp_server: TcpServer) -> None:
    status, _, err = run(capsys, "models", "--server", f"127.0.0.1:{tcp_server.port}")
    assert status == 1
    assert f"the server at 127.0.0.1:{tcp_server.port} needs a token" in err
    for way in ("--token-file FILE", "DLSERVER_TOKEN", "--token TOKEN"):
        assert way in err


def test_a_wrong_token_file_is_refused_with_the_same_advice(capsys, tcp_server: TcpServer,
                                                            tmp_path: Path) -> None:
    (tmp_path / "token").write_text("wrong\n")
    status, _, err = run(capsys, "models", "--server", f"127.0.0.1:{tcp_server.port}",
                         "--token-file", str(tmp_path / "token"))
    assert status == 1
    assert "refused the token" in err and "--token-file FILE" in err


@pytest.mark.parametrize("content, fragment", [(None, "No such file"), ("\n", "is empty")])
def test_a_bad_token_file_is_named(capsys, tmp_path: Path, content, fragment) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    status, _, err = run(capsys, "models", "--server", "127.0.0.1:9", "--token-file", str(path))
    assert status == 1
    assert f"--token-file {str(path)!r}" in err and fragment in err


def test_token_file_and_token_together_are_refused(capsys, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    status, _, err = run(capsys, "models", "--server", "127.0.0.1:9", "--token", "t",
                         "--token-file", str(tmp_path / "token"))
    assert status == 1 and "not both" in err

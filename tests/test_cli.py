"""The `mm1data` command fails fast, before Ray starts, with a message naming what is wrong."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm1data.cli import main


@pytest.fixture
def urls(tmp_path):
    p = tmp_path / "in.parquet"
    pq.write_table(pa.table({"url": ["http://example.invalid/a.jpg"], "caption": ["a cat"]}), p)
    return str(p)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--set", "download.timeout=5"], "unknown config key 'download.timeout'"),
        (["--set", "filters=[{name: nope}]"], "unknown filter 'nope'"),
        (["--set", "filters=no_such_preset"], "filter chain not found"),
        (["--set", "input.url_col=link"], "input column 'link' not found"),
        (["--set", "clip.enabled=false", "--set", "filters=caption_laion"], "needs clip.enabled"),
    ],
)
def test_bad_config_exits_2_naming_it(urls, tmp_path, capsys, extra, message):
    assert main(["run", "pipelines/caption.yaml", "--input", urls, "--output", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "index.json").exists()


def test_unreadable_input_and_missing_flags(tmp_path, capsys):
    assert main(["run", "pipelines/caption.yaml", "--input", str(tmp_path / "none"), "--output", str(tmp_path)]) == 2
    assert "no input files found at" in capsys.readouterr().err
    assert main(["run", "pipelines/caption.yaml", "--output", str(tmp_path)]) == 2
    assert "--input" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml"), "--input", "x", "--output", "y"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_version_and_help_teach(capsys):
    import mm1data

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mm1data {mm1data.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "webdataset tar" in out and "mm1data demo" in out and "subcommands in one dict" not in out
    for command in ("run", "report", "config", "manifest", "train", "demo"):
        assert command in out


def test_run_help_lists_pipelines_presets_and_keys(capsys):
    from mm1data.cli import MAIN_KEYS
    from mm1data.pipelines import load_run_config

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "caption, interleaved, text" in out and "caption_datacomp" in out and "interleaved_obelics" in out
    for kind, keys in MAIN_KEYS.items():  # every key the help names exists in that kind's config
        _, cfg = load_run_config(kind)
        for key in keys.split(", "):
            assert key in out
            obj = cfg
            for part in key.split("."):
                assert hasattr(obj, part), f"{kind}: {key}"
                obj = getattr(obj, part)


def test_config_show_prints_every_default_and_runs_back(tmp_path, capsys):
    from mm1data.pipelines import load_run_config

    assert main(["config", "show", "pipelines/caption.yaml", "--set", "download.timeout_s=5"]) == 0
    text = capsys.readouterr().out
    assert "timeout_s: 5.0" in text and "max_redirects: 5" in text  # a default the YAML does not spell out
    assert "- name: caption_words\n  min: 3.0" in text  # the preset's chain, inline
    shown = tmp_path / "shown.yaml"
    shown.write_text(text)
    _, again = load_run_config(str(shown))
    _, direct = load_run_config("pipelines/caption.yaml", ["download.timeout_s=5"])
    assert again.download == direct.download and again.clip == direct.clip
    assert main(["config", "show", "text", "--set", "nope=1"]) == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err


def test_progress_lines_without_a_terminal(caplog, monkeypatch):
    import io
    import logging

    from mm1data import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())  # no terminal: log lines, not a bar
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="mm1data.progress"):
        bar = progress.Progress("staging", total=400)
        now[0] = 110.0
        bar.update(100)  # at 10 s: 100 of 400 at 10 rows/s, 30 s to go
        now[0] = 120.0
        bar.update(100)
    assert caplog.messages[0] == "staging: 100/400 rows (25%) in 0:10, 10.0 rows/s, ETA 0:30"
    assert caplog.messages[1] == "staging: 200/400 rows (50%) in 0:20, 10.0 rows/s, ETA 0:20"
    assert progress.StageSummary("dedup", 1000, 900, 2.0).line().split() == (
        "dedup 1,000 in 900 kept 2.0 s 500 rows/s".split()
    )


def test_shipped_manifest_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # from any directory: its relative indexes resolve beside it, then here
    assert main(["manifest", "check", "mm1"]) == 2
    err = capsys.readouterr().err
    assert "source 'interleaved'" in err and str(tmp_path / "data" / "interleaved" / "index.json") in err


def test_verbose_before_or_after_the_command():
    from mm1data.cli import build_parser

    p = build_parser()
    assert p.parse_args(["-v", "run", "x"]).verbose and p.parse_args(["run", "x", "--verbose"]).verbose
    assert not p.parse_args(["run", "x"]).verbose

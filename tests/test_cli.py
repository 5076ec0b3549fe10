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

import subprocess
import sys

import pytest

from epiray.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([name, "--help"])
    assert e.value.code == 0
    assert name in capsys.readouterr().out


def test_errors_are_one_message_and_status_2(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("epiray info: error: store") and "not an epiray store" in err
    assert "Traceback" not in err


def test_ingest_quick_form_needs_both(capsys):
    assert main(["ingest", "--manifest", "m.tsv"]) == 2
    assert "--manifest M and --store S" in capsys.readouterr().err


def test_bad_config_names_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("manifest: m.tsv\nstore: s\ndtype: float64\nchromz: [chr1]\n")
    assert main(["ingest", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "chromz: unknown key" in err and "dtype" in err


def test_synth_then_info_console_script(tmp_path):
    out = tmp_path / "syn"
    r = subprocess.run(
        [sys.executable, "-m", "epiray.cli", "synth", "--out", str(out), "--preset", "tiny"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "mouse mmSyn1" in r.stdout and (out / "manifest.tsv").is_file()
    r = subprocess.run(
        [sys.executable, "-m", "epiray.cli", "synth", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "not empty" in r.stderr

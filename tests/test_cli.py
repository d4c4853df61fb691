"""The command tree: installed entry point, info, smoke-test, one-line errors."""

from __future__ import annotations

import subprocess

from llm_modules.cli import main


def test_console_script_is_installed():
    result = subprocess.run(["llm-modules", "--help"], capture_output=True, text=True, check=True)
    assert "smoke-test" in result.stdout and "info" in result.stdout


def test_smoke_test_composes_trains_generates_and_reloads(tmp_path, capsys):
    assert main(["smoke-test", "--steps", "3", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reloaded model generates the same tokens: True" in out
    assert (tmp_path / "combined" / "model.safetensors").is_file()


def test_info_on_a_saved_model_and_a_bad_dir(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "combined")
    assert main(["info", "--model", str(tmp_path / "combined")]) == 0
    assert "bridge" in capsys.readouterr().out
    assert main(["info", "--large", str(tmp_path)]) == 2
    assert "give both --large and --small" in capsys.readouterr().err
    assert main(["info", "--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "Traceback" not in err

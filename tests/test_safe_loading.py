"""Safe loading: no code path can execute code from a file it reads.

- The source never calls torch.load without weights_only=True, never uses pickle / eval / exec /
  yaml.load / numpy's allow_pickle=True / trust_remote_code.
- A config file is data (JSON or TOML): odd content is refused or taken literally, never run.
- Artifacts written by an incompatible version (format_version in meta.json / config.json /
  histodiffusion.json) are refused with a message naming the file (the CLI cases are in
  tests/test_bad_input_matrix.py; here the readers are called directly).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from histodiffusion.runtime.config import PretrainConfig, SampleConfig, config_from_dict
from histodiffusion.runtime.configtypes import load_config_file
from histodiffusion.runtime.errors import HistoError

SRC = Path(__file__).resolve().parents[1] / "src" / "histodiffusion"


def _calls(text: str, name: str):
    """The argument text of every call `name(...)` in `text` (balanced parentheses)."""
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        yield text[m.end():i - 1]


def _code_lines(text: str) -> str:
    """Source without comments and docstring-ish lines (a rough filter good enough for a scan)."""
    out = []
    for line in text.splitlines():
        code = line.split("#", 1)[0]
        out.append(code)
    return "\n".join(out)


def test_source_has_no_unsafe_loading():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        text = _code_lines(path.read_text(encoding="utf-8"))
        rel = path.relative_to(SRC.parent)
        for args in _calls(text, "torch.load"):
            if "weights_only=True" not in args.replace(" ", ""):
                problems.append(f"{rel}: torch.load({args}) without weights_only=True")
        for pattern, what in [(r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve|marshal)\b", "pickle-like import"),
                              (r"\bpickle\.", "pickle use"), (r"(?<![\w.])eval\(", "eval("),
                              (r"(?<![\w.])exec\(", "exec("), (r"\byaml\.(unsafe_)?load\(", "yaml.load("),
                              (r"allow_pickle\s*=\s*True", "allow_pickle=True"),
                              (r"trust_remote_code\s*=\s*True", "trust_remote_code=True"),
                              (r"(?<![\w.])__import__\(", "__import__(")]:
            for m in re.finditer(pattern, text, flags=re.M):
                line = text[:m.start()].count("\n") + 1
                problems.append(f"{rel}:{line}: {what}")
    assert problems == []


def test_scan_catches_what_it_looks_for():
    """The scan is not vacuous: it flags the patterns in a sample text."""
    bad = "import pickle\nx = torch.load(p, map_location='cpu')\ny = eval('1')\nm.eval()\n"
    assert [a for a in _calls(bad, "torch.load")] == ["p, map_location='cpu'"]
    assert re.search(r"(?<![\w.])eval\(", "m.eval()") is None and re.search(r"(?<![\w.])eval\(", bad)


def test_toml_config_with_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'steps = "__import__(\'os\').system(\'touch {marker}\')"\n')
    with pytest.raises(HistoError, match="steps .* must be an integer"):
        config_from_dict(PretrainConfig, load_config_file(cfg))
    assert not marker.exists()


def test_json_config_strings_are_taken_literally(tmp_path):
    cfg = tmp_path / "c.json"
    odd = "$(touch pwned); `rm -rf /`; {{7*7}}"
    cfg.write_text(json.dumps({"out": odd, "scheduler": "ddim"}))
    c = config_from_dict(SampleConfig, load_config_file(cfg))
    assert c.out == odd and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text,match", [
    ('{"__class__": "os.system"}', "unknown config field"),
    ('{"steps": {"__reduce__": "os.system"}}', "must be an integer"),
    ('!!python/object/apply:os.system ["touch x"]', "not valid JSON"),
    ("[1, 2, 3]", "must be a mapping"),
])
def test_odd_config_files_refused(tmp_path, text, match):
    cfg = tmp_path / "c.json"
    cfg.write_text(text)
    with pytest.raises(HistoError, match=match):
        config_from_dict(PretrainConfig, load_config_file(cfg))


def test_yaml_config_file_is_not_parsed_as_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(HistoError, match="not valid JSON"):
        load_config_file(cfg)


# --------------------------------------------------------------------------------------------
# Incompatible format versions
# --------------------------------------------------------------------------------------------
def _bump(path: Path, version=999) -> None:
    d = json.loads(path.read_text())
    d["format_version"] = version
    path.write_text(json.dumps(d))


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    from helpers_sample import make_guided_chain

    return make_guided_chain(tmp_path_factory.mktemp("fmt"), n=10)


def _copy(src, dst):
    return Path(shutil.copytree(src, dst))


def test_dataset_of_other_version_refused(arts, tmp_path):
    from histodiffusion.data.datasets import PixelDataset

    d = _copy(arts["data"], tmp_path / "d")
    _bump(d / "meta.json")
    with pytest.raises(HistoError, match=r"meta.json has format_version 999"):
        PixelDataset(d)


def test_latent_cache_of_other_version_refused(arts, tmp_path):
    from histodiffusion.data.datasets import LatentDataset

    c = _copy(arts["cache"], tmp_path / "c")
    _bump(c / "meta.json", None)
    with pytest.raises(HistoError, match=r"meta.json has format_version None"):
        LatentDataset(c)


def test_model_folders_of_other_version_refused(arts, tmp_path):
    from histodiffusion.models.latent_classifier import load_latent_classifier
    from histodiffusion.models.unet import load_ldm

    clf = _copy(arts["clf"], tmp_path / "clf")
    _bump(clf / "histodiffusion.json")
    with pytest.raises(HistoError, match=r"histodiffusion.json has format_version 999"):
        load_latent_classifier(clf)
    ldm = _copy(arts["ldm"], tmp_path / "ldm")
    _bump(ldm / "histodiffusion.json")
    with pytest.raises(HistoError, match=r"histodiffusion.json has format_version 999"):
        load_ldm(ldm)


def test_run_directory_of_other_version_refused(tmp_path):
    from histodiffusion.runtime.rundirs import start_run_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"format_version": 999, "stage": "pretrain", "config": {}}))
    with pytest.raises(HistoError, match=r"config.json has format_version 999"):
        start_run_dir(out, PretrainConfig(), "pretrain")

"""Every command in the README and in docs/methods/ composes (as ``--cfg job`` would), and a
train command's model/data pair is one the model accepts: the docs cannot drift from the
configs. Multirun sweeps compose with the first value of each swept key; ``<placeholders>``
stand for paths the user fills in."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from latentzoo.ensemble.members import ensemble_argv
from latentzoo.fid import build_parser as fid_parser
from latentzoo.utils.compat import check_pair
from tests.conftest import ROOT, compose_config

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "methods").glob("*.md"))]
# entry point -> (config name, does it train)
HYDRA_ENTRIES = {
    "train.py": ("train", True),
    "latentzoo-train": ("train", True),
    "eval.py": ("eval", False),
    "latentzoo-eval": ("eval", False),
    "latentzoo.cache_latents": ("cache_latents", False),
    "latentzoo.import_lfm": ("import_lfm", False),
    "latentzoo-import-lfm": ("import_lfm", False),
}


def doc_commands(path: Path) -> list[str]:
    """Shell commands in fenced code blocks and in inline code spans that start a program."""
    text = path.read_text()
    commands: list[str] = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        commands += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += re.findall(r"`((?:python|latentzoo-|srun|torchrun)[^`]*)`", prose)
    out = []
    for line in commands:
        line = re.sub(r"<[^<>]+>", lambda m: m.group(0).replace(" ", "_"), line)  # one word
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                out.append(" ".join(shlex.quote(w) for w in words))
    return out


def _placeholders(word: str) -> str:
    return re.sub(r"<[^<>]+>", "x", word)


def first_of_sweeps(overrides: list[str]) -> list[str]:
    """``model.beta=1,4`` -> ``model.beta=1`` (compose takes one job of the multirun)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    result = []
    for override, text in zip(parsed, overrides, strict=True):
        if override.is_sweep_override():
            key = text.split("=", 1)[0]
            text = f"{key}={next(override.sweep_string_iterator())}"
        result.append(text)
    return result


def hydra_call(words: list[str]) -> tuple[str, bool, list[str]] | None:
    """(config name, trains, overrides) of a Hydra entry point in ``words``, else None."""
    for i, word in enumerate(words):
        entry = HYDRA_ENTRIES.get(Path(word).name) or HYDRA_ENTRIES.get(word)
        if entry is None:
            continue
        # a template word (``<group>=<option>``, a bare ``...``) stands for "any override"
        args = [w for w in words[i + 1 :] if w != "..." and not w.startswith("<")]
        skip = {"-m", "--multirun", "--cfg", "job"}
        overrides = [_placeholders(a) for a in args if a not in skip and not a.startswith("--")]
        if entry[1]:  # train.py reads the ensemble's shorthands as its own main() does
            overrides = ensemble_argv(overrides)
        return entry[0], entry[1], overrides
    return None


def collect_eval_overrides(words: list[str]) -> list[str] | None:
    """The eval overrides of ``python -m latentzoo.collect ... --eval OVERRIDES``."""
    if "latentzoo.collect" not in words and "latentzoo-collect" not in words:
        return None
    if "--eval" not in words:
        return None
    after = words[words.index("--eval") + 1 :]
    end = next((i for i, w in enumerate(after) if w.startswith("--")), len(after))
    return [_placeholders(w) for w in after[:end]] + ["ckpt_path=x.ckpt"]


CASES = [(path.relative_to(ROOT), command) for path in DOCS for command in doc_commands(path)]


def test_the_docs_have_commands() -> None:
    per_file = {path: sum(1 for p, _ in CASES if p == path.relative_to(ROOT)) for path in DOCS}
    assert len(DOCS) >= 8 and all(n >= 3 for n in per_file.values()), per_file


@pytest.mark.parametrize(("doc", "command"), CASES, ids=[f"{p}:{c[:60]}" for p, c in CASES])
def test_doc_command_composes(doc: Path, command: str, tmp_path: Path) -> None:
    words = shlex.split(command)
    bare_name = len(words) == 1 or (words[:2] == ["python", "-m"] and len(words) == 3)
    if bare_name and "train.py" not in words and "eval.py" not in words:
        pytest.skip("a program's name in prose, not a command")
    if any(w.startswith(("--config-dir", "hydra.searchpath")) for w in words):
        pytest.skip("needs the user's own config folder (tests/test_wheel.py runs one)")
    if Path(words[0]).name == "latentzoo-fid" or words[:3] == ["python", "-m", "latentzoo.fid"]:
        fid_parser().parse_args(
            [_placeholders(w) for w in words[1 if words[0] != "python" else 3 :]]
        )
        return
    call = hydra_call(words)
    if call is None:
        eval_overrides = collect_eval_overrides(words)
        if eval_overrides is None:
            pytest.skip("not a Hydra command")
        call = ("eval", False, eval_overrides)
    config_name, trains, overrides = call
    cfg = compose_config(config_name, first_of_sweeps(overrides), tmp_path)
    if trains:
        check_pair(cfg)

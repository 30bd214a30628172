"""The fuzz targets (tests/fuzz_support, scripts/fuzz.sh) kept working: corpus, short campaigns, mutants.

- Every corpus input (hand-made seeds, what campaigns found, the inputs of fixed crashes) passes its
  target in process: a regression of any fixed crash fails here, by name of the input.
- Each target catches a planted bug (fuzz_support.mutants) on that corpus: a target whose properties
  stopped checking anything would pass the replay but fail this.
- A short campaign (2 s, atheris under libFuzzer, as scripts/fuzz.sh runs it) of each target finds
  nothing, and a short campaign of a target with a planted bug exits 1 with the crash file written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_support import TARGETS
from fuzz_support.mutants import MUTANTS

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
FUZZ = ROOT / "scripts" / "fuzz.sh"
CAMPAIGN_SECONDS = 2


def corpus(target: str) -> list[Path]:
    files = sorted((CORPUS / target).iterdir())
    assert files, f"the {target} corpus is empty"
    return files


def target_module(target: str):
    import importlib

    return importlib.import_module(TARGETS[target].module)


def test_every_target_has_a_corpus_a_mutant_and_fuzz_sh_knows_it():
    assert set(MUTANTS) == set(TARGETS)
    listed = subprocess.run([str(FUZZ), "--list"], capture_output=True, text=True, check=True).stdout.split()
    assert listed == list(TARGETS)
    size = sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file())
    assert size < 2 << 20, f"the corpus is {size} bytes: minimise it (scripts/fuzz.sh --merge TARGET)"


@pytest.mark.parametrize("target", list(TARGETS))
def test_corpus_passes(target):
    one_input = target_module(target).one_input
    for path in corpus(target):
        try:
            one_input(path.read_bytes())
        except Exception as e:
            raise AssertionError(f"{path.relative_to(ROOT)}: {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("target", list(TARGETS))
def test_target_catches_its_planted_bug(target, monkeypatch, caplog):
    one_input = target_module(target).one_input
    obj, attribute, value = MUTANTS[target]
    monkeypatch.setattr(obj, attribute, value)
    failing = []
    for path in corpus(target):
        try:
            one_input(path.read_bytes())
        except Exception:
            failing.append(path.name)
    assert failing, f"no {target} corpus input notices the planted bug {MUTANTS[target][1]}"


def _start_campaign(target: str, work: Path, mutant: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "XENBLK_FUZZ_WORK": str(work), "XENBLK_PYTHON": sys.executable}
    env.pop("XENBLK_FUZZ_MUTANT", None)
    if mutant:
        env["XENBLK_FUZZ_MUTANT"] = mutant
    return subprocess.Popen([str(FUZZ), target, str(CAMPAIGN_SECONDS)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_short_campaigns(tmp_path):
    """Every target's campaign finds nothing; the config target's, with its planted bug, fails.

    All at once (libFuzzer's time limit is wall time): the seven cost about one's start-up.
    """
    runs = {target: _start_campaign(target, tmp_path / "clean") for target in TARGETS}
    broken = _start_campaign("config", tmp_path / "broken", mutant="config")
    for target, run in runs.items():
        out, err = run.communicate(timeout=180)
        summary = out.strip().splitlines()[-1] if out.strip() else ""
        log = (tmp_path / "clean" / target / "last.log").read_text(errors="replace")
        assert run.returncode == 0, f"{summary}\n{err}\n{log[-3000:]}"
        execs = int(re.search(r"execs (\d+)", summary).group(1))
        assert execs > len(corpus(target)), summary  # past the corpus: it ran inputs of its own
        assert "crashes 0" in summary and not list((tmp_path / "clean" / target / "crashes").iterdir())
    out, err = broken.communicate(timeout=180)
    assert broken.returncode == 1, out + err
    crashes = list((tmp_path / "broken" / "config" / "crashes").iterdir())
    assert len(crashes) == 1 and crashes[0].name.startswith("crash-"), crashes
    assert "crashes 1" in out and "ValueError" in (tmp_path / "broken" / "config" / "last.log").read_text()

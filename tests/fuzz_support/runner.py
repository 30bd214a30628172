"""Run one fuzz target under atheris: python -m fuzz_support.runner TARGET [libFuzzer options] [CORPUS_DIR...].

    python -m fuzz_support.runner --write-seeds TARGET DIR     the target's hand-made seeds into DIR

scripts/fuzz.sh is the interface (it picks the corpus and work directories and prints the summary);
this module only instruments the code under test, imports the target and hands over to libFuzzer.
Options and directories are libFuzzer's own (-max_total_time=S, -runs=N, -merge=1, ...): new inputs go
to the first directory, the others are read as seeds.

XENBLK_FUZZ_MUTANT=NAME applies one of fuzz_support.mutants' planted bugs first (tests/test_fuzz.py
shows that a campaign fails on it).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys

import atheris

from . import TARGETS


def write_seeds(name: str, directory: str) -> int:
    """The target's hand-made seeds into directory (named by content, as libFuzzer names inputs)."""
    module = importlib.import_module(TARGETS[name].module)
    os.makedirs(directory, exist_ok=True)
    count = 0
    for seed in module.seeds():
        with open(os.path.join(directory, hashlib.sha1(seed).hexdigest()), "wb") as f:
            f.write(seed)
        count += 1
    return count


def main(argv: list[str]) -> None:
    if len(argv) == 4 and argv[1] == "--write-seeds":
        print(f"{argv[2]}: {write_seeds(argv[2], argv[3])} seeds in {argv[3]}")
        return
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} TARGET [libFuzzer options] [CORPUS_DIR...]; targets: {', '.join(TARGETS)}")
    target = TARGETS[argv[1]]
    with atheris.instrument_imports(include=list(target.instrument)):
        module = importlib.import_module(target.module)
    mutant = os.environ.get("XENBLK_FUZZ_MUTANT")
    if mutant:
        from .mutants import apply

        apply(mutant)
    atheris.Setup([argv[0], *argv[2:]], module.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)

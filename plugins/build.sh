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
# The same example rule in C, JavaScript and Python (GUESTS below) is built
# with the toolchains of plugins/toolchain.sh: clang + wasi-libc (apt) with
# wit-bindgen-cli (crates.io), componentize-qjs (npm), componentize-py (PyPI).
# Those, and wasm-tools when not on PATH, install into plugins/target/tools
# ($SLUICE_TOOLS) on first use; SLUICE_GUEST_LANGS="c js python" (the default)
# limits which languages are built.
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
        -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
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
    "shaped             shaped                rule"
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

# The example rule in the other guest languages. None may import WASI.
# name             language  sources (under plugins/)
GUESTS=(
    "three-fields-c    c         rules/three-fields-c/rule.c"
    "three-fields-js   js        rules/three-fields-js/rule.js"
    "three-fields-py   python    rules/three-fields-py/app.py"
)
# The C, JavaScript and Python guests stay on interface 0.1.0 (the host
# serves both); the Rust SDK, and so every cargo-built component but
# `ungranted` (its own bindings), targets 0.2.0.
WIT_DIR="$repo/wit/sluice-router@0.1.0"

say() { tc_say "$@"; }
die() { printf 'build.sh: %s\n' "$*" >&2; exit 1; }

# Every install and build recipe lives in toolchain.sh, which the build
# scripts of `sluice new rule` skeletons embed too.
SLUICE_TOOLS="${SLUICE_TOOLS:-$plugins/target/tools}"
# shellcheck source=plugins/toolchain.sh
source "$plugins/toolchain.sh"

pick_toolchain() {
    tc_rust
    TOOLCHAIN="$RUST_TOOLCHAIN"
    TARGET="$RUST_TARGET"
    if [ "$TOOLCHAIN" = rustup ]; then
        TARGET_DIR="$plugins/target"
    else
        # Its own target dir: sharing one with rustup's toolchain would make
        # each toolchain rebuild everything the other one built.
        TARGET_DIR="$plugins/target/apt"
    fi
}

cargo_build() {
    local args=(--release --locked --target-dir "$TARGET_DIR")
    for p in "$@"; do args+=(-p "$p"); done
    tc_cargo "$plugins" build "${args[@]}"
}

# Replace $2 by $1 only when the bytes differ; consumes $1.
publish() {
    if cmp -s "$1" "$2"; then rm -f "$1"; return 1; fi
    mv -f "$1" "$2"
}

# --- verification -------------------------------------------------------------
# Imports and exports of a component's world, one per line, as "import X" /
# "export X": an interface by its full name, a function or inline interface
# by its plain name.
world_items() {
    "$WASM_TOOLS" component wit "$1" | awk '
        /^world / { inside = 1; next }
        inside && /^}/ { exit }
        inside && /^  (import|export) / {
            name = $2; sub(/[:;]$/, "", name); print $1 " " name
        }'
}

# The interface versions the host serves; a component must export the
# classifier of one of them and import sluice:router interfaces of that one.
SERVED_VERSIONS="0.1.0 0.2.0"

verify() { # name file role [language]
    local name="$1" file="$2" role="$3" lang="${4:-rust}" items problems=()
    items="$(world_items "$file")" || die "$name: wasm-tools cannot read $file"
    local exports imports extra
    exports="$(sed -n 's/^export //p' <<<"$items")"
    imports="$(sed -n 's/^import //p' <<<"$items")"
    # The toolchains' own pre-initialisation entry points, which they run at
    # build time (Wizer) and leave exported; the host never calls them.
    case "$lang" in
        js) extra="init" ;;
        python) extra="exports" ;;
        *) extra="" ;;
    esac
    local e version="" v
    while IFS= read -r e; do
        [ -z "$e" ] && continue
        v="${e#sluice:router/classifier@}"
        if [ "$v" != "$e" ] && [[ " $SERVED_VERSIONS " == *" $v "* ]] && [ -z "$version" ]; then
            version="$v"
        elif [ -n "$extra" ] && [ "$e" = "$extra" ]; then :
        else problems+=("exports $e besides one sluice:router/classifier"); fi
    done <<<"$exports"
    [ -n "$version" ] || problems+=("exports no sluice:router/classifier of $SERVED_VERSIONS")
    local evil=0 i
    while IFS= read -r i; do
        [ -z "$i" ] && continue
        case "$i" in
            "sluice:router/types@$version" | "sluice:router/log@$version" | \
                "sluice:router/config@$version") ;;
            wasi:*) [ "$lang" = rust ] && [ "$TOOLCHAIN" = rustup ] ||
                problems+=("imports $i from a no-WASI build") ;;
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
    own="$(grep -v '^wasi:' <<<"$imports" | sed -E 's/@[0-9.]+$//' | paste -sd ' ' -)"
    wasi="$(grep -c '^wasi:' <<<"$imports" || true)"
    IMPORT_SUMMARY="@$version $own"
    [ "$wasi" -gt 0 ] && IMPORT_SUMMARY="$IMPORT_SUMMARY + $wasi wasi:*"
    return 0
}

# Builds one GUESTS entry into $out/<name>.wasm unless the component is newer
# than its sources, the WIT and the toolchain recipe.
build_guest() { # name language source
    local name="$1" lang="$2" src="$plugins/$3" dest="$out/$1.wasm"
    if [ -f "$dest" ] && [ -z "$(find "$src" "$WIT_DIR" "$plugins/toolchain.sh" \
        -newer "$dest" -print -quit)" ]; then
        return 0
    fi
    local tmp="$dest.tmp.$$.wasm" started=$SECONDS
    case "$lang" in
        c) tc_c; tc_build_c "$WIT_DIR" rule "$tmp" "$src" ;;
        js) tc_js; tc_build_js "$WIT_DIR" rule "$tmp" "$src" ;;
        python)
            tc_python
            tc_build_py "$WIT_DIR" rule "$tmp" "$(dirname "$src")" "$(basename "$src" .py)"
            ;;
        *) die "$name: unknown language $lang" ;;
    esac
    say "built out/$name.wasm ($lang) in $((SECONDS - started)) s"
    publish "$tmp" "$dest" || touch "$dest"
}

# --- main ---------------------------------------------------------------------
pick_toolchain
tc_wasm_tools
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

langs=" ${SLUICE_GUEST_LANGS-c js python} "
for g in "${GUESTS[@]}"; do
    read -r name lang src <<<"$g"
    if [[ "$langs" != *" $lang "* ]]; then
        rm -f "$out/$name.wasm"
        rows+=("$(printf '%-20s %10s  %s' "$name" "-" "skipped: $lang not in SLUICE_GUEST_LANGS")")
        continue
    fi
    build_guest "$name" "$lang" "$src"
    IMPORT_SUMMARY=""
    if verify "$name" "$out/$name.wasm" rule "$lang"; then status="ok"; else status="FAILED"; failed=1; fi
    size="$(stat -c %s "$out/$name.wasm")"
    rows+=("$(printf '%-20s %10s  %-6s imports: %s (%s)' "$name" "$size" "$status" "$IMPORT_SUMMARY" "$lang")")
done

# Which toolchain built plugins/out: tests read it to know which fixtures
# must exist (wasi-probe only with real WASI).
echo "$TOOLCHAIN" > "$out/TOOLCHAIN"

echo
echo "components in plugins/out ($TOOLCHAIN, $TARGET), each exporting sluice:router/classifier@<version>:"
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

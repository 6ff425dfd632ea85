#!/usr/bin/env bash
# Checks that `cargo build --release --features cuda` compiles AND links on a machine with no GPU and
# no CUDA install, using only NVIDIA's wheels from PyPI, then inspects what the binary needs at run time.
#
#   scripts/check-cuda-build.sh               set up, build target/cuda/release/tokenscope, check it
#   scripts/check-cuda-build.sh --no-build    set up and check the binary already built there
#   scripts/check-cuda-build.sh --print-env   set up, print the environment as `export` lines, stop
#                                             (eval "$(scripts/check-cuda-build.sh --print-env)" && cargo ...)
#
# Idempotent: the wheels go into the git-ignored .venv-cuda/ once (reinstalled only when the pins below
# change), the symlinks and the libcuda stub are recreated in place, and the build has its own target dir
# (target/cuda) so it never invalidates the CPU build in target/.
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200), PYTHON (default python3), CC (default cc).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "check-cuda-build: $*" >&2; }
die() { say "error: $*"; exit 1; }

MODE=build
case "${1:-}" in
  "") ;;
  --no-build) MODE=no-build ;;
  --print-env) MODE=print-env ;;
  *) die "unknown argument '$1' (expected --no-build or --print-env)" ;;
esac

VENV="$PWD/.venv-cuda"
PYTHON="${PYTHON:-python3}"
COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

# CUDA 13.0 Update 2: the versions the PyPI meta-package cuda-toolkit==13.0.3.0 pins.
# Why 13.0 and not the newest 13.x:
#  - candle embeds its kernels as PTX and the driver JIT-compiles them when they are loaded. A driver
#    only JITs PTX of an ISA version it knows: nvcc 13.0 writes `.version 9.0`, which the R580 driver
#    (CUDA 13.0; 580.159 on this workplace's H100/H200 machines) accepts; nvcc 13.4 writes `.version 9.4`,
#    which that driver refuses (CUDA_ERROR_UNSUPPORTED_PTX_VERSION) although the build itself succeeds.
#  - cudarc binds the driver API of the CUDA version it is told (CUDARC_CUDA_VERSION below); binding 13.0
#    means the binary only imports libcuda symbols that an R580 driver exports. The binary is linked with
#    -z now (Rust's default full RELRO), so a single missing symbol would stop it from starting at all.
#  - cudarc 0.19 knows CUDA up to 13.4, so no version override has to pretend to be something it isn't.
# The cu13 wheels all install into one tree, site-packages/nvidia/cu13/{bin,include,lib,nvvm}, laid
# out like a CUDA toolkit, which is what lets CUDA_ROOT point at it. (The -cu12 nvcc wheels ship only
# ptxas, not nvcc, so they cannot build candle's kernels.)
CUDA_VERSION_FOR_CUDARC=13000
WHEELS=(
  nvidia-cuda-nvcc==13.0.88     # nvcc, cudafe++, ptxas, fatbinary, nvlink (candle-kernels' build.rs runs nvcc)
  nvidia-nvvm==13.0.88          # cicc + libdevice, nvcc's device front end
  nvidia-cuda-crt==13.0.88      # include/crt/*.h, which nvcc's generated code includes
  nvidia-cuda-cccl==13.0.85     # include/cccl (libcu++/CUB/Thrust), on nvcc's default include path
  nvidia-cuda-runtime==13.0.96  # include/cuda.h, cuda_runtime.h...; lib/libcudart.so.13 (-lcudart)
  nvidia-cuda-nvrtc==13.0.88    # lib/libnvrtc.so.13 (-lnvrtc)
  nvidia-cublas==13.1.1.3       # lib/libcublas.so.13, lib/libcublasLt.so.13 (-lcublas -lcublasLt)
  nvidia-curand==10.4.0.35      # lib/libcurand.so.10 (-lcurand)
)
# What the final link asks for: cudarc (features driver, nvrtc, curand, cublas, cublaslt +
# dynamic-linking, as candle-core and float8 enable it) emits -lcuda -lnvrtc -lcurand -lcublas -lcublasLt;
# candle-kernels' build.rs emits -lcudart (for its MoE static library) and -lstdc++.
LINKED_LIBS=(cudart nvrtc curand cublas cublasLt)

# --- 1. The wheels, in a git-ignored venv -------------------------------------------------------------
stamp="$VENV/.cuda-wheels"
wanted="$(printf '%s\n' "${WHEELS[@]}")"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  say "CUDA wheels present in $VENV"
else
  say "installing the CUDA 13.0 wheels into $VENV (about 1.2 GB unpacked, mostly cuBLASLt) ..."
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: "${WHEELS[@]}"
  printf '%s\n' "$wanted" >"$stamp"
fi

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CUDA_ROOT="$SITE/nvidia/cu13"
CUDA_LIB="$CUDA_ROOT/lib"
[ -x "$CUDA_ROOT/bin/nvcc" ] || die "no nvcc at $CUDA_ROOT/bin/nvcc after installing the wheels"
[ -f "$CUDA_ROOT/include/cuda.h" ] || die "no cuda.h at $CUDA_ROOT/include"

# --- 2. Unversioned names for the linker ----------------------------------------------------------------
# The wheels ship only the run-time names (libcublas.so.13 ...); `-lcublas` looks for libcublas.so, the
# name a toolkit's -dev package would add. The links go next to the real files, in $CUDA_ROOT/lib, which
# cudarc's build.rs already passes to the linker (it adds $CUDA_ROOT/lib and $CUDA_ROOT/lib/stubs when
# they exist); cargo hands every dependency's link-search paths to the final link, so candle-kernels'
# bare -lcudart is found there too. Same directory also keeps libcublas.so.13's RPATH $ORIGIN working
# when ld looks for its own dependency libcublasLt.so.13.
for name in "${LINKED_LIBS[@]}"; do
  found=()
  for f in "$CUDA_LIB/lib$name.so."*; do
    # Exactly libNAME.so.<major>: not libnvrtc.alt.so.13, not libnvrtc-builtins.so.13.0, not libcublasLt.
    if [[ "$(basename "$f")" =~ ^lib${name}\.so\.[0-9]+$ ]]; then found+=("$f"); fi
  done
  [ "${#found[@]}" -eq 1 ] || die "expected one lib$name.so.<major> in $CUDA_LIB, found: ${found[*]:-none}"
  ln -sfn "$(basename "${found[0]}")" "$CUDA_LIB/lib$name.so"
done

# --- 3. A link-time stub for libcuda -------------------------------------------------------------------
# libcuda is the driver's library: no wheel ships it, nor the toolkit's lib/stubs/libcuda.so. A stub does
# the same job for the linker: a shared library with soname libcuda.so.1 that defines every name the
# driver API header mentions (all cu[A-Z]* identifiers in cuda.h, so both the versioned names that
# cudarc calls, like cuCtxCreate_v4, and the old ones). The binary then records NEEDED libcuda.so.1 and
# the real driver provides it at run time. The file is named libcuda.so only (no libcuda.so.1), in a
# stubs/ directory as in a real toolkit, so the dynamic loader can never pick it up by mistake.
STUB="$CUDA_LIB/stubs/libcuda.so"
if [ ! -f "$STUB" ] || [ "$CUDA_ROOT/include/cuda.h" -nt "$STUB" ] || [ "$0" -nt "$STUB" ]; then
  mkdir -p "$CUDA_LIB/stubs"
  src="$CUDA_LIB/stubs/libcuda-stub.c"
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CUDA_ROOT/include/cuda.h" | sort -u |
    sed 's/.*/void &(void) {}/' >"$src"
  "${CC:-cc}" -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$STUB.tmp" "$src"
  mv "$STUB.tmp" "$STUB"
  say "libcuda stub: $STUB ($(grep -c . "$src") symbols)"
fi

# --- 4. The build environment -----------------------------------------------------------------------------
export PATH="$CUDA_ROOT/bin:$PATH"  # nvcc; its nvcc.profile finds cicc and the headers relative to itself
# cudarc's build.rs takes its link-search roots from CUDA_HOME, CUDA_PATH, CUDA_ROOT, CUDA_TOOLKIT_ROOT_DIR
# and CUDNN_LIB (all that are set); bindgen_cuda takes its include dir from the first of CUDA_PATH,
# CUDA_ROOT... that has include/cuda.h. Point all of them at the wheels' tree so that a CUDA install
# elsewhere on the machine cannot mix headers or libraries of another version into the build.
export CUDA_ROOT CUDA_PATH="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT"
unset CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB
# There is no GPU to ask: bindgen_cuda would otherwise run nvidia-smi for the compute capability.
# 90 = Hopper (H100/H200); the PTX then JIT-compiles on compute capability 9.0 and newer only.
export CUDA_COMPUTE_CAP="$COMPUTE_CAP"
# cudarc picks the driver API version to bind; it could parse `nvcc --version` itself (13.0 matches),
# but saying it keeps the binding fixed to what the wheels and the target driver have.
export CUDARC_CUDA_VERSION="$CUDA_VERSION_FOR_CUDARC"
# Belt and braces for the linker (cc honours LIBRARY_PATH for -l lookups) should a build script stop
# emitting the search paths; unlike RUSTFLAGS it does not override the user's own rustflags.
export LIBRARY_PATH="$CUDA_LIB:$CUDA_LIB/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="$PWD/target/cuda"

if [ "$MODE" = print-env ]; then
  for v in PATH CUDA_ROOT CUDA_PATH CUDA_HOME CUDA_COMPUTE_CAP CUDARC_CUDA_VERSION LIBRARY_PATH CARGO_TARGET_DIR; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
  echo 'unset CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB'
  exit 0
fi

say "nvcc: $(nvcc --version | tail -n 2 | head -n 1)"
say "CUDA_ROOT=$CUDA_ROOT CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION"

# --- 5. The build --------------------------------------------------------------------------------------------
BIN="$CARGO_TARGET_DIR/release/tokenscope"
if [ "$MODE" = build ]; then
  say "cargo build --release --features cuda --bin tokenscope (into $CARGO_TARGET_DIR) ..."
  cargo build --release --features cuda --bin tokenscope
fi
[ -x "$BIN" ] || die "no binary at $BIN"

# --- 6. What the binary needs ------------------------------------------------------------------------------
fail=0
needed="$(readelf -d "$BIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')"
say "NEEDED by $BIN:"
sed 's/^/    /' <<<"$needed" >&2
if grep -qx 'libcuda.so.1' <<<"$needed"; then
  say "ok: links the CUDA driver API dynamically (NEEDED libcuda.so.1, from the GPU driver at run time)"
else
  say "FAIL: libcuda.so.1 is not NEEDED: the CUDA backend did not get linked in"
  fail=1
fi
# --as-needed drops a library nothing calls, so not all six need to be there; those that are must
# come from the wheels' lib dir, all but libcuda.so.1, which only a driver provides.
missing="$(LD_LIBRARY_PATH="$CUDA_LIB" ldd "$BIN" | awk '/not found/ {print $1}' | grep -vx 'libcuda.so.1' || true)"
if [ -n "$missing" ]; then
  say "FAIL: not found even with LD_LIBRARY_PATH=$CUDA_LIB: $(tr '\n' ' ' <<<"$missing")"
  fail=1
else
  say "ok: with LD_LIBRARY_PATH=$CUDA_LIB every NEEDED library resolves except libcuda.so.1 (driver)"
fi
driver_syms="$(nm -D --undefined-only "$BIN" | awk '$2 ~ /^cu[A-Z]/ {print $2}' | sed 's/@.*//' | sort -u)"
say "driver API symbols imported from libcuda.so.1: $(grep -c . <<<"$driver_syms" || true)"
if readelf -d "$BIN" | grep -q 'BIND_NOW\|FLAGS_1.*NOW'; then
  say "    (bound at start-up, -z now: the driver must export every one of them)"
fi
# Start the binary with the stub standing in for the driver, under its real name libcuda.so.1 in a
# scratch dir, to prove that the loader resolves every imported symbol; --help touches no GPU code.
smoke="$VENV/smoke-libcuda"
mkdir -p "$smoke"
ln -sfn "$STUB" "$smoke/libcuda.so.1"
if LD_LIBRARY_PATH="$CUDA_LIB:$smoke" "$BIN" --help >/dev/null 2>"$smoke/stderr"; then
  say "ok: the binary starts (--help) with the wheels' libraries and the stub driver"
else
  say "FAIL: the binary does not start against the wheels' libraries and the stub driver:"
  sed 's/^/    /' "$smoke/stderr" >&2
  fail=1
fi
# The PTX ISA the kernels were written in decides the oldest driver that can JIT them.
ptx_version="$(grep -a -o -m 1 -E '^\.version [0-9]+\.[0-9]+' "$BIN" | head -n 1 || true)"
ptx_target="$(grep -a -o -m 1 -E '^\.target sm_[0-9a-z]+' "$BIN" | head -n 1 || true)"
say "embedded PTX: ${ptx_version:-?} ${ptx_target:-?} (ISA 9.0 = CUDA 13.0 = driver R580 or newer)"
say "binary size: $(du -h "$BIN" | cut -f1) (debug info included; objcopy --strip-debug makes a smaller copy to ship)"

if [ "$fail" -ne 0 ]; then
  say "VERDICT: FAIL"
  exit 1
fi
cat >&2 <<EOF
check-cuda-build: VERDICT: PASS: the cuda build compiles and links; $BIN
check-cuda-build: to run it on a GPU machine (NVIDIA driver R580+ for CUDA 13; a GPU of sm_$CUDA_COMPUTE_CAP or newer):
  libcuda.so.1 comes from the driver (never put $CUDA_LIB/stubs on LD_LIBRARY_PATH);
  the other libraries (libcudart.so.13 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10)
  from any CUDA 13 install, e.g. one of:
    LD_LIBRARY_PATH=$CUDA_LIB                      # these wheels, if the binary runs where it was built
    LD_LIBRARY_PATH=\$(python3 -c 'import nvidia,os; print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))')
                                                   # where PyTorch cu130 (or: pip install nvidia-cuda-runtime
                                                   # nvidia-cuda-nvrtc nvidia-cublas nvidia-curand) is installed
    LD_LIBRARY_PATH=/usr/local/cuda/lib64          # a system CUDA 13 toolkit
  then:  LD_LIBRARY_PATH=... $BIN serve --device cuda
EOF

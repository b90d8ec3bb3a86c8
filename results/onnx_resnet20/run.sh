#!/usr/bin/env bash
# Issue 18's acceptance measurements on ResNet-20 (sigma 0.25), one heavy job at a time on an
# idle CPU: export W8A8, W4A4 and the committed ARQ policy to ONNX, count disagreements with the
# reference on 100,000 noisy validation samples, then certify 100 test images (n = 10,000, seed 0)
# through ONNX Runtime and through the project's own path, and compare (compare.py).
set -euo pipefail
D=results/onnx_resnet20
ONNX=${ONNX_DIR:-/tmp/arq_onnx}
mkdir -p "$D" "$ONNX"
POLICY=results/resnet20_cifar10_s0.25/searches/arq/best_policy.json
for name in w8a8 w4a4 arq; do
  case $name in
    w8a8) Q=(--uniform 8) ;;
    w4a4) Q=(--uniform 4) ;;
    arq) Q=(--policy "$POLICY") ;;
  esac
  [ -s "$D/$name.export.json" ] || arq-gym export "${Q[@]}" --out "$ONNX/$name.onnx" \
      --check 100000 --json > "$D/$name.export.json"
  [ -f "$ONNX/$name.onnx" ] || arq-gym export "${Q[@]}" --out "$ONNX/$name.onnx" --check 0 --json >/dev/null
  [ -s "$D/$name.onnx.json" ] || arq-gym certify --onnx "$ONNX/$name.onnx" --images 100 --n 10000 \
      --quiet --json --out "$D/$name.onnx.tsv" > /dev/null
  [ -s "$D/$name.policy.json" ] || arq-gym certify "${Q[@]}" --images 100 --n 10000 \
      --quiet --json --out "$D/$name.policy.tsv" > /dev/null
done
python "$D/compare.py" "$D" > "$D/comparison.md"
cat "$D/comparison.md"

#!/usr/bin/env bash
# Attention control on a GPU: time, operation / kernel-launch and peak-memory ratios for SD 1.5, SDXL, SD3 and Flux
# (benchmarks/speed.py's models: published configs, random weights; SD3 and Flux cut to --layers blocks) at 512 and
# 1024 px, in fp16 and bf16. Writes gpu-results/<model>-<dtype>.json and gpu-results/table.md (the table BENCHMARKS.md
# shows). Sized for one H100-class GPU in under 8 minutes: 3 steps, 2 repeats; pass more as arguments, e.g.
#   bash benchmarks/gpu.sh --steps 4 --repeats 3
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-results
mkdir -p "$out"
for model in sd15 sdxl sd3 flux; do
    for dtype in fp16 bf16; do  # latent sides 64 and 128: 512 and 1024 px (every autoencoder here scales by 8)
        python benchmarks/speed.py --model "$model" --device cuda --dtype "$dtype" --sizes 64 128 --steps 3 \
            --repeats 2 --layers 8 --json "$out/$model-$dtype.json" "$@"
    done
done
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
lines = ["| model | dtype | px | configuration | s/step | time / stock | peak GiB | memory / stock | ops / stock "
         "| launches / stock |", "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
for path in sorted(out.glob("*.json")):
    data = json.loads(path.read_text())
    model, dtype = path.stem.rsplit("-", 1)
    for r in data["rows"]:
        lines.append(f"| {model} | {dtype} | {r['latent'] * 8} | {r['config']} | {r['step_s']:.4f} | "
                     f"{r['time_ratio']:.3f} ({r['time_ratio_min']:.3f}-{r['time_ratio_max']:.3f}) | "
                     f"{r['peak_gib']:.2f} | {r['memory_ratio']:.3f} | {r.get('ops_ratio', float('nan')):.3f} | "
                     f"{r.get('kernel_ops_ratio', float('nan')):.3f} |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY

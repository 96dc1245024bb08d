#!/usr/bin/env bash
# Train one of the project's models on an NVIDIA GPU from prepared data, into one folder, in under 10 minutes.
#
#   bash scripts/train_gpu.sh MODEL [OUT]
#
# MODEL is a recipe the project trains: gradicon-brain-lpba40 or gradicon-hippocampus. The prepared data
# (`iconreg train --save-prepared …`, compressed .npz, a few MB) are read from $PREPARED (default prepared/MODEL):
# train_prepared.npz and validation_prepared.npz. Make them on any machine, for example
#   iconreg train --spec Resources/Models/gradicon-brain-lpba40.json --data ../shared/data/lpba40 \
#       --val-fraction 0.1667 --out prepared/gradicon-brain-lpba40 --steps 0 --save-prepared
# OUT (default runs/MODEL-gpu) receives checkpoint.pt (resumable: run the script again to continue),
# MODEL.pt (float16 weights of the last step, the shipped format), best.pt and MODEL-best.pt (the network at the
# best validation Dice of the run; float16 in the second), validation.md, validation_log.csv, train_log.csv and
# curves.png; with snapshots every KEEP_EVERY steps (OUT/snapshots/), MODEL-averaged.pt (float16, the mean of the
# last AVERAGE snapshots: weight averaging, `iconreg average-weights`) and averaged.json (its validation on the
# same pairs as validation.md; ship it only if it beats the best).
#
# Environment overrides: DEVICE (cuda), TIME_LIMIT (seconds of training, 480), STEPS (the stage's total steps),
# STAGE, LEARNING_RATE, LR_SCHEDULE (constant or cosine: down to 0 at STEPS; size STEPS to the time limit) and
# WARMUP_STEPS (0), BATCH (auto: the largest that fits), INIT (weights to start from when OUT holds no
# checkpoint, or TRAIN_ARGS has --restart), LABEL_WEIGHT (label-aware training; 0 for none), ICON_WEIGHT (`--icon-weight`, the ICON term
# beside the GradICON penalty) and ICON_LABEL_WEIGHT (`--icon-label-weight`), FOLD_WEIGHT (`--fold-weight`), SELF_PAIRS
# (`--self-pairs`), ELASTIC, GAMMA and BIAS_FIELD (augmentation, `iconreg train --elastic/--gamma/--bias-field`; 0 for
# none), ANATOMY_MIX (`--anatomy-mix`: warping toward other subjects with the INIT network; 0 for none), KEEP_EVERY
# (250) and AVERAGE (4), PYTHON (python3), TRAIN_ARGS (more `iconreg train` options, e.g. "--symmetric-label-loss";
# later options win; a resumed run must repeat them). The label weight, ICON, fold, self-pair and augmentation
# defaults are each shipped model's last recipe (the model cards' ledgers); the learning rates are the GPU runs' own
# (a larger batch than on the CPU).
# It installs what is missing: the package is used from this checkout (PYTHONPATH), SimpleITK from .whl/ if
# present (offline machines) or from the package index; PyTorch is never replaced (a GPU machine's own build is
# kept; only if none is importable is one installed).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: scripts/train_gpu.sh MODEL [OUT]}
OUT=${2:-runs/$MODEL-gpu}
PYTHON=${PYTHON:-python3}
PREPARED=${PREPARED:-prepared/$MODEL}
DEVICE=${DEVICE:-cuda}
TIME_LIMIT=${TIME_LIMIT:-480}
BATCH=${BATCH:-auto}
KEEP_EVERY=${KEEP_EVERY:-250}
LR_SCHEDULE=${LR_SCHEDULE:-constant}
WARMUP_STEPS=${WARMUP_STEPS:-0}
AVERAGE=${AVERAGE:-4}

case "$MODEL" in
  gradicon-brain-lpba40)
    SPEC=Resources/Models/gradicon-brain-lpba40.json
    DEFAULT_INIT=ICONRegistration/ICONRegistrationLib/models/bundled/gradicon-brain-lpba40.pt
    STAGE=${STAGE:-1}; STEPS=${STEPS:-20000}; LEARNING_RATE=${LEARNING_RATE:-2e-4}; FLIP_AXES=2
    LABEL_WEIGHT=${LABEL_WEIGHT:-20}; ICON_WEIGHT=${ICON_WEIGHT:-0.1}; ICON_LABEL_WEIGHT=${ICON_LABEL_WEIGHT:-0}
    FOLD_WEIGHT=${FOLD_WEIGHT:-500}; SELF_PAIRS=${SELF_PAIRS:-0.25}
    ELASTIC=${ELASTIC:-2}; GAMMA=${GAMMA:-0.3}; BIAS_FIELD=${BIAS_FIELD:-0.15}; ANATOMY_MIX=${ANATOMY_MIX:-0} ;;
  gradicon-hippocampus)
    SPEC=gradicon-hippocampus
    DEFAULT_INIT=ICONRegistration/ICONRegistrationLib/models/bundled/gradicon-hippocampus.pt
    STAGE=${STAGE:-2}; STEPS=${STEPS:-20000}; LEARNING_RATE=${LEARNING_RATE:-1e-4}; FLIP_AXES=0,1,2
    LABEL_WEIGHT=${LABEL_WEIGHT:-80}; ICON_WEIGHT=${ICON_WEIGHT:-1}; ICON_LABEL_WEIGHT=${ICON_LABEL_WEIGHT:-2}
    FOLD_WEIGHT=${FOLD_WEIGHT:-2000}; SELF_PAIRS=${SELF_PAIRS:-0}
    ELASTIC=${ELASTIC:-2}; GAMMA=${GAMMA:-0.3}; BIAS_FIELD=${BIAS_FIELD:-0}; ANATOMY_MIX=${ANATOMY_MIX:-0.5} ;;
  *)
    echo "unknown model '$MODEL': use gradicon-brain-lpba40 or gradicon-hippocampus" >&2; exit 2 ;;
esac
INIT=${INIT:-$DEFAULT_INIT}
for file in "$PREPARED/train_prepared.npz" "$PREPARED/validation_prepared.npz"; do
  [ -f "$file" ] || { echo "missing $file: see the comment at the top of $0 for how to make it" >&2; exit 2; }
done

# --- what it needs -------------------------------------------------------------------------------------------
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install --quiet torch
if ! "$PYTHON" -c "import SimpleITK" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target /tmp/iconreg-site .whl/*.whl
    export PYTHONPATH=/tmp/iconreg-site${PYTHONPATH:+:$PYTHONPATH}
  else
    "$PYTHON" -m pip install --quiet SimpleITK
  fi
fi
export PYTHONPATH=$PWD/ICONRegistration${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" - "$DEVICE" <<'EOF'
import sys, torch
device = sys.argv[1]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("DEVICE is cuda but PyTorch sees no GPU (set DEVICE=cpu to try the script on a CPU)")
print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}",
      file=sys.stderr)
EOF

# --- train ---------------------------------------------------------------------------------------------------
mkdir -p "$OUT"
ARGS=(train --spec "$SPEC" --data "$PREPARED/train_prepared.npz" --val "$PREPARED/validation_prepared.npz"
      --out "$OUT" --stage "$STAGE" --steps "$STEPS" --learning-rate "$LEARNING_RATE"
      --lr-schedule "$LR_SCHEDULE" --warmup-steps "$WARMUP_STEPS" --batch-size "$BATCH"
      --flip-axes "$FLIP_AXES" --time-limit "$TIME_LIMIT" --device "$DEVICE" --checkpoint-every 100
      --validate-every 250 --keep-every "$KEEP_EVERY" --export "$OUT/$MODEL.pt" --elastic "$ELASTIC" --gamma "$GAMMA"
      --bias-field "$BIAS_FIELD" --icon-weight "$ICON_WEIGHT" --self-pairs "$SELF_PAIRS" --fold-weight "$FOLD_WEIGHT"
      --anatomy-mix "$ANATOMY_MIX")
[ "$ICON_LABEL_WEIGHT" = 0 ] || ARGS+=(--icon-label-weight "$ICON_LABEL_WEIGHT")
# a new run starts from INIT: no checkpoint yet, or a fresh run asked for (--restart in TRAIN_ARGS)
if [ ! -f "$OUT/checkpoint.pt" ] || [[ " ${TRAIN_ARGS:-} " == *" --restart "* ]]; then ARGS+=(--init "$INIT"); fi
[ "$LABEL_WEIGHT" = 0 ] || ARGS+=(--label-loss dice --label-weight "$LABEL_WEIGHT")
[[ "$DEVICE" == cuda* ]] && ARGS+=(--mixed-precision)
if [ -n "${TRAIN_ARGS:-}" ]; then read -r -a EXTRA <<< "$TRAIN_ARGS"; ARGS+=("${EXTRA[@]}"); fi
"$PYTHON" -m ICONRegistrationLib.cli "${ARGS[@]}" | tee "$OUT/summary.json"
if [ -f "$OUT/best.pt" ]; then  # the network at the run's best validation Dice, in the shipped format too
  "$PYTHON" -c 'import sys; from ICONRegistrationLib.training.trainer import export_weights; export_weights(*sys.argv[1:])' \
    "$OUT/best.pt" "$OUT/$MODEL-best.pt"
fi
mapfile -t SNAPSHOTS < <(ls "$OUT"/snapshots/step_*.pt 2>/dev/null | tail -n "$AVERAGE")
if [ "${#SNAPSHOTS[@]}" -ge 2 ]; then  # weight averaging of the last snapshots, validated like the run
  "$PYTHON" -m ICONRegistrationLib.cli average-weights "${SNAPSHOTS[@]}" --out "$OUT/$MODEL-averaged.pt" \
    --spec "$SPEC" --val "$PREPARED/validation_prepared.npz" --stage "$STAGE" --device "$DEVICE" \
    | tee "$OUT/averaged.json"
fi
echo "wrote $OUT: $MODEL.pt (float16, last step), $MODEL-best.pt (float16, best validation Dice), validation.md," \
  "curves.png (and $MODEL-averaged.pt with averaged.json when snapshots were kept); run again to continue from" \
  "$OUT/checkpoint.pt" >&2

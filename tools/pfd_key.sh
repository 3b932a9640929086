#!/usr/bin/env bash
# PFD coarse key contrasts on one preset's world (PRESET, default small), 10 paired seeds,
# Share*&Sync, LR 0.05 for every row; then the control world (privileged_strength = 0). Every fit
# lands in the fit cache, so an interrupted run resumes where it stopped: rerun the same command.
#
#   [PRESET=medium] [SETS="lr_schedule=linear ..."] tools/pfd_key.sh WORK_DIR CACHE_DIR [STAGE ...]
#   (stages: sim fill bsp md all control; default: all; SETS: Config fields of every fit)
#
# `fill` runs every fit in one pool, seed by seed in order of priority (tools/pfd_fill_cache.py):
# baseline/SD/PFD (PFD vs baseline, PFD vs SD), MD/PFD+MD (PFD+MD vs MD), the oracle, then SD
# and PFD on the control world. Each later stage is one `recstack experiment coarse` call whose
# report goes to WORK_DIR/<stage>, its fits read from the cache.
set -euo pipefail
WORK=${1:?WORK_DIR}; CACHE=${2:?CACHE_DIR}; shift 2
STAGES=${*:-sim fill bsp md all control}
SEEDS=1,2,3,4,5,6,7,8,9,10
P=${PRESET:-small}
PY=${PYTHON:-python}
SETARGS=()
for kv in ${SETS:-}; do SETARGS+=(--set "$kv"); done
recstack() { "$PY" -m recstack "$@"; }
coarse() {  # coarse OUT METHODS [more --set ...]
  local out=$1 methods=$2; shift 2
  recstack experiment coarse --data "$WORK/$P" --out "$WORK/$out" --seeds $SEEDS --workers 2 \
    --set methods="$methods" --set lrs=0.05 --set fractions= --set double=false --set data_days= \
    --set cache="$CACHE" "${SETARGS[@]}" "$@"
}
for stage in $STAGES; do
  case $stage in
    sim)
      [ -f "$WORK/$P/world.json" ] || recstack simulate --preset "$P" --seed 0 --out "$WORK/$P"
      [ -f "$WORK/${P}_ctl/world.json" ] || recstack simulate --preset "$P" --seed 0 --out "$WORK/${P}_ctl" \
        --set privileged_strength=0 ;;
    fill) "$PY" "$(dirname "$0")/pfd_fill_cache.py" "$WORK/$P" "$WORK/${P}_ctl" "$CACHE" --seeds $SEEDS "${SETARGS[@]}" ;;
    bsp) coarse bsp baseline,sd,pfd ;;
    md) coarse md baseline,md,pfd_md ;;
    all) coarse all baseline,sd,pfd,md,pfd_md,oracle ;;
    control) coarse control baseline,sd,pfd --set control_data="$WORK/${P}_ctl" --set control_methods=sd,pfd ;;
    *) echo "unknown stage $stage (choose from: sim fill bsp md all control)" >&2; exit 2 ;;
  esac
done

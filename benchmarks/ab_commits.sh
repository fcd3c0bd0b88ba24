#!/bin/bash
# A/B of two commits on one warm GPU machine: the working tree against an older commit, sloth_offload
# 8B rows, alternating. Prepare the old tree here first (the device copy has no .git):
#   rm -rf .gpu/old && mkdir -p .gpu/old && git archive <commit> | tar -x -C .gpu/old
# then a device call with carry [".gpu"]:  bash benchmarks/ab_commits.sh   (RESULTS.md 2.10)
source .gpu/setup.sh >/dev/null 2>&1
R=$PWD
inst() { (cd "$1" && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1); python3 -c "import sloth_plugins,sys; print('using', sloth_plugins.__file__)"; }
go() { # tree name scenario extra
  inst "$1"; echo "=== $2 $(date -u +%T)"
  (cd "$1" && timeout 200 python3 benchmarks/run.py --scenario "$3" --impls sloth_offload --name "$2" --force \
     --out-dir "$OUT/$2" --time-budget-s 150 $4 2>&1 | grep -E "tok/s|sloth_offload|error|Error" | tail -8)
}
go $R new_q1 e2e-8b-qlora-offload
go $R/.gpu/old old_q1 e2e-8b-qlora-offload
go $R new_q2 e2e-8b-qlora-offload --profile
go $R/.gpu/old old_q2 e2e-8b-qlora-offload --profile
go $R new_b1 e2e-8b-offload
go $R/.gpu/old old_b1 e2e-8b-offload
inst $R

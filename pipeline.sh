#!/usr/bin/env bash
# The whole Safe RLHF pipeline on the embedded toy world, then the evaluation and its figures.
#
#   bash pipeline.sh           # SFT -> reward -> cost -> PPO-Lag, PPO, reward shaping (3 values of ν),
#                              #   and Q2's baseline: one reward model on single-dimensional labels -> PPO on it
#                              #   -> evaluate
#   bash pipeline.sh --quick   # SFT -> reward -> cost -> PPO-Lag -> evaluate
#
# Every stage writes to output/<stage>/. The six RL runs go two at a time, one thread each; their
# logs are in output/logs/. NUS="0.1 0.3 1.0 3.0" bash pipeline.sh sweeps other values of ν.
set -euo pipefail
cd "$(dirname "$0")"
export PYTHON=${PYTHON:-.venv/bin/python}
NUS=${NUS:-"0.1 0.3 1.0"}
started=$SECONDS
step() { printf '\n=== %s (%ds so far) ===\n' "$1" $((SECONDS - started)); }

step "1. SFT"
$PYTHON sft.py
step "2. reward model"
$PYTHON train_reward.py
step "3. cost model"
$PYTHON train_cost.py

runs="ppo_lag"  # the RL runs: "ppo_lag", "ppo", "ppo_single" or "reward_shaping:<ν>"
if [ "${1:-}" = "--quick" ]; then
    step "4. PPO-Lagrangian"
    $PYTHON ppo_lagrangian.py
else
    step "3b. Q2: one reward model on single-dimensional preferences"
    $PYTHON train_reward.py --dataset toy_world/data/preference_single_train.jsonl \
        --eval_dataset toy_world/data/preference_single_test.jsonl --output_dir output/reward_single
    step "4. PPO-Lagrangian, PPO, PPO on the single reward, reward shaping with ν in $NUS (two at a time)"
    mkdir -p output/logs
    runs="$runs ppo ppo_single"
    for nu in $NUS; do runs="$runs reward_shaping:$nu"; done
    # One RL run: "ppo_lag", "ppo", "ppo_single" or "reward_shaping:<ν>"; prints its judge line when it ends.
    rl_run() {
        algorithm=${1%%:*}
        flags="--algorithm $algorithm"
        [ "$algorithm" = ppo_single ] && flags="--algorithm ppo --reward_model output/reward_single --output_dir output/ppo_single"
        [ "$algorithm" = reward_shaping ] && flags="$flags --cost_coef ${1#*:}"
        log="output/logs/${1/:/_}.log"
        echo "  start  $1 (log: $log)"
        OMP_NUM_THREADS=1 $PYTHON ppo_lagrangian.py $flags > "$log" 2>&1 || { echo "  FAILED $1: see $log"; exit 1; }
        echo "  done   $1: $(grep -ao 'judge_harmful_rate [0-9.]*\|judge_helpfulness_benign [0-9.]*' "$log" | tr '\n' ' ')"
    }
    export -f rl_run
    echo $runs | tr ' ' '\n' | xargs -P 2 -I {} bash -c 'rl_run {}'
fi
step "5. evaluation"
# The policies of this run only (not, say, a reward_shaping_3.0 left in output/ by an earlier one).
models="sft=output/sft"
for run in $runs; do models="$models ${run/:/_}=output/${run/:/_}"; done
$PYTHON evaluate.py --models $models --arena ppo_lag sft
printf '\npipeline done in %ds; figures and tables in output/eval/\n' $((SECONDS - started))

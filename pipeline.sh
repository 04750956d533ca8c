#!/usr/bin/env bash
# The whole Safe RLHF pipeline on the embedded toy world, then the evaluation and its figures.
#
#   bash pipeline.sh           # SFT -> reward and cost models -> PPO-Lag, and the baselines of the paper's Q2 and Q3:
#                              #   PPO; reward shaping with ν = 0.1, 0.3, 1; one reward model on single-dimensional
#                              #   labels and PPO on it -> evaluate
#   bash pipeline.sh --quick   # SFT -> reward and cost models -> PPO-Lag -> evaluate
#
# Every stage writes output/<stage>/ and its log output/logs/<stage>.log. SFT runs alone on every core; then the stages
# run two at a time, one thread each, each as soon as the models it starts from are written, so that both cores work
# throughout. When each one started and ended (seconds) goes to output/timings.json. NUS="0.1 3.0" bash pipeline.sh
# sweeps other values of ν.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p output/logs

# job NAME NEEDS COMMAND...: a stage, started once the jobs it NEEDS (names, or -) have finished
names=() needs=() commands=()
job() { names+=("$1"); needs+=("$2"); commands+=("${*:3}"); }
job sft - sft.py
job reward sft train_reward.py
job cost reward train_cost.py  # after the reward model: its figure has a reward-vs-cost panel
job ppo_lag "reward cost" ppo_lagrangian.py
if [ "${1:-}" != "--quick" ]; then
    job reward_single sft train_reward.py --dataset toy_world/data/preference_single_train.jsonl \
        --eval_dataset toy_world/data/preference_single_test.jsonl --output_dir output/reward_single
    job ppo reward ppo_lagrangian.py --algorithm ppo
    job ppo_single reward_single ppo_lagrangian.py --algorithm ppo --reward_model output/reward_single \
        --output_dir output/ppo_single
    for nu in ${NUS:-0.1 0.3 1.0}; do
        job "reward_shaping_$nu" "reward cost" ppo_lagrangian.py --algorithm reward_shaping --cost_coef "$nu"
    done
fi

trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a failure or Ctrl-C stops the stages still running
SECONDS=0
declare -A started=() finished=() pids=()
while [ ${#finished[@]} -lt ${#names[@]} ]; do
    for i in "${!names[@]}"; do  # start every job that can start, while a core is free (SFT takes both)
        name=${names[$i]}
        [ -z "${started[$name]:-}" ] && [ ${#pids[@]} -lt "$([ -n "${finished[sft]:-}" ] && echo 2 || echo 1)" ] || continue
        ready=true
        for need in ${needs[$i]}; do [ "$need" = - ] || [ -n "${finished[$need]:-}" ] || ready=false; done
        $ready || continue
        echo "[${SECONDS}s] start $name (log: output/logs/$name.log)"
        threads=$([ "$name" = sft ] && nproc || echo 1)
        OMP_NUM_THREADS=$threads $PYTHON ${commands[$i]} > "output/logs/$name.log" 2>&1 &
        pids[$name]=$! started[$name]=$SECONDS
    done
    wait -n || true
    for name in "${!pids[@]}"; do  # note what has finished, and stop at a failure
        kill -0 "${pids[$name]}" 2>/dev/null && continue
        if ! wait "${pids[$name]}"; then
            echo "FAILED $name: its log output/logs/$name.log ends with:"; tail -n 5 "output/logs/$name.log"; exit 1
        fi
        unset "pids[$name]"
        finished[$name]=$SECONDS
        echo "[${SECONDS}s] done  $name $(grep -ao 'judge_harmful_rate [0-9.]*\|accuracy [0-9.]*' "output/logs/$name.log" | tail -n 1)"
    done
done

echo "[${SECONDS}s] start evaluate"
models="sft=output/sft"
for name in "${names[@]}"; do case $name in ppo* | reward_shaping*) models="$models $name=output/$name" ;; esac; done
started[evaluate]=$SECONDS
$PYTHON evaluate.py --models $models --arena ppo_lag sft
finished[evaluate]=$SECONDS
{   # output/timings.json: {"job": [start, end], ..., "total": seconds}
    printf '{'
    for name in "${names[@]}" evaluate; do printf '"%s": [%s, %s], ' "$name" "${started[$name]}" "${finished[$name]}"; done
    printf '"total": %s}\n' "$SECONDS"
} > output/timings.json
echo "pipeline done in ${SECONDS}s; figures and tables in output/eval/, timings in output/timings.json"

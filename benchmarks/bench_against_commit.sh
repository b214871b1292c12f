#!/usr/bin/env bash
# The pipeline of this tree against the pipeline of an earlier commit, same model and images, alternated
# (new, old, new, old, ...) so the shared machine's load hits both sides alike; one JSON line per run.
#   bash benchmarks/bench_against_commit.sh COMMIT [ROUNDS] [bench_captioning.py flags...]
# Keep the best pipeline_img_s of each side and report the ratio. Needs the ./vlm-caption venv.
set -euo pipefail
cd "$(dirname "$0")/.."
commit=${1:?usage: bench_against_commit.sh COMMIT [ROUNDS] [bench_captioning.py flags...]}
rounds=${2:-3}
shift $(( $# >= 2 ? 2 : 1 ))
flags=("$@")
[ ${#flags[@]} -gt 0 ] || flags=(--preset small --images 32 --new-tokens 32 --batch-size 32)
old=$(mktemp -d)
trap 'rm -rf "$old"' EXIT
git archive "$commit" | tar -x -C "$old"
py="$PWD/vlm-caption/bin/python"
for _ in $(seq "$rounds"); do
  for side in new old; do
    dir=$PWD; [ "$side" = old ] && dir=$old
    (cd "$dir" && PYTHONPATH="$dir" "$py" benchmarks/bench_captioning.py "${flags[@]}" --skip-loop --repeat 1 \
      2>/dev/null | tail -1 | sed "s/^/$side /")
  done
done

#!/usr/bin/env bash
# End-to-end check of `diptych chat` in a real terminal, as a new user's first run: start
# it in a tmux session from a fresh home (an empty temporary HOME: no settings, no chats,
# no compiled kernels), type a question, wait for the streamed answer on screen, quit
# with a double Ctrl+C, and check that the chat was saved. Checks that the status bar says
# when kernels compile; prints the time from start to the model being ready and to the
# first reply token.
#
# The embedded default model is not downloaded again (98 MB): the file is copied from the
# usual cache into the fresh home's cache before the clock starts, without its checksum
# record, so the first run verifies it as it would after a download. SOURCE_MODEL names
# another copy; with no copy at all, the first run downloads it (and the time includes it).
#   scripts/e2e_chat_tmux.sh            (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail

LC_NUMERIC=C  # $EPOCHREALTIME with a decimal point
PYTHON=${PYTHON:-python3}
TIMEOUT=${TIMEOUT:-120}
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
user_cache=${DIPTYCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/diptych}
SOURCE_MODEL=${SOURCE_MODEL:-$user_cache/models/$MODEL_FILE}
session="diptych-e2e-$$"
home=$(mktemp -d)
trap 'tmux kill-session -t "$session" 2>/dev/null || true; rm -rf "$home"' EXIT

if [[ -f $SOURCE_MODEL ]]; then
    mkdir -p "$home/.cache/diptych/models"
    cp "$SOURCE_MODEL" "$home/.cache/diptych/models/$MODEL_FILE"
else
    echo "e2e: no copy of the default model at $SOURCE_MODEL: the first run downloads it" >&2
fi

screen() { tmux capture-pane -p -t "$session"; }

wait_until() {  # wait_until WHAT COMMAND...: poll until COMMAND succeeds
    local what=$1 deadline=$((SECONDS + TIMEOUT))
    shift
    until "$@"; do
        if ((SECONDS > deadline)); then
            echo "e2e: timed out waiting for $what; the screen was:" >&2
            screen >&2
            exit 1
        fi
        sleep 0.1
    done
}

shows() { screen | grep -Eq "$1"; }

since_start() { awk "BEGIN { print $EPOCHREALTIME - $start }"; }

# the status bar starts with "generating…" while a reply streams, and shows its speed after
reply_done() { shows 'decode [0-9.]+ tok/s' && ! shows '^generating'; }

# only the variables a new user's shell would have that point elsewhere are dropped
fresh_env="env -u XDG_CACHE_HOME -u XDG_DATA_HOME -u XDG_CONFIG_HOME -u DIPTYCH_CACHE \
    -u DIPTYCH_DATA_DIR -u NUMBA_CACHE_DIR -u HF_HOME -u HF_HUB_CACHE HOME='$home'"

start=$EPOCHREALTIME
tmux new-session -d -s "$session" -x 120 -y 36 \
    "$fresh_env '$PYTHON' -m diptych.cli chat --backend torch --n-ctx 1024 \
     --temperature 0 --max-tokens 32; echo 'diptych exited'; sleep 30"

wait_until "the model to load" shows 'context [0-9]+/1024'
ready=$(since_start)
tmux send-keys -t "$session" -l "What is the capital of France?"
tmux send-keys -t "$session" Enter
sent=$(since_start)
# nothing is compiled in a fresh home: the first reply waits for the CPU kernels, and says so
wait_until "the kernels-compiling message" shows 'compiling the .* kernel for this CPU \(first use only\)'
# the status bar shows the prompt's speed from the reply's first token on
wait_until "the first reply token" shows 'prompt [0-9]+ tok/s'
first=$(since_start)
wait_until "the reply" reply_done
screen | grep -q "Paris" || { echo "e2e: no 'Paris' in the reply:" >&2; screen >&2; exit 1; }

tmux send-keys -t "$session" C-c
sleep 0.3
tmux send-keys -t "$session" C-c
wait_until "the app to quit on a double Ctrl+C" shows 'diptych exited'

"$PYTHON" - "$home/.local/share/diptych/chats.sqlite3" <<'PY'
import sqlite3, sys
rows = sqlite3.connect(sys.argv[1]).execute("SELECT role, content FROM messages ORDER BY id").fetchall()
assert [r for r, _ in rows] == ["user", "assistant"] and "Paris" in rows[1][1], rows
PY
printf 'e2e: from a fresh home: model ready %.1f s after start; first reply token %.1f s after start (%.1f s after sending)\n' \
    "$ready" "$first" "$(awk "BEGIN { print $first - $sent }")"
echo "e2e: ok (the reply streamed on screen and was saved)"

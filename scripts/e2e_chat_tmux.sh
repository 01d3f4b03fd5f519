#!/usr/bin/env bash
# End-to-end check of `diptych chat` in a real terminal: start it in a tmux session, type a
# question, wait for the streamed answer on screen, quit with a double Ctrl+C, and check
# that the chat was saved. Uses the embedded default model and a throw-away data folder.
#   scripts/e2e_chat_tmux.sh            (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail

PYTHON=${PYTHON:-python3}
TIMEOUT=${TIMEOUT:-120}
session="diptych-e2e-$$"
data=$(mktemp -d)
trap 'tmux kill-session -t "$session" 2>/dev/null || true; rm -rf "$data"' EXIT

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
        sleep 0.5
    done
}

shows() { screen | grep -Eq "$1"; }

# the status bar starts with "generating…" while a reply streams, and shows its speed after
reply_done() { shows 'decode [0-9.]+ tok/s' && ! shows '^generating'; }

tmux new-session -d -s "$session" -x 120 -y 36 \
    "DIPTYCH_DATA_DIR='$data' '$PYTHON' -m diptych.cli chat --backend torch --n-ctx 1024 \
     --temperature 0 --max-tokens 32; echo 'diptych exited'; sleep 30"

wait_until "the model to load" shows 'context [0-9]+/1024'
tmux send-keys -t "$session" -l "What is the capital of France?"
tmux send-keys -t "$session" Enter
wait_until "the reply" reply_done
screen | grep -q "Paris" || { echo "e2e: no 'Paris' in the reply:" >&2; screen >&2; exit 1; }

tmux send-keys -t "$session" C-c
sleep 0.3
tmux send-keys -t "$session" C-c
wait_until "the app to quit on a double Ctrl+C" shows 'diptych exited'

"$PYTHON" - "$data/chats.sqlite3" <<'PY'
import sqlite3, sys
rows = sqlite3.connect(sys.argv[1]).execute("SELECT role, content FROM messages ORDER BY id").fetchall()
assert [r for r, _ in rows] == ["user", "assistant"] and "Paris" in rows[1][1], rows
PY
echo "e2e: ok (the reply streamed on screen and was saved)"

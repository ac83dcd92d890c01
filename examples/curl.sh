#!/usr/bin/env bash
# Chat, streamed chat, a legacy completion and an image against a running Conduit (`conduit up`).
set -euo pipefail
BASE=${CONDUIT_URL:-http://127.0.0.1:8000/v1}
MODEL=${MODEL:-tiny-llama}
# The key `conduit up` printed (or one from `conduit keys create`).
AUTH="Authorization: Bearer ${OPENAI_API_KEY:?set OPENAI_API_KEY to your Conduit API key}"

curl -sS "$BASE/models" -H "$AUTH"; echo

curl -sS "$BASE/chat/completions" -H "$AUTH" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"max_tokens\": 16,
  \"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}]}"; echo

curl -sS -N "$BASE/chat/completions" -H "$AUTH" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"max_tokens\": 8, \"stream\": true, \"stream_options\": {\"include_usage\": true},
  \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}"

curl -sS "$BASE/completions" -H "$AUTH" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"Once upon a time\", \"max_tokens\": 8, \"logprobs\": 2}"; echo

curl -sS "$BASE/images/generations" -H "$AUTH" -H 'Content-Type: application/json' \
  -d "{\"model\": \"${IMAGE_MODEL:-tiny-sd}\", \"prompt\": \"a lighthouse at dusk\", \"size\": \"64x64\"}"; echo

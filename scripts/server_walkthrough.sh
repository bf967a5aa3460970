#!/usr/bin/env bash
# docs/server.md's walk-through with curl, runnable as written against a running server:
# upload a tomogram in parts (skipping parts the server already holds, so a rerun resumes),
# complete the upload, submit a job, poll it until it ends, download its artifacts and check
# each against the server's SHA-256. Needs bash, curl and python3 (for JSON; no jq needed).
#
# Usage:  S=http://127.0.0.1:8000 TOKEN=... bash scripts/server_walkthrough.sh TOMO.mrc [OUT_DIR]
#   S       the server's URL (default http://127.0.0.1:8000)
#   TOKEN   a token with the read, upload and submit scopes, made on the server's machine:
#           TOKEN=$(cryomamba token create --data-dir cryomamba-data --subject alice)
#   MODEL   the model to run (default demo-membrane); CONFIG: more JobConfig keys as JSON,
#           e.g. CONFIG='"tile_step": 0.5, "formats": ["mrc", "stats"]'
#   OUT_DIR where the artifacts go (default walkthrough-out)
set -euo pipefail

F=${1:?usage: S=URL TOKEN=... bash scripts/server_walkthrough.sh TOMO.mrc [OUT_DIR]}
OUT=${2:-walkthrough-out}
S=${S:-http://127.0.0.1:8000}
: "${TOKEN:?set TOKEN to a token with read,upload,submit (cryomamba token create ...)}"
MODEL=${MODEL:-demo-membrane}
CONFIG=${CONFIG:-}
PY=${PYTHON:-python3}
H="Authorization: Bearer $TOKEN"

# api METHOD PATH [curl args...]: one request, its JSON answer on stdout; on an HTTP error
# print the server's error envelope ({"error": {"code", "message", "hint", "retryable"}})
# and stop (set -e ends the script when a command substitution fails).
api() {
  local method=$1 path=$2 body
  shift 2
  if ! body=$(curl -sS --fail-with-body -X "$method" -H "$H" "$@" "$S$path"); then
    echo "error: $method $path failed: $body" >&2
    exit 1
  fi
  printf '%s\n' "$body"
}
# field KEY...: read JSON on stdin and print the value at that key path (numbers index lists)
field() {
  "$PY" -c '
import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1:]:
    value = value[int(key)] if isinstance(value, list) else value[key]
print(json.dumps(value) if isinstance(value, (dict, list)) else value)
' "$@"
}
sha256() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
  else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

# 1. init: announce the file; the answer says the part size (and, on a resume, which parts
#    the server already holds).
SIZE=$(wc -c <"$F" | tr -d ' ')
SHA=$(sha256 "$F")
NAME=$(basename "$F")
INIT=$(api POST /v1/uploads/init -H 'Content-Type: application/json' \
  -d "{\"filename\": \"$NAME\", \"size\": $SIZE, \"sha256\": \"$SHA\"}")
U=$(field upload_id <<<"$INIT")
PART=$(field part_size <<<"$INIT")
STATE=$(field state <<<"$INIT")
HAVE=" $(field parts_received <<<"$INIT" | tr -d '[],') "
N=$(((SIZE + PART - 1) / PART)) # parts of PART bytes, the last one shorter
echo "upload $U: $NAME, $SIZE bytes in $N part(s) of $PART bytes ($STATE)"

# 2. the parts: each cut from the file and sent with its own SHA-256; the server writes
#    each straight into its place in the upload's file
if [ "$STATE" = open ]; then
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  for ((i = 0; i < N; i++)); do
    if [[ $HAVE == *" $i "* ]]; then
      echo "  part $i: already on the server"
      continue
    fi
    dd if="$F" of="$TMP/part" bs="$PART" skip="$i" count=1 2>/dev/null # bytes i*PART..
    api PUT "/v1/uploads/$U/part/$i" --data-binary @"$TMP/part" \
      -H 'Content-Type: application/octet-stream' \
      -H "X-Part-SHA256: $(sha256 "$TMP/part")" >/dev/null
    echo "  part $i: sent"
  done
fi

# 3. complete: the server compares the SHA-256 it kept as the parts arrived with $SHA,
#    checks the MRC header and links the file into raw/ (nothing is copied)
FILE=$(api POST "/v1/uploads/$U/complete")
FILE_ID=$(field file_id <<<"$FILE")
echo "file $FILE_ID: shape $(field shape <<<"$FILE"), voxel size $(field voxel_size <<<"$FILE") Å"

# 4. submit a job on the uploaded file
JOB=$(api POST /v1/jobs -H 'Content-Type: application/json' \
  -d "{\"file_id\": \"$FILE_ID\", \"config\": {\"model\": \"$MODEL\"${CONFIG:+, $CONFIG}}}")
J=$(field id <<<"$JOB")
echo "job $J: $(field state <<<"$JOB")"

# 5. poll until it ends (the WebSocket /v1/ws/jobs/$J streams the same, with previews)
while :; do
  JOB=$(api GET "/v1/jobs/$J")
  STATE=$(field state <<<"$JOB")
  case $STATE in
    completed) break ;;
    failed)
      echo "job $J failed: $(field error <<<"$JOB")" >&2
      exit 1
      ;;
    canceled)
      echo "job $J was canceled" >&2
      exit 1
      ;;
  esac
  PROGRESS=$(field progress <<<"$JOB")
  if [ "$PROGRESS" = None ]; then
    echo "  $STATE"
  else
    echo "  $STATE: $(field progress tiles_done <<<"$JOB")/$(field progress tiles_total <<<"$JOB") tiles"
  fi
  sleep 1
done
echo "job $J: completed"

# 6. download every artifact by its signed URL and check it against the server's SHA-256
mkdir -p "$OUT"
for A in $(field artifacts <<<"$JOB" | "$PY" -c 'import json, sys; print(*json.load(sys.stdin))'); do
  URL=$(field artifacts "$A" url <<<"$JOB")
  WANT=$(field artifacts "$A" sha256 <<<"$JOB")
  curl -sS --fail-with-body -o "$OUT/$A" "$S$URL"
  if [ "$(sha256 "$OUT/$A")" != "$WANT" ]; then
    echo "error: $OUT/$A does not match the server's SHA-256" >&2
    exit 1
  fi
  echo "downloaded $OUT/$A (sha256 checked)"
done

#!/usr/bin/env bash
# docs/integration.md's session with curl: the HTTP/JSON API of `make up`, call by call.
# Run it from the repository root in the environment of `make up` (SMILY_HTTP_PORT moves
# the API here too); it needs curl and jq. Re-runnable: it deletes the slides it ingests.
#
#   make up && docs/examples/curl-session.sh && make down
#
# The HTTP API speaks JSON in camelCase (slideId, operationId), the proto3 JSON mapping;
# the CLI's --json prints the same messages in snake_case (slide_id, operation_id).
set -euo pipefail
api=http://127.0.0.1:${SMILY_HTTP_PORT:-8080}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
# One call: the command on stderr, the answer (JSON, indented) on stdout; fails as the call does.
show() {
    echo "\$ curl $*" >&2
    local body status=0
    body=$(curl -sS --fail-with-body "$@") || status=$?
    if [ -n "$body" ]; then jq . <<<"$body" 2>/dev/null || echo "$body"; fi
    return $status
}

# Ingest a slide (its path relative to the slide roots); the call returns at once with an operation.
ingest() {
    show -X POST "$api/v1/slides:ingest" -H 'content-type: application/json' \
        -d "{\"source\": \"$1\", \"slideId\": \"$2\", \"metadata\": {\"case_id\": \"$3\", \"stain\": \"HE\"}}" |
        tee /dev/stderr | jq -r .operation.operationId
}
# Poll the operation by its id until it is done (at most 5 minutes).
wait_done() {
    for _ in $(seq 300); do
        state=$(curl -sS --fail-with-body "$api/v1/operations/$1" | jq -r .operation.state)
        case $state in
            OPERATION_STATE_SUCCEEDED) show "$api/v1/operations/$1"; return 0 ;;
            OPERATION_STATE_FAILED | OPERATION_STATE_CANCELLED) show "$api/v1/operations/$1"; return 1 ;;
        esac
        sleep 1
    done
    echo "operation $1 still $state after 5 minutes" >&2
    return 1
}
first=$(ingest sample-a.tiff S-0001 A24-1234)
second=$(ingest sample-b.svs S-0002 A24-1235)
wait_done "$first"
wait_done "$second"

# The catalogue, and one slide with its size.
show "$api/v1/slides?pageSize=10"
show "$api/v1/slides/S-0001"

# Search by a region of an indexed slide (level-0 pixels); hit 1 is the region itself.
show -X POST "$api/v1/search" -H 'content-type: application/json' \
    -d '{"region": {"slideId": "S-0001", "x": 1344, "y": 896, "width": 448, "height": 448}, "k": 3}'

# Search by an image (a patch cut through IIIF), as multipart, leaving the source slide out.
show -o "$work/patch.jpg" "$api/iiif/3/S-0001/1344,896,448,448/224,/0/default.jpg"
show -X POST "$api/v1/search" -F "image=@$work/patch.jpg;type=image/jpeg" \
    -F 'request={"k": 2, "excludeSlideIds": ["S-0001"]}'

# Whole-slide search.
show -X POST "$api/v1/slides:searchSlides" -H 'content-type: application/json' \
    -d '{"slideId": "S-0001", "k": 1, "regionsPerSlide": 1, "excludeQuerySlide": true}'

# An error: the status and a JSON body with the gRPC code.
echo "\$ curl -i -X POST $api/v1/search ... (a slide not in the index)" >&2
curl -sS -i -X POST "$api/v1/search" -H 'content-type: application/json' \
    -d '{"region": {"slideId": "nope", "x": 0, "y": 0, "width": 448, "height": 448}}'
echo

show -X DELETE "$api/v1/slides/S-0001"
show -X DELETE "$api/v1/slides/S-0002"

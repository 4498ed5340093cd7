#!/usr/bin/env bash
# The README's walk-through: every `smily` command once, top to bottom, against the
# local stack of `make up` (run it from the repository root, in the same environment:
# the SMILY_* variables that moved a port move it here too). Re-runnable.
#
#   make up && docs/examples/session.sh && make down
set -euo pipefail
smily() { echo "+ smily $*" >&2; "${SMILY:-.venv/bin/smily}" "$@"; }
slides=${SMILY_SLIDE_ROOTS:-data/samples}; slides=${slides%%:*}   # the first slide root
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

# Index the sample slides (paths are relative to the slide roots), with metadata hits return.
# case_id names the patient case: case-1 and case-1-40x are two slides of case B.
smily ingest sample-a.tiff --slide-id case-0 --meta organ=breast --meta case_id=A
smily ingest sample-b.svs --slide-id case-1 --meta organ=breast --meta case_id=B
smily ingest sample-c-40x.svs --slide-id case-1-40x --meta organ=breast --meta case_id=B
smily slides

# Search by a region of an indexed slide (X,Y,W,H in level-0 pixels) ...
smily search --slide case-1 --region 1200,900,448,448 --k 5
# ... or by an image: here, regions saved as PNG (as a viewer shows a hit).
smily read-region case-1 1200,900,448,448 --output "$work/patch.png"
smily read-region case-0 300,300,448,448 --output "$work/other.png"
smily search --image "$work/patch.png" --json

# A concept, learnt from examples with and without it (regions or images) ...
smily concept create fused-glands --with case-1:1200,900,448,448 --with "$work/patch.png" \
    --without case-0:300,300,448,448
smily concept list
# ... steers a search, with more examples like and unlike the query; at most 2 hits a slide, pages of 5.
smily search --slide case-1 --region 1200,900,448,448 --positive case-1:2000,900,448,448 \
    --negative "$work/other.png" --concept fused-glands=0.3 --max-per-slide 2 --page-size 5

# Filters run inside the index search: k hits whenever k tiles match. Here only breast slides
# and none of the query's case (so only case-0); also --exclude-slide ID, --slide-id ID (only
# these slides), --nprobe N (IVF breadth).
smily search --slide case-1 --region 1200,900,448,448 --filter organ=breast --exclude-query-case --json

# Similar whole slides (a mosaic of the query slide's tiles).
smily search-slides --slide-id case-1 --exclude-query-slide --mosaic-size 16

# Ingest is a long-running operation: start one on a big slide without waiting,
# follow it by its id, cancel it (nothing of it is committed).
smily sample-data --big --output-dir "$slides"
operation=$(smily ingest big.svs --slide-id big --no-wait)
smily status "$operation"
smily cancel "$operation"
smily status "$operation" --wait --json

smily concept delete fused-glands
smily delete case-0

#!/bin/sh
# Word count with shell commands instead of Python (Hadoop Streaming): no job module.
#
# The mapper reads its split's lines on stdin and writes `word<TAB>1` lines; the reducer
# reads `word<TAB>count` lines sorted by word (each word's lines contiguous) and writes one
# `word<TAB>total` line per word; the same command combines each map's spill buffers.
# [:space:] in the C locale is exactly bytes.split()'s whitespace, and `$1 ""` makes awk
# compare words as strings (two numeric-looking fields would compare as numbers).
#
#     examples/streaming_wordcount.sh [INPUT...]     (default: examples/data)
#
# Results in out/streaming-wordcount: the same parts, byte for byte, as
# `kubemr run examples/wordcount.py` with the same --reducers.
set -eu
cd "$(dirname "$0")/.."
MAPPER="LC_ALL=C tr -s '[:space:]' '\n' | LC_ALL=C awk 'NF { print \$0 \"\t1\" }'"
SUMMER="LC_ALL=C awk -F'\t' '(\$1 \"\") != k { if (NR > 1) print k \"\t\" n; k = \$1; n = 0 }
  { n += \$2 } END { if (NR) print k \"\t\" n }'"
[ $# -gt 0 ] || set -- examples/data
exec kubemr run --mapper "$MAPPER" --combiner "$SUMMER" --reducer "$SUMMER" \
    --input "$@" --output out/streaming-wordcount --overwrite --reducers 2

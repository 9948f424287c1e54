"""Word count with the key/value API: the quick-start job.

A word is a maximal run of non-whitespace bytes (exactly ``bytes.split()``), case-sensitive,
kept byte for byte even where the input is not valid UTF-8. The map tokenizes a whole split
at once and emits every word with the value 1 in one vectorized batch; the built-in ``sum``
reducer also combines map-side, so only (word, partial count) pairs cross the shuffle.
Each reduce output holds ``word<TAB>count`` lines sorted by word.

    kubemr run examples/wordcount.py --input examples/data --output /tmp/wordcount

Read the counts back in Python (any ``--format``; a result directory or an s3:// prefix)::

    from kubemr_async import read_results
    counts = dict(read_results("/tmp/wordcount"))
"""

from kubemr_async import Job, TaskContext
from kubemr_async.shuffle import split_words

job = Job("wordcount")


@job.map(input="bytes")
async def words(chunk: bytes, ctx: TaskContext) -> None:
    ctx.emit_batch(split_words(chunk), 1)


job.reduce("sum")

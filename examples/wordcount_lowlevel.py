"""Word count on the low-level interface (the original kubemr's ``JobWorker``).

Here the job does its own partitioning and I/O: ``map`` reads its input file, counts words,
writes one object per partition and returns ``{partition: url}``; ``reduce`` reads the
objects every map wrote for its partition and returns the URL of its result. Inputs and
outputs are just strings; :meth:`TaskContext.output_url` gives each attempt its own place
to write, so a retried or zombie attempt never clobbers a committed one.

An input that names a directory, a file or a (quoted) glob becomes one map per data file,
given as an absolute path; ``_`` and ``.`` files are skipped, as for key/value jobs:

    kubemr run examples/wordcount_lowlevel.py --input examples/data --output /tmp/wc-ll
    kubemr run examples/wordcount_lowlevel.py --input 'examples/data/*.txt' --output /tmp/wc-ll
"""

from collections import Counter

from kubemr_async import JobWorker, TaskContext, partition_for


class WordCount(JobWorker):
    name = "wordcount-lowlevel"

    async def map(self, task_id: int, input: str, ctx: TaskContext) -> dict[int, str]:
        counts = Counter((await ctx.fetch(input)).split())
        lines: dict[int, list[bytes]] = {}
        for word, count in counts.items():
            lines.setdefault(partition_for(word, ctx.partitions), []).append(
                word + b"\t" + str(count).encode() + b"\n")
        return {
            partition: await ctx.store(ctx.output_url(f"part-{partition}"), b"".join(chunk))
            for partition, chunk in lines.items()
        }

    async def reduce(self, partition: int, inputs: list[str], ctx: TaskContext) -> str:
        totals: Counter[bytes] = Counter()
        for url in inputs:
            for line in (await ctx.fetch(url)).splitlines():
                word, _, count = line.rpartition(b"\t")
                totals[word] += int(count)
        text = b"".join(w + b"\t" + str(c).encode() + b"\n" for w, c in sorted(totals.items()))
        return await ctx.store(ctx.output_url("result"), text)


job = WordCount()

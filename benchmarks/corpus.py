"""Deterministic word-count corpus generator for the benchmarks.

The corpus is built to make a word count *exact* rather than merely plausible:

* words are Zipf-distributed over a ~200k vocabulary, so the reduce side sees both a few
  very hot keys and a long tail of rare ones, like natural text;
* case variants ("the", "The", "THE") appear, so a case-folding implementation fails;
* a small fraction of words carry bytes that are not valid UTF-8 (b"caf\\xe9", lone lead
  bytes) or that ``str.split()`` treats as whitespace but ``bytes.split()`` does not
  (\\x1c-\\x1f, \\x85, \\xa0), so an implementation that decodes text fails;
* separators mix " ", "\\n", "\\t", "\\r\\n", runs of two, and rare \\x0b / \\x0c (which
  ``bytes.split()`` *does* treat as whitespace), so a tokenizer that only splits on " "
  and "\\n" fails.

A word is a maximal run of non-whitespace bytes, exactly ``bytes.split()``.

Generation is vectorised with numpy (one gather per file, no per-word Python loop), so
256 MiB takes seconds. Files are cached: a JSON stamp next to the data directory records
the parameters, and an existing corpus with a matching stamp and file sizes is reused.
The stamp lives *beside* the data directory, not inside it, so the directory can be
passed as-is to a job's ``--input``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

# Bump when the generator's output changes, so stale caches are regenerated.
GENERATOR_VERSION = 1

DEFAULT_SEED = 20240611
VOCAB_SIZE = 200_000

# Word variants. Each vocabulary word k exists in every variant; variant v of word k
# has pool id v * VOCAB_SIZE + k. Probabilities are per token.
_VARIANT_P = np.array(
    [
        0.930,  # 0: base, lower case
        0.040,  # 1: Capitalised
        0.010,  # 2: UPPER
        0.010,  # 3: latin-1 suffix, b"...\xe9" (not valid UTF-8)
        0.005,  # 4: UTF-8 suffix, b"...\xc3\xa9" (valid UTF-8 "é")
        0.005,  # 5: one "exotic" byte inserted (see _EXOTIC_BYTES)
    ]
)
# Bytes that break a decode-then-split implementation: invalid UTF-8 starts/continuations,
# and bytes that str.split() (after a latin-1 decode) would split on but bytes.split()
# does not.
_EXOTIC_BYTES = np.frombuffer(b"\x80\xff\xfe\xc3\xa0\x85\x1c\x1f", dtype=np.uint8)

# Separators and their per-token probabilities. \x0b and \x0c are ASCII whitespace for
# bytes.split(), so they must separate words too.
_SEPARATORS: tuple[bytes, ...] = (
    b" ",
    b"\n",
    b"  ",
    b"\t",
    b"\r\n",
    b"\n\n",
    b" \t ",
    b"\x0b",
    b"\x0c",
)
_SEPARATOR_P = np.array([0.80, 0.08, 0.04, 0.03, 0.03, 0.01, 0.005, 0.0025, 0.0025])

# Tokens generated per vectorised batch: bounds peak memory (~40 bytes per output byte
# of int64 index arrays) independent of file size.
_BATCH_TOKENS = 1 << 21


@dataclass(frozen=True)
class CorpusSpec:
    """Parameters that fully determine the corpus bytes."""

    size_bytes: int
    files: int
    seed: int = DEFAULT_SEED
    version: int = GENERATOR_VERSION

    @property
    def name(self) -> str:
        return f"wordcount-v{self.version}-s{self.seed}-{self.size_bytes}b-{self.files}f"

    def file_sizes(self) -> list[int]:
        """Exact size of each file; the remainder goes to the first files."""
        base, rem = divmod(self.size_bytes, self.files)
        return [base + (1 if i < rem else 0) for i in range(self.files)]

    def file_names(self) -> list[str]:
        return [f"words-{i:05d}.txt" for i in range(self.files)]


@dataclass(frozen=True)
class Corpus:
    spec: CorpusSpec
    directory: Path
    paths: list[Path]
    generated: bool  # False when an existing cache was reused

    @property
    def size_bytes(self) -> int:
        return self.spec.size_bytes


class _Pool:
    """All word variants and separators concatenated, addressed by (offset, length)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 0xC0DE])
        n = VOCAB_SIZE
        letters, lengths = _vocabulary(rng, n)
        starts = np.cumsum(lengths) - lengths
        exotic = _EXOTIC_BYTES[np.floor(rng.random(n) * len(_EXOTIC_BYTES)).astype(np.int64)]
        # Insert position of the exotic byte for variant 5: anywhere in 0..len.
        insert_at = np.floor(rng.random(n) * (lengths + 1)).astype(np.int64)

        pieces: list[npt.NDArray[np.uint8]] = []
        lens: list[npt.NDArray[np.int64]] = []

        # 0: base
        pieces.append(letters)
        lens.append(lengths)
        # 1: Capitalised (first byte upper-cased)
        cap = letters.copy()
        cap[starts] -= 32
        pieces.append(cap)
        lens.append(lengths)
        # 2: UPPER
        pieces.append(letters - np.uint8(32))
        lens.append(lengths)
        # 3, 4, 5: words with extra bytes, built with the generic "insert bytes" helper.
        pieces.append(_insert(letters, lengths, lengths, np.full((n, 1), 0xE9, np.uint8)))
        lens.append(lengths + 1)
        utf8_e = np.tile(np.array([0xC3, 0xA9], np.uint8), (n, 1))
        pieces.append(_insert(letters, lengths, lengths, utf8_e))
        lens.append(lengths + 2)
        pieces.append(_insert(letters, lengths, insert_at, exotic.reshape(n, 1)))
        lens.append(lengths + 1)

        sep_bytes = b"".join(_SEPARATORS)
        pieces.append(np.frombuffer(sep_bytes, dtype=np.uint8))
        lens.append(np.array([len(s) for s in _SEPARATORS], dtype=np.int64))

        self.data: npt.NDArray[np.uint8] = np.concatenate(pieces)
        self.length: npt.NDArray[np.int64] = np.concatenate(lens)
        self.offset: npt.NDArray[np.int64] = np.cumsum(self.length) - self.length
        self.sep_base = len(_VARIANT_P) * n

        # Zipf-Mandelbrot rank distribution p(k) ~ 1 / (k + 2.7)^1.0, sampled through
        # its CDF so that sampling is one searchsorted per batch.
        ranks = np.arange(n, dtype=np.float64)
        weights = 1.0 / (ranks + 2.7)
        self.word_cdf = np.cumsum(weights / weights.sum())
        self.variant_cdf = np.cumsum(_VARIANT_P / _VARIANT_P.sum())
        self.sep_cdf = np.cumsum(_SEPARATOR_P / _SEPARATOR_P.sum())


def _vocabulary(
    rng: np.random.Generator, n: int, max_len: int = 24
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """`n` distinct lower-case words, concatenated, in Zipf rank order.

    Vocabulary lengths follow a gamma shape (mean ~7.7, like a dictionary); ranks are
    ordered by length plus noise, so frequent words tend to be short and the mean token
    is ~4.5 letters, close to English running text.
    """
    cand = n + n // 2
    lengths = np.clip(1 + np.floor(rng.gamma(4.0, 1.75, cand)), 1, max_len).astype(np.int64)
    mat = (97 + np.floor(rng.random((cand, max_len)) * 26)).astype(np.uint8)
    mat[np.arange(max_len)[None, :] >= lengths[:, None]] = 0
    # Distinct words only: a duplicated word would silently merge two Zipf ranks.
    _, first = np.unique(mat.view(f"S{max_len}").ravel(), return_index=True)
    first.sort()
    if len(first) < n:
        raise RuntimeError(f"only {len(first)} distinct candidate words for {n}")
    chosen = first[:n]
    order = np.argsort(lengths[chosen] + rng.normal(0.0, 3.0, n), kind="stable")
    chosen = chosen[order]
    words = mat[chosen]
    lens = lengths[chosen]
    # Row-major boolean indexing concatenates the words in rank order.
    return words[words != 0], lens


def _insert(
    letters: npt.NDArray[np.uint8],
    lengths: npt.NDArray[np.int64],
    at: npt.NDArray[np.int64],
    extra: npt.NDArray[np.uint8],
) -> npt.NDArray[np.uint8]:
    """Insert ``extra[i]`` (fixed width) into word i at position ``at[i]``, vectorised."""
    n, width = extra.shape
    new_lengths = lengths + width
    out = np.empty(int(new_lengths.sum()), dtype=np.uint8)
    new_starts = np.cumsum(new_lengths) - new_lengths
    old_starts = np.cumsum(lengths) - lengths
    # Position of every old byte in the new layout: shifted by `width` once past `at`.
    word_of = np.repeat(np.arange(n), lengths)
    pos_in_word = np.arange(len(letters)) - old_starts[word_of]
    shift = np.where(pos_in_word >= at[word_of], width, 0)
    out[new_starts[word_of] + pos_in_word + shift] = letters
    for j in range(width):
        out[new_starts + at + j] = extra[:, j]
    return out


def _cdf_pick(
    rng: np.random.Generator, cdf: npt.NDArray[np.float64], size: int
) -> npt.NDArray[np.int64]:
    # Generator.random() is the most stable numpy stream; derive every choice from it.
    idx = np.searchsorted(cdf, rng.random(size), side="right")
    return np.minimum(idx, len(cdf) - 1).astype(np.int64)


def _render_batch(pool: _Pool, rng: np.random.Generator, tokens: int) -> npt.NDArray[np.uint8]:
    """`tokens` words, each followed by a separator, as one byte array."""
    words = _cdf_pick(rng, pool.word_cdf, tokens)
    variants = _cdf_pick(rng, pool.variant_cdf, tokens)
    seps = _cdf_pick(rng, pool.sep_cdf, tokens)
    ids = np.empty(2 * tokens, dtype=np.int64)
    ids[0::2] = variants * VOCAB_SIZE + words
    ids[1::2] = pool.sep_base + seps
    lens = pool.length[ids]
    out_starts = np.cumsum(lens) - lens
    # One gather: output byte i comes from pool byte (src_start - out_start)[token] + i.
    src = np.repeat(pool.offset[ids] - out_starts, lens)
    src += np.arange(len(src), dtype=np.int64)
    out: npt.NDArray[np.uint8] = pool.data[src]
    return out


def render_file(pool: _Pool, seed: int, index: int, size: int) -> bytes:
    """Exactly `size` bytes for file `index`; depends only on (seed, index, size)."""
    rng = np.random.default_rng([seed, index])
    parts: list[npt.NDArray[np.uint8]] = []
    have = 0
    # Mean token (word + separator) is ~5.6 bytes, so size // 4 tokens almost always
    # suffice in one batch; small files then do not pay for a full batch.
    tokens = min(_BATCH_TOKENS, size // 4 + 64)
    while have < size:
        batch = _render_batch(pool, rng, tokens)
        parts.append(batch)
        have += len(batch)
    data = np.concatenate(parts)[:size]
    if size:
        # End on a newline so files concatenate cleanly; the word cut by truncation
        # just becomes a shorter word, which is still a word.
        data[-1] = ord("\n")
    return data.tobytes()


def default_data_dir() -> Path:
    env = os.environ.get("KUBEMR_BENCH_DATA")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "kubemr-async" / "bench"


def _stamp_ok(stamp: Path, spec: CorpusSpec, paths: list[Path]) -> bool:
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    if recorded != asdict(spec):
        return False
    sizes = spec.file_sizes()
    try:
        return all(p.stat().st_size == s for p, s in zip(paths, sizes, strict=True))
    except OSError:
        return False


def ensure_corpus(
    base_dir: Path,
    size_bytes: int,
    files: int,
    seed: int = DEFAULT_SEED,
    force: bool = False,
) -> Corpus:
    """Return the corpus for these parameters, generating it unless a valid cache exists.

    Layout: ``<base_dir>/<name>/words-NNNNN.txt`` and the stamp ``<base_dir>/<name>.json``.
    """
    if files < 1 or size_bytes < files:
        raise ValueError(f"need files >= 1 and size_bytes >= files, got {size_bytes}/{files}")
    spec = CorpusSpec(size_bytes=size_bytes, files=files, seed=seed)
    directory = base_dir / spec.name
    stamp = base_dir / f"{spec.name}.json"
    paths = [directory / n for n in spec.file_names()]
    if not force and _stamp_ok(stamp, spec, paths):
        return Corpus(spec, directory, paths, generated=False)

    # Remove the stamp first: an interrupted generation must not look valid later.
    stamp.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.iterdir():
        if stale.is_file() and stale.name not in spec.file_names():
            stale.unlink()
    pool = _Pool(seed)
    for i, (path, size) in enumerate(zip(paths, spec.file_sizes(), strict=True)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(render_file(pool, seed, i, size))
        tmp.replace(path)
    stamp.write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return Corpus(spec, directory, paths, generated=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=float, default=256)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--force", action="store_true", help="regenerate even if cached")
    args = parser.parse_args(argv)
    corpus = ensure_corpus(
        args.data_dir, int(args.size_mib * 2**20), args.files, args.seed, force=args.force
    )
    state = "generated" if corpus.generated else "cached"
    print(f"{corpus.directory} ({state}, {corpus.size_bytes} bytes, {len(corpus.paths)} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Preprocess JSON-lines text into an indexed token dataset (``prefix.bin`` / ``prefix.idx``).

Used by ``tools/preprocess_data.py`` and ``python -m megamoe preprocess`` (both call `main`).

Each input line is one JSON object; its ``--json-key`` string is one document. Inputs may be
plain, ``.gz`` or ``.zst`` (the latter needs the `zstandard` package), with or without a UTF-8
byte-order mark. Lines are read in ~4 MiB chunks, tokenized by ``--workers`` processes (1 =
in this process) and written in input order. Malformed lines (invalid JSON or UTF-8, missing
key, non-string text) are reported with their line numbers and skipped, or stop the run with
``--strict``.

The output is Megatron-LM's ``tools/preprocess_data.py`` output byte for byte (same tokenizer,
``--append-eod`` alike): one sequence per document, and a document with no tokens (an empty
text) is a document without a sequence, as in Megatron. ``--keep-empty`` writes it as its own
sequence instead (``[EOD]``, or zero tokens), for when sequence i must be input line i.

Speed (see benchmarks/preprocess.py): lines are parsed with orjson when it is installed (the
stdlib json otherwise, and always for the messages about malformed lines), and texts are
encoded in batches by `megamoe.data.fast_encode` (each distinct word piece once, for byte-level
BPE tokenizers; Rust threads release the GIL).

Output goes to temporary files (``PREFIX.bin.tmp.<host>.<pid>``) renamed into place only when
everything succeeded; on errors, Ctrl-C, SIGTERM (Slurm's scancel) or a full disk they are
removed, so no valid-looking partial dataset is ever left, and temporaries that a killed run
(kill -9) left for the same prefix are removed by the next run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import gzip
import io
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from megamoe.data.fast_encode import make_batch_encoder
from megamoe.data.indexed import IndexedDatasetBuilder, best_dtype
from megamoe.data.tokenizer import EOS_CANDIDATES, load_tokenizer

try:  # ~2x faster than json.loads; optional (setup.py installs it)
    import orjson
except ImportError:  # pragma: no cover - exercised by forcing _orjson_loads = None in tests
    orjson = None
_orjson_loads = orjson.loads if orjson is not None else None

# ~4 MiB of whole lines per task: amortises inter-process traffic and lets the piece cache and
# the tokenizer's threads work on large batches, while 2 * workers chunks in flight stay small.
CHUNK_BYTES = 1 << 20
MAX_REPORTED_ERRORS = 20    # print this many malformed-line messages, then only count them
BOM = b"\xef\xbb\xbf"


class PreprocessError(ValueError):
    """A user-facing preprocessing error (printed as one line, no traceback)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (e.g. Slurm's scancel): unwind like Ctrl-C so temporaries are removed."""


@dataclass
class PreprocessStats:
    documents: int = 0
    empty_documents: int = 0  # documents without tokens (no sequence unless keep_empty)
    tokens: int = 0
    bytes: int = 0          # uncompressed input bytes read
    lines: int = 0
    blank_lines: int = 0
    skipped_lines: int = 0  # malformed lines
    seconds: float = 0.0
    errors: list = field(default_factory=list)  # first MAX_REPORTED_ERRORS "file:line: why"

    def summary(self, prefix: str) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        mbs = self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0
        empty = f" ({self.empty_documents} empty)" if self.empty_documents else ""
        return (f"wrote {prefix}.bin/.idx: {self.documents} documents{empty}, {self.tokens} tokens, "
                f"{self.bytes / 1e6:.2f} MB read, {self.skipped_lines} malformed lines skipped, "
                f"{self.blank_lines} blank lines; {self.seconds:.1f}s "
                f"({rate:,.0f} tokens/s, {mbs:.1f} MB/s)")


# ----------------------------------------------------------------------------------- reading

def open_input(path: str):
    """Binary line-iterable stream for a .jsonl, .jsonl.gz or .jsonl.zst file."""
    if not os.path.exists(path):
        raise PreprocessError(f"input file {path!r} not found")
    if os.path.isdir(path):
        raise PreprocessError(f"input {path!r} is a directory; give .jsonl files")
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst") or path.endswith(".zstd"):
        try:
            import zstandard
        except ImportError:
            raise PreprocessError(f"reading {path!r} needs the 'zstandard' package "
                                  "(pip install zstandard) or decompress it first") from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def iter_chunks(paths: list[str]):
    """Yield (file_index, first_line_number, block) in input order.

    A block is ~CHUNK_BYTES of whole lines as one bytes object: cheap to send to a worker
    (one buffer instead of thousands of small objects).
    """
    for fi, path in enumerate(paths):
        first = 1
        with open_input(path) as f:
            try:
                while True:
                    block = f.read(CHUNK_BYTES)
                    if not block:
                        break
                    if first == 1 and block.startswith(BOM):
                        block = block[len(BOM):]  # editors on Windows write one; json.loads rejects it
                    if not block.endswith(b"\n"):
                        block += f.readline()  # complete the last line
                    yield fi, first, block
                    first += block.count(b"\n")
            except (EOFError, gzip.BadGzipFile, zlib.error) as err:
                raise PreprocessError(f"{path}: corrupt compressed stream near line {first} ({err})") from None
            except Exception as err:  # zstandard.ZstdError and friends
                if type(err).__module__.startswith("zstandard"):
                    raise PreprocessError(f"{path}: corrupt zstd stream near line {first} ({err})") from None
                raise


# -------------------------------------------------------------------------------- tokenizing

_W = {}  # per-process worker state: batch encoder, json key, eod id, dtype, keep_empty


def _init_worker(tokenizer_spec: str, json_key: str, eod: int | None, dtype: str, keep_empty: bool,
                 in_pool: bool):
    if in_pool:
        # Ctrl-C / SIGTERM are handled once, by the parent (which then terminates the pool).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Workers are the parallelism; keep the Rust tokenizer single-threaded in each.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    args = (tokenizer_spec, json_key, eod, dtype, keep_empty)
    if in_pool and _W.get("args") == args:
        return  # forked from the parent, which set up (and warmed) the same state
    _W.update(encode=make_batch_encoder(load_tokenizer(tokenizer_spec), dtype), key=json_key, eod=eod,
              dtype=np.dtype(dtype), keep_empty=keep_empty, args=args)


def _parse_line_stdlib(raw: bytes, key: str):
    """The reference parser: json.loads, with a precise reason for every malformed line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"invalid UTF-8 at byte {err.start}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg} at column {err.colno})"
    return _text_of(obj, key, check_unicode=True)


def _text_of(obj, key: str, check_unicode: bool):
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if key not in obj:
        return None, f"missing key {key!r}"
    text = obj[key]
    if not isinstance(text, str):
        return None, f"{key!r} is not a string (got {type(text).__name__})"
    if check_unicode:  # json.loads accepts "\ud800"; such a string cannot be UTF-8 encoded
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return None, f"{key!r} holds invalid Unicode (lone surrogate escape)"
    return text, None


def _parse_line(raw: bytes, key: str):
    """-> (text, None), or (None, reason) for a malformed line, or (None, "blank")."""
    if not raw.strip():
        return None, "blank"
    if _orjson_loads is not None:
        try:
            obj = _orjson_loads(raw)
        except orjson.JSONDecodeError:
            # orjson is stricter (NaN, integers beyond 64 bits, lone surrogates): json.loads
            # decides, so both parsers accept and reject the same lines, with the same messages.
            return _parse_line_stdlib(raw, key)
        return _text_of(obj, key, check_unicode=False)  # orjson rejects lone surrogates itself
    return _parse_line_stdlib(raw, key)


def _with_eod(tokens: np.ndarray, lengths: np.ndarray, eod: int, keep_empty: bool):
    """Append eod to every document (Megatron: only to non-empty ones, unless keep_empty)."""
    gets = np.ones(lengths.size, dtype=bool) if keep_empty else lengths > 0
    ends = np.cumsum(lengths)[gets]
    return np.insert(tokens, ends, np.asarray(eod, dtype=tokens.dtype)), lengths + gets


def process_chunk(chunk):
    """Tokenize one chunk -> (file_index, tokens[sum lengths], lengths[docs], errors, bytes, lines, blanks).

    lengths has one entry per document, 0 for a document without tokens. errors: [(line
    number, reason)] for malformed lines, in order.
    """
    fi, first, block = chunk
    lines = block.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the block ends with a newline
    texts, errors, blanks = [], [], 0
    key = _W["key"]
    for k, raw in enumerate(lines):
        text, why = _parse_line(raw, key)
        if why is None:
            texts.append(text)
        elif why == "blank":
            blanks += 1
        else:
            errors.append((first + k, why))
    tokens, lengths = _W["encode"](texts)
    if _W["eod"] is not None:
        tokens, lengths = _with_eod(tokens, lengths, _W["eod"], _W["keep_empty"])
    return fi, tokens, lengths, errors, len(block), len(lines), blanks


def _ordered_results(chunks, workers: int, init_args):
    """Run process_chunk over chunks in `workers` processes, yielding results in input order.

    At most 2 * workers chunks are in flight, so memory stays bounded on huge inputs
    (Pool.imap would read the whole input ahead).
    """
    try:
        yield from _results(iter(chunks), workers, init_args)
    finally:
        _W.clear()  # drop the tokenizer and its piece cache with the run


def _results(chunks, workers: int, init_args):
    if workers <= 1:
        _init_worker(*init_args, False)
        for chunk in chunks:
            yield process_chunk(chunk)
        return
    methods = mp.get_all_start_methods()
    method = "fork" if "fork" in methods else "spawn"
    if method == "fork":
        # Warm the piece cache on the first chunk here, so that every forked worker inherits it
        # instead of encoding the corpus' most common new pieces once per worker. The tokenizer
        # stays single-threaded: its thread pool must not exist before the fork.
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            _init_worker(*init_args, False)
            first = next(chunks, None)
            if first is not None:
                yield process_chunk(first)
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
    pool = mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(*init_args, True))
    finished = False
    try:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(process_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        finished = True
    finally:
        # Done: close and let the workers exit on their own. terminate() right after the last
        # result races with the pool's own worker bookkeeping and can leave join() waiting
        # forever on a worker it never signalled (seen once in a full test run); it is kept
        # for errors, Ctrl-C and SIGTERM, where the workers must stop mid-task.
        if finished:
            pool.close()
        else:
            pool.terminate()
        pool.join()


# ------------------------------------------------------------------------------------ driver

@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into a `Terminated` exception in the main thread (no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def preprocess(inputs: list[str], output_prefix: str, tokenizer: str, json_key: str = "text",
               append_eod: bool = False, workers: int = 1, strict: bool = False,
               progress: bool | None = None, log=None, keep_empty: bool = False) -> PreprocessStats:
    """Tokenize `inputs` into ``output_prefix.bin/.idx``; returns statistics.

    Raises PreprocessError (ValueError) for user errors, KeyboardInterrupt (`Terminated` for
    SIGTERM) when stopped; never leaves partial output. keep_empty: write a document without
    tokens as its own sequence (default: no sequence, as Megatron-LM).
    progress: True / False / None (= only when stderr is a terminal).
    log: callable for warnings (default: print to stderr).
    """
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not inputs:
        raise PreprocessError("no input files given")
    if workers < 1:
        raise PreprocessError(f"--workers must be >= 1 (got {workers})")
    for path in inputs:
        open_input(path).close()  # fail fast on missing files / missing zstandard
    tok = load_tokenizer(tokenizer)
    if append_eod and tok.eos_id is None:
        raise PreprocessError(f"tokenizer {tokenizer!r} has no end-of-text token (none of "
                              f"{', '.join(EOS_CANDIDATES)}); drop --append-eod")
    dtype = best_dtype(tok.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise PreprocessError(f"output directory {out_dir!r} does not exist")

    stats = PreprocessStats()
    start = time.perf_counter()
    init_args = (tokenizer, json_key, tok.eos_id if append_eod else None, dtype.str, keep_empty)
    with _sigterm_raises():
        builder = IndexedDatasetBuilder(output_prefix, dtype)
        if builder.removed_stale:
            log(f"removed {len(builder.removed_stale)} temporary file(s) left by an interrupted run: "
                f"{', '.join(builder.removed_stale)}")
        bar = tqdm(unit="doc", desc="preprocess", disable=None if progress is None else not progress,
                   file=sys.stderr, dynamic_ncols=True)
        results = _ordered_results(iter_chunks(inputs), workers, init_args)
        try:
            for fi, tokens, lengths, errors, nbytes, nlines, blanks in results:
                _report(errors, inputs[fi], strict, stats, log)
                builder.add_documents(tokens, lengths, keep_empty=keep_empty)
                stats.documents += lengths.size
                # Empty: 0 tokens, or only the [EOD] that keep_empty + append_eod gives it.
                stats.empty_documents += int(np.count_nonzero(lengths == int(keep_empty and append_eod)))
                stats.tokens += tokens.size
                stats.bytes += nbytes
                stats.lines += nlines
                stats.blank_lines += blanks
                stats.skipped_lines += len(errors)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.update(lengths.size)
                bar.set_postfix_str(f"{stats.bytes / 1e6 / elapsed:.1f} MB/s, {stats.tokens / elapsed:,.0f} tok/s",
                                    refresh=False)
            if stats.documents == stats.empty_documents:
                if stats.lines == stats.blank_lines:
                    raise PreprocessError(f"input is empty: no JSON lines in {', '.join(inputs)}")
                if stats.documents:
                    raise PreprocessError(f"all {stats.documents} documents are empty: no tokens to write")
                raise PreprocessError(f"no valid documents in input ({stats.skipped_lines} malformed lines skipped)")
            builder.finalize()
        except BaseException:
            builder.abort()
            raise
        finally:
            results.close()  # stops the worker pool now, not when the generator is collected
            bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _report(errors, path: str, strict: bool, stats: PreprocessStats, log) -> None:
    """Warn about (or, with strict, stop at) malformed lines; only the first few are printed."""
    for lineno, why in errors:
        where = f"{path}:{lineno}"
        if strict:
            raise PreprocessError(f"{where}: {why} (--strict)")
        if len(stats.errors) < MAX_REPORTED_ERRORS:
            stats.errors.append(f"{where}: {why}")
            log(f"warning: skipping {where}: {why}")
        elif len(stats.errors) == MAX_REPORTED_ERRORS:
            stats.errors.append("...")
            log(f"warning: more than {MAX_REPORTED_ERRORS} malformed lines; only counting the rest")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data",
        description="Tokenize JSON-lines text into a Megatron-compatible indexed dataset (.bin/.idx).")
    p.add_argument("--input", nargs="+", required=True,
                   help="one or more .jsonl / .jsonl.gz / .jsonl.zst files (concatenated in order)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", required=True,
                   help="'byte' (ids 0..255, eos 256) or a HF tokenizer.json / a directory containing one")
    p.add_argument("--json-key", default="text", help="JSON field holding the document text (default: text)")
    p.add_argument("--append-eod", action="store_true", help="end every document with the tokenizer's EOS id")
    p.add_argument("--keep-empty", action="store_true",
                   help="write a document without tokens as its own sequence ([EOD] with --append-eod); "
                        "default: no sequence, as Megatron-LM")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed line instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry: returns the exit status (0 ok, 2 user error, 1 I/O error, 130 interrupted,
    143 SIGTERM).

    Every failure is one line on stderr, no traceback (as ``python -m megamoe`` does).
    """
    args = build_parser().parse_args(argv)
    prog = "preprocess_data"
    try:
        stats = preprocess(args.input, args.output_prefix, args.tokenizer, json_key=args.json_key,
                           append_eod=args.append_eod, workers=args.workers, strict=args.strict,
                           progress=False if args.no_progress else None, keep_empty=args.keep_empty)
    except Terminated:
        print(f"{prog}: terminated (SIGTERM); no output written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no output written", file=sys.stderr)
        return 130
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno == errno.ENOSPC:
            print(f"{prog}: error: no space left on device writing {args.output_prefix}.bin; "
                  "partial output removed", file=sys.stderr)
        else:
            print(f"{prog}: error: {err.strerror or err} ({err.filename or args.output_prefix})",
                  file=sys.stderr)
        return 1
    print(stats.summary(args.output_prefix))
    return 0

"""Preprocessing: round trips (byte + BPE), workers, compressed input, malformed lines, failures."""

import errno
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from datautil import random_texts, write_jsonl
from megamoe.data import preprocess as pp
from megamoe.data.indexed import IndexedDataset
from megamoe.data.tokenizer import ByteTokenizer, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(argv, capsys):
    rc = pp.main(argv + ["--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def read_docs(prefix):
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))], ds


@pytest.mark.parametrize("workers", [1, 2])
def test_byte_round_trip(tmp_path, capsys, workers):
    texts = random_texts(300, seed=5)
    write_jsonl(tmp_path / "in.jsonl", texts)
    rc, out, _ = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                      "--tokenizer", "byte", "--append-eod", "--workers", str(workers)], capsys)
    empty = sum(not t for t in texts)
    assert empty and rc == 0 and f"300 documents ({empty} empty)" in out
    docs, ds = read_docs(tmp_path / "o")
    assert ds.dtype == np.uint16 and ds.num_documents == 300  # an empty document: no sequence (Megatron)
    assert docs == [list(t.encode("utf-8")) + [256] for t in texts if t]
    assert ByteTokenizer().decode(docs[3]) == texts[3]


def test_bpe_round_trip_and_workers_identical(tmp_path, capsys, bpe_tokenizer_path):
    texts = random_texts(250, seed=6)
    write_jsonl(tmp_path / "in.jsonl", texts, key="content")
    tok = load_tokenizer(bpe_tokenizer_path)
    outs = []
    for w in (1, 2):
        rc, _, err = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / f"o{w}"),
                          "--tokenizer", os.path.dirname(bpe_tokenizer_path), "--json-key", "content",
                          "--workers", str(w), "--append-eod"], capsys)
        assert rc == 0, err
        outs.append((tmp_path / f"o{w}.bin").read_bytes() + (tmp_path / f"o{w}.idx").read_bytes())
    assert outs[0] == outs[1]
    docs, _ = read_docs(tmp_path / "o1")
    assert docs == [tok.encode(t) + [tok.eos_id] for t in texts if t]
    assert tok.decode(docs[7][:-1]) == texts[7]


def test_multi_input_and_gzip(tmp_path, capsys):
    a, b = random_texts(20, seed=1), random_texts(30, seed=2)
    write_jsonl(tmp_path / "a.jsonl", a)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in b:
            f.write(json.dumps({"text": t}) + "\n")
    rc, _, err = run(["--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"),
                      "--output-prefix", str(tmp_path / "o"), "--tokenizer", "byte"], capsys)
    assert rc == 0, err
    docs, _ = read_docs(tmp_path / "o")
    assert docs == [list(t.encode()) for t in a + b if t]


def test_zstd_input(tmp_path, capsys):
    (tmp_path / "in.jsonl.zst").write_bytes(b"")
    argv = ["--input", str(tmp_path / "in.jsonl.zst"), "--output-prefix", str(tmp_path / "o"), "--tokenizer", "byte"]
    try:
        import zstandard
    except ImportError:
        rc, _, err = run(argv, capsys)
        assert rc == 2 and "needs the 'zstandard' package" in err and err.count("\n") == 1
        return
    texts = random_texts(10)
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    assert read_docs(tmp_path / "o")[0] == [list(t.encode()) for t in texts]


def make_malformed(path):
    lines = [b'{"text": "good one"}', b"not json", b'{"other": "x"}', b'{"text": 5}',
             b'{"text": "bad \xff\xfe utf8"}', b"", b'{"text": "good two"}', b'["text"]',
             b'{"text": "\\ud800 lone"}']
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_malformed_lines_reported_and_skipped(tmp_path, capsys):
    make_malformed(tmp_path / "in.jsonl")
    rc, out, err = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                        "--tokenizer", "byte"], capsys)
    assert rc == 0
    assert read_docs(tmp_path / "o")[0] == [list(b"good one"), list(b"good two")]
    src = str(tmp_path / "in.jsonl")
    for expected in (f"{src}:2: invalid JSON", f"{src}:3: missing key 'text'",
                     f"{src}:4: 'text' is not a string (got int)", f"{src}:5: invalid UTF-8 at byte 14",
                     f"{src}:8: expected a JSON object, got list", f"{src}:9: 'text' holds invalid Unicode"):
        assert expected in err
    assert "2 documents" in out and "6 malformed lines skipped" in out and "1 blank lines" in out


@pytest.mark.parametrize("workers", [1, 2])
def test_strict_fails_with_one_line_and_no_output(tmp_path, capsys, workers):
    make_malformed(tmp_path / "in.jsonl")
    rc, _, err = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                      "--tokenizer", "byte", "--strict", "--workers", str(workers)], capsys)
    assert rc == 2
    src = tmp_path / "in.jsonl"
    assert err == f"preprocess_data: error: {src}:2: invalid JSON (Expecting value at column 1) (--strict)\n"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


@pytest.mark.parametrize("content,msg", [
    (b"", "input is empty"), (b"\n  \n", "input is empty"),
    (b'{"x": 1}\n', r"no valid documents in input \(1 malformed lines skipped\)"),
])
def test_empty_input_errors(tmp_path, capsys, content, msg):
    (tmp_path / "in.jsonl").write_bytes(content)
    rc, _, err = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                      "--tokenizer", "byte"], capsys)
    assert rc == 2
    last = err.splitlines()[-1]  # (a skipped line's warning may come first)
    assert last.startswith("preprocess_data: error: ") and re.search(msg, last)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_user_errors_are_one_line(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", ["x"])
    src = str(tmp_path / "in.jsonl")
    cases = [
        (["--input", str(tmp_path / "missing.jsonl"), "--tokenizer", "byte"], "input file .*missing.jsonl' not found"),
        (["--input", src, "--tokenizer", str(tmp_path / "nope.json")], "tokenizer .* not found"),
        (["--input", src, "--tokenizer", str(tmp_path)], "has no tokenizer.json"),
        (["--input", src, "--tokenizer", src], "cannot load tokenizer"),
    ]
    for argv, msg in cases:
        rc, _, err = run(argv + ["--output-prefix", str(tmp_path / "o")], capsys)
        assert rc == 2 and err.count("\n") == 1 and re.search(msg, err), err
    rc, _, err = run(["--input", str(tmp_path / "in.jsonl"), "--tokenizer", "byte",
                      "--output-prefix", str(tmp_path / "no" / "dir" / "o")], capsys)
    assert rc == 2 and "output directory" in err


def test_missing_eos_token(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "t.json"))
    write_jsonl(tmp_path / "in.jsonl", ["a b a"])
    rc, _, err = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                      "--tokenizer", str(tmp_path / "t.json"), "--append-eod"], capsys)
    assert rc == 2 and "has no end-of-text token" in err
    rc, _, _ = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                    "--tokenizer", str(tmp_path / "t.json")], capsys)
    assert rc == 0 and read_docs(tmp_path / "o")[0] == [[0, 1, 0]]


def _failing_add_documents(exc):
    def add_documents(self, tokens, lengths, **kwargs):
        self._bin.write(b"\0" * 8)  # some bytes already written when the failure hits
        raise exc
    return add_documents


@pytest.mark.parametrize("exc,rc,msg", [
    (KeyboardInterrupt(), 130, "interrupted; no output written"),
    (OSError(errno.ENOSPC, "No space left on device"), 1, "no space left on device"),
])
def test_interrupt_and_disk_full_leave_no_output(tmp_path, capsys, monkeypatch, exc, rc, msg):
    from megamoe.data.indexed import IndexedDatasetBuilder

    write_jsonl(tmp_path / "in.jsonl", random_texts(50))
    write_jsonl(tmp_path / "keep.jsonl", ["old"])
    monkeypatch.setattr(IndexedDatasetBuilder, "add_documents", _failing_add_documents(exc))
    got, _, err = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                       "--tokenizer", "byte", "--workers", "2"], capsys)
    assert got == rc and msg in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "keep.jsonl"]


def test_cli_script_exit_status(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b"")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                           "--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                           "--tokenizer", "byte"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("preprocess_data: error: input is empty") and "Traceback" not in proc.stderr


def test_corrupt_gzip_is_one_line_error(tmp_path, capsys):
    data = gzip.compress(("".join(json.dumps({"text": t}) + "\n" for t in random_texts(50))).encode())
    (tmp_path / "in.jsonl.gz").write_bytes(data[:len(data) // 2])
    rc, _, err = run(["--input", str(tmp_path / "in.jsonl.gz"), "--output-prefix", str(tmp_path / "o"),
                      "--tokenizer", "byte"], capsys)
    assert rc == 2 and "corrupt compressed stream" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl.gz"]

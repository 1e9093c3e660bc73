"""Preprocessing vs Megatron-LM: byte-identical output, empty documents, BOM, orjson fallback,
SIGTERM / kill -9 clean-up of temporaries."""

import gzip
import importlib.util
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from datautil import random_texts, write_jsonl
from megamoe.data import preprocess as pp
from megamoe.data.indexed import IndexedDataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_preprocess", os.path.join(ROOT, "benchmarks", "preprocess.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its pool pickles MegatronEncoder by module name
    spec.loader.exec_module(mod)
    return mod


def run(argv, capsys):
    rc = pp.main(argv + ["--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def file_bytes(prefix):
    return open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read()


@pytest.mark.parametrize("workers", [1, 2])
def test_byte_identical_to_megatron_pipeline(tmp_path, capsys, bpe_tokenizer_path, workers):
    """Megatron's process_json_file (re-implemented in the benchmark) and ours write the same bytes,
    empty documents included (Megatron: no sequence, a repeated document boundary)."""
    texts = random_texts(400, seed=11) + ["", "<|endoftext|> inside", " lead and trail  ", "\ufeffx"]
    assert "" in texts[:400]
    write_jsonl(tmp_path / "in.jsonl", texts)
    bench = load_benchmark()
    vocab = __import__("tokenizers").Tokenizer.from_file(bpe_tokenizer_path).get_vocab_size()
    bench.megatron_preprocess(str(tmp_path / "in.jsonl"), str(tmp_path / "meg"), bpe_tokenizer_path, 1, vocab)
    rc, out, err = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "ours"),
                        "--tokenizer", bpe_tokenizer_path, "--append-eod", "--workers", str(workers)], capsys)
    assert rc == 0, err
    assert file_bytes(tmp_path / "ours") == file_bytes(tmp_path / "meg")
    ds = IndexedDataset(str(tmp_path / "ours"))
    empty = sum(not t for t in texts)
    assert ds.num_documents == len(texts) and len(ds) == len(texts) - empty
    assert f"{len(texts)} documents ({empty} empty)" in out


def test_keep_empty_writes_a_sequence_per_line(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", ["ab", "", "c"])
    for flags, expect in (([], [[97, 98, 256], [99, 256]]),
                          (["--keep-empty"], [[97, 98, 256], [256], [99, 256]])):
        rc, _, err = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                          "--tokenizer", "byte", "--append-eod"] + flags, capsys)
        assert rc == 0, err
        ds = IndexedDataset(str(tmp_path / "o"))
        assert [ds[i].tolist() for i in range(len(ds))] == expect and ds.num_documents == 3
    rc, _, err = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                      "--tokenizer", "byte", "--keep-empty"], capsys)
    assert rc == 0 and IndexedDataset(str(tmp_path / "o")).sequence_lengths.tolist() == [2, 0, 1]
    write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    rc, _, err = run(["--input", str(tmp_path / "empty.jsonl"), "--output-prefix", str(tmp_path / "e"),
                      "--tokenizer", "byte"], capsys)
    assert rc == 2 and "all 2 documents are empty" in err and err.count("\n") == 1


@pytest.mark.parametrize("gz", [False, True])
def test_utf8_bom_is_accepted(tmp_path, capsys, gz):
    data = b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n'
    path = tmp_path / ("in.jsonl.gz" if gz else "in.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    rc, out, err = run(["--input", str(path), "--output-prefix", str(tmp_path / "o"), "--tokenizer", "byte"], capsys)
    assert rc == 0 and "malformed" not in err and "0 malformed lines" in out
    ds = IndexedDataset(str(tmp_path / "o"))
    assert [bytes(ds[i].astype(np.uint8)) for i in range(len(ds))] == [b"first", b"second"]


def test_bom_only_stripped_at_file_start(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n')
    rc, _, err = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                      "--tokenizer", "byte"], capsys)
    assert rc == 0 and f"{tmp_path / 'in.jsonl'}:2: invalid JSON" in err


def test_orjson_and_stdlib_parsers_agree(tmp_path, capsys, monkeypatch):
    lines = [b'{"text": "plain"}', b'{"text": "nan", "x": NaN}', b'{"text": "big", "n": 123456789012345678901234}',
             b'{"text": "\\ud800 lone"}', b'{"text": "esc \\u00e9\\n"}', b"not json", b'{"text": 3}', b"[1]"]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    results = []
    for loads in (pp._orjson_loads, None):
        monkeypatch.setattr(pp, "_orjson_loads", loads)
        rc, out, err = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                            "--tokenizer", "byte"], capsys)
        assert rc == 0
        results.append((file_bytes(tmp_path / "o"), err))
    assert results[0] == results[1]
    assert "4 documents" not in results[0][1] and results[0][1].count("warning: skipping") == 4


# ---------------------------------------------------------------- interruption and leftovers

# A child that tokenizes until its first write, says "ready" and then blocks, so the test can
# signal it at a known point (no timing guesses).
CHILD = """
import sys, time
from megamoe.data import preprocess as pp
from megamoe.data.indexed import IndexedDatasetBuilder
real = IndexedDatasetBuilder.add_documents
def add_documents(self, *a, **k):
    real(self, *a, **k)
    print("ready", flush=True)
    time.sleep(600)
IndexedDatasetBuilder.add_documents = add_documents
sys.exit(pp.main(sys.argv[1:]))
"""


def start_blocked_child(tmp_path, workers):
    write_jsonl(tmp_path / "in.jsonl", random_texts(50, seed=3))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "--input", str(tmp_path / "in.jsonl"),
                             "--output-prefix", str(tmp_path / "o"), "--tokenizer", "byte",
                             "--workers", str(workers), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    assert any(".bin.tmp." in name for name in os.listdir(tmp_path))
    return proc


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_removes_temporaries(tmp_path, workers):
    proc = start_blocked_child(tmp_path, workers)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err == "preprocess_data: terminated (SIGTERM); no output written\n"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_kill9_leftovers_removed_by_next_run(tmp_path, capsys):
    proc = start_blocked_child(tmp_path, 1)
    proc.kill()
    proc.wait(timeout=60)
    stale = sorted(n for n in os.listdir(tmp_path) if ".tmp." in n)
    assert stale and all(n.startswith("o.bin.tmp.") for n in stale)
    # Not ours to touch: another host's writer (shared file system) and a live process here.
    other = [f"o.bin.tmp.{socket.gethostname()}x.{proc.pid}", f"o.idx.tmp.{socket.gethostname()}.{os.getppid()}"]
    legacy = f"o.idx.tmp.{proc.pid}"  # older megamoe names had no host
    for name in other + [legacy]:
        (tmp_path / name).write_bytes(b"x")
    rc, out, err = run(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                        "--tokenizer", "byte"], capsys)
    assert rc == 0 and "removed 2 temporary file(s) left by an interrupted run" in err
    assert sorted(os.listdir(tmp_path)) == sorted(["in.jsonl", "o.bin", "o.idx"] + other)

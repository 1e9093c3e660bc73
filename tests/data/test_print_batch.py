"""tools/print_batch.py prints exactly the samples of global batch N that the trainer would use."""

import importlib.util
import os

import numpy as np

from datautil import random_docs, write_dataset
from megamoe import config as config_lib
from megamoe.data import build_from_config, global_batch_indices

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_tool():
    spec = importlib.util.spec_from_file_location("print_batch", os.path.join(ROOT, "tools", "print_batch.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_print_batch_matches_dataset(tmp_path, capsys):
    write_dataset(tmp_path / "d", random_docs(200, seed=9, max_len=80, vocab=257))
    (tmp_path / "cfg.yaml").write_text(
        "preset: tiny\nsteps: 10\nmicro_batch_size: 2\nglobal_batch_size: 4\n"
        f"data:\n  paths: [{tmp_path / 'd'}]\n  tokenizer: byte\n  cache_dir: {tmp_path / 'cache'}\n")
    overrides = ["--model.seq_length", "24"]
    argv = ["--config", str(tmp_path / "cfg.yaml"), "--batch", "3", "--dp", "2", "--decode"]
    rc = load_tool().main(argv + overrides)
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    rows = [line for line in out if line.startswith("batch 3 ")]
    assert len(rows) == 4 and sum(line.startswith("  text: ") for line in out) == 4
    cfg = config_lib.load(str(tmp_path / "cfg.yaml"), overrides)
    train, _, _ = build_from_config(cfg)  # the trainer's path (valid size differs: irrelevant)
    printed = {int(r.split(" sample ")[1].split(":")[0]): [int(x) for x in r.split(": ")[1].split()] for r in rows}
    assert sorted(printed) == global_batch_indices(3, 4)
    for s, ids in printed.items():
        assert np.array_equal(ids, train[s]) and len(ids) == 25
    assert rows[0].startswith("batch 3 rank 0 micro 0 row 0 sample 12:")
    assert rows[2].startswith("batch 3 rank 1 micro 0 row 0 sample 14:")


def test_print_batch_user_error(tmp_path, capsys):
    rc = load_tool().main(["--config", str(tmp_path / "missing.yaml"), "--batch", "0"])
    assert rc == 2 and capsys.readouterr().err.startswith("print_batch: error: config file")


def test_print_batch_via_package_cli(tmp_path, capsys):
    cli = __import__("pytest").importorskip("megamoe.cli")
    write_dataset(tmp_path / "d", random_docs(50, seed=2, max_len=40, vocab=257))
    rc = cli.main(["print-batch", "--preset", "tiny", "--batch", "1", "--data.paths", str(tmp_path / "d"),
                   "--data.cache_dir", str(tmp_path / "c"), "--model.seq_length", "8", "--global_batch_size", "4",
                   "--micro_batch_size", "2"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and [line.split(" sample ")[1].split(":")[0] for line in out] == ["4", "5", "6", "7"]

"""The llama2.c loader on the real stories260K model and its tokenizer."""
import json
import struct

import pytest
import torch

from lckv.research.llama2c import CheckpointFormatError, load, load_model, load_tokenizer, read_tokenizer_file

KNOWN = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball")


@pytest.fixture(scope="module")
def stories(stories260k_files):
    return load(*stories260k_files)


def test_greedy_from_bos_reproduces_llama2c(stories):
    model, tok = stories
    ids = model.generate(torch.tensor([[1]]), attention_mask=torch.ones(1, 1, dtype=torch.long),
                         max_new_tokens=60, do_sample=False, pad_token_id=0)
    text = tok.decode(ids[0], skip_special_tokens=True)
    assert text.startswith(KNOWN), text
    n_tokens = len(tok.encode(KNOWN)) - 1  # without BOS
    assert n_tokens >= 40


def _llama2c_encode(pieces, text: str) -> list[int]:
    """Direct transcription of llama2.c's encode(): dummy prefix, chars, byte fallback, best merges."""
    lookup = {p: i for i, (p, _) in enumerate(pieces) if i > 2}
    ids = [lookup[b" "]] if text else []
    for ch in text:
        raw = ch.encode("utf-8")
        ids.extend([lookup[raw]] if raw in lookup else [b + 3 for b in raw])
    while True:
        best, best_score, best_id = -1, -1e10, -1
        for i in range(len(ids) - 1):
            merged = pieces[ids[i]][0] + pieces[ids[i + 1]][0]
            if merged in lookup and pieces[lookup[merged]][1] > best_score:
                best, best_score, best_id = i, pieces[lookup[merged]][1], lookup[merged]
        if best < 0:
            return [1] + ids
        ids[best:best + 2] = [best_id]


def test_tokenizer_matches_llama2c_encode_on_real_text(stories, stories260k_files, hotpotqa_file):
    _, tok = stories
    pieces = read_tokenizer_file(stories260k_files[1])
    rows = json.loads(hotpotqa_file.read_text())
    order = torch.randperm(len(rows))[:6].tolist()
    texts = [rows[i]["question"] for i in order] + [" ".join(rows[i]["context"][0][1]) for i in order]
    texts += ["Tom and Sue  went\tto the park.\nThey saw a café — ünïcode ✓ 🙂!", ""]
    for text in texts:
        ids = tok.encode(text)
        assert ids == _llama2c_encode(pieces, text), text
        assert tok.decode(ids, skip_special_tokens=True) == text


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_missing_and_corrupt_checkpoints_raise(tmp_path, stories260k_files):
    ckpt, tokfile = stories260k_files
    good = ckpt.read_bytes()
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        load_model(tmp_path / "missing.bin")
    with pytest.raises(CheckpointFormatError, match=r"truncated\.bin: 1000 bytes, expected 1056540"):
        load_model(_write(tmp_path, "truncated.bin", good[:1000]))
    with pytest.raises(CheckpointFormatError, match="expected at least a 28-byte header"):
        load_model(_write(tmp_path, "tiny.bin", good[:10]))
    bad_header = struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + good[28:]
    with pytest.raises(CheckpointFormatError, match="bad header"):
        load_model(_write(tmp_path, "header.bin", bad_header))
    negative = struct.pack("<7i", -64, 172, 5, 8, 4, 512, 512) + good[28:]
    with pytest.raises(CheckpointFormatError, match="bad header"):
        load_model(_write(tmp_path, "negative.bin", negative))
    with pytest.raises(CheckpointFormatError, match="expected 1056540"):
        load_model(_write(tmp_path, "long.bin", good + b"\0" * 8))
    nan = bytearray(good)
    nan[28:32] = struct.pack("<f", float("nan"))
    with pytest.raises(CheckpointFormatError, match="tok_embeddings contains NaN"):
        load_model(_write(tmp_path, "nan.bin", bytes(nan)))
    with pytest.raises(CheckpointFormatError, match="tokenizer .* does not exist"):
        load(ckpt, tmp_path / "none.bin")
    tok_bytes = tokfile.read_bytes()
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_tokenizer(_write(tmp_path, "tok_trunc.bin", tok_bytes[:3000]))
    with pytest.raises(CheckpointFormatError, match="trailing bytes"):
        load_tokenizer(_write(tmp_path, "tok_long.bin", tok_bytes + b"xyz"))
    with pytest.raises(CheckpointFormatError, match="entry 0 has length"):
        load_tokenizer(_write(tmp_path, "tok_len.bin", tok_bytes[:8] + struct.pack("<i", -5) + tok_bytes[12:]))

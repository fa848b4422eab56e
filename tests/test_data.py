import gzip
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sltrain.config import DataConfig
from sltrain.data import Blocks, BlockSampler, prepare
from sltrain.data.corpus import embedded_path, read_documents, split_documents, verify_checksum
from sltrain.errors import UserError


def test_embedded_corpus_is_verified_and_complete():
    assert verify_checksum(embedded_path()) == (
        "e639c0616568e93daec9725d311066c82bcaeccb4b5304af31a92b0f0fe4b301"
    )
    docs = read_documents("embedded")
    assert len(docs) == 46 and sum(map(len, docs)) > 5_000_000


def test_corrupt_file_is_detected(tmp_path):
    copy = tmp_path / "corpus.jsonl.gz"
    shutil.copy(embedded_path(), copy)
    shutil.copy(str(embedded_path()) + ".sha256", str(copy) + ".sha256")
    assert verify_checksum(copy)
    data = bytearray(copy.read_bytes())
    data[1000] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        read_documents(str(copy))


def test_all_local_formats_read_the_same_documents(tmp_path):
    texts = ["first document\nwith two lines\n", "second one", "third, the last"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet")
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, t in enumerate(texts):
        (folder / f"{i}.txt").write_text(t)
    assert read_documents(str(tmp_path / "a.jsonl")) == texts
    assert read_documents(str(tmp_path / "a.jsonl.gz"), text_field="body") == texts
    assert read_documents(str(tmp_path / "a.parquet")) == texts
    assert read_documents(str(folder)) == texts


@pytest.mark.parametrize(
    "content,match",
    [("", "holds no text"), ('{"text": "a"}\nnot json\n', "not valid JSON"),
     ('{"body": "a"}\n', "no 'text' field")],
)
def test_bad_files_give_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        read_documents(str(path))


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_documents(str(tmp_path / "nope.jsonl"))
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(embedded_path().read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot be read"):
        read_documents(str(truncated))


def test_split_holds_out_the_tail_of_every_document():
    docs = ["".join(f"line {i} of doc {d}\n" for i in range(100)) for d in range(3)]
    train, val = split_documents(docs, 0.1)
    assert split_documents(docs, 0.1) == (train, val)
    for doc, tr, va in zip(docs, train, val, strict=True):
        assert tr + va == doc and tr.endswith("\n") and 0.05 < len(va) / len(doc) < 0.15


def test_prepare_packs_documents_with_eos(small_corpus):
    cfg = DataConfig(source=str(small_corpus), seq_len=32)
    data = prepare(cfg, vocab_size=512)
    assert data.tokenizer.get_vocab_size() <= 512 and data.train.dtype == np.uint16
    assert (data.train == data.eos_id).sum() == 12 and (data.val == data.eos_id).sum() == 12
    again = prepare(cfg, vocab_size=512)  # from the cache
    assert np.array_equal(again.train, data.train) and np.array_equal(again.val, data.val)
    first_doc = json.loads(small_corpus.read_text().splitlines()[0])["text"]
    end = int(np.argmax(data.train == data.eos_id))
    assert first_doc.startswith(data.tokenizer.decode(data.train[:end].tolist()))


def test_blocks_and_resumable_sampler():
    tokens = np.arange(1000, dtype=np.uint16)
    blocks = Blocks(tokens, seq_len=10)
    assert len(blocks) == 99
    x, y = blocks.batch([0, 5])
    assert x[1, 0] == 50 and y[1, -1] == 60 and (y[:, :-1] == x[:, 1:]).all()
    a = BlockSampler(blocks, batch_size=8, seed=1)
    seen = [a.next_batch()[0] for _ in range(30)]  # crosses epoch boundaries
    b = BlockSampler(blocks, batch_size=8, seed=1)
    for _ in range(17):
        b.next_batch()
    c = BlockSampler(blocks, batch_size=8, seed=1)
    c.load_state_dict(b.state_dict())
    for i in range(17, 30):
        assert (c.next_batch()[0] == seen[i]).all()
    with pytest.raises(UserError, match="fewer than one batch"):
        BlockSampler(Blocks(tokens[:50], 10), batch_size=8, seed=0)

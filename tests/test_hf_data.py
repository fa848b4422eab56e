"""Streamed `hf:` sources, pretrained tokenizers, token folders and `sltrain data prepare`.

Nothing here reaches the Hub: conftest sets HF_HUB_OFFLINE, local files go through datasets'
packaged readers, and a Hub dataset with a validation split is stood in for by local records.
"""

import gzip
import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sltrain.cli import main
from sltrain.config import DataConfig, load_config, resume_config
from sltrain.data import Blocks, load_tokenizer, prepare, save_tokenizer, streaming
from sltrain.data.packing import pack
from sltrain.errors import UserError
from sltrain.train import train


def docs_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus_formats(small_corpus, tmp_path_factory):
    """The small corpus as a folder of JSON lines (one file gzipped) and as Parquet."""
    root = tmp_path_factory.mktemp("formats")
    docs = docs_of(small_corpus)
    (root / "jsonl").mkdir()
    (root / "jsonl" / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:5]))
    with gzip.open(root / "jsonl" / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(d) + "\n" for d in docs[5:]))
    pq.write_table(pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]}),
                   root / "corpus.parquet")
    return root


@pytest.fixture(scope="module")
def hf_tokenizer_dir(small_corpus, tmp_path_factory):
    """A local Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) with EOS
    </s>, 400 ids, that truncates at 16 tokens as saved (t5-base truncates at 512)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [d["text"] for d in docs_of(small_corpus)],
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>"], show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.enable_truncation(16)
    folder = tmp_path_factory.mktemp("hf-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>").save_pretrained(folder)
    return folder


def assert_same(a, b):
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.tokenizer.to_str() == b.tokenizer.to_str() and a.eos_id == b.eos_id
    x, y = Blocks(a.train, 32), Blocks(b.train, 32)
    assert len(x) == len(y)
    assert all((p == q).all() for p, q in zip(x.batch(range(len(x))), y.batch(range(len(y))), strict=True))


@pytest.mark.parametrize("builder,local", [("json", "jsonl"), ("parquet", "corpus.parquet")])
@pytest.mark.parametrize("tokenizer", ["bpe", "hf"])
def test_streaming_local_files_through_datasets_gives_the_local_blocks(
        corpus_formats, hf_tokenizer_dir, builder, local, tokenizer):
    path = corpus_formats / local
    tok = "bpe" if tokenizer == "bpe" else str(hf_tokenizer_dir)
    local_data = prepare(DataConfig(source=str(path), tokenizer=tok), 512)
    streamed = prepare(DataConfig(source=f"hf:{builder}:{path}", tokenizer=tok), 512)
    assert streamed.folder != local_data.folder  # two sources, two cache entries
    assert_same(local_data, streamed)
    # The same budget cuts both at the same document boundary.
    capped = {"tokenizer": tok, "max_tokens": 3000, "val_tokens": 400}
    a = prepare(DataConfig(source=str(path), **capped), 512)
    b = prepare(DataConfig(source=f"hf:{builder}:{path}", **capped), 512)
    assert_same(a, b)
    assert 3000 <= len(a.train) < len(local_data.train) and a.train[-1] == a.eos_id
    assert np.array_equal(a.train, local_data.train[: len(a.train)])


def test_hf_source_reads_only_its_budget_and_serves_smaller_ones_from_the_cache(
        small_corpus, monkeypatch, tmp_path):
    """A Hub dataset with a validation split, stood in for by local records."""
    docs = docs_of(small_corpus)
    opened, consumed = [], []

    def records(n):
        for i in range(n):  # a long stream: the corpus four times over
            consumed[-1] += 1
            yield docs[i % 9]

    def fake_open(src, train_split, val_split):
        opened.append((src.name, src.config, train_split, val_split))
        consumed.append(0)
        return records(36), iter(docs[9:])

    monkeypatch.setattr(streaming, "open_splits", fake_open)
    # A cache of its own: another test in this process may have cached the same name.
    monkeypatch.setenv("SLTRAIN_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(source="hf:someone/corpus:en")
    with pytest.raises(UserError, match="needs a token budget; pass --max-tokens"):
        prepare(cfg, 512)
    small = prepare(cfg, 512, min_train_tokens=2000, min_val_tokens=300)
    assert opened[0] == ("someone/corpus", "en", "train", "validation")
    assert small.built and small.meta["val_from"] == "split validation"
    assert 2000 <= len(small.train) < 12_000 and small.meta["splits"]["train"]["complete"] is False
    assert consumed[-1] < 9  # the BPE read the first 9 (it trains on all it gets), tokenising fewer
    # The validation stream is the validation split's documents, whole.
    val_docs = [d["text"] for d in docs[9:]]
    full_val = pack([e.ids for e in small.tokenizer.encode_batch(val_docs, add_special_tokens=False)],
                    small.eos_id, small.val.dtype)
    assert np.array_equal(small.val, full_val[: len(small.val)]) and len(small.val) >= 300
    # A larger budget re-reads; a smaller one is then a cut of the cache, equal to a fresh read.
    big = prepare(cfg, 512, min_train_tokens=20_000, min_val_tokens=300)
    assert big.built and len(big.train) >= 20_000
    n = len(opened)
    again = prepare(cfg, 512, min_train_tokens=2000, min_val_tokens=300)
    assert not again.built and len(opened) == n
    assert np.array_equal(again.train, small.train) and np.array_equal(again.val, small.val)
    assert isinstance(again.train, np.memmap)


def test_unknown_dataset_offline_is_one_clear_line(capsys):
    with pytest.raises(UserError) as e:
        prepare(DataConfig(source="hf:nobody/no-such-dataset"), 512, min_train_tokens=1000)
    assert "cannot be opened" in str(e.value) and "HF_DATASETS_OFFLINE" in str(e.value)
    assert "\n" not in str(e.value)
    assert main(["data", "prepare", "--data", "hf:nobody/no-such-dataset:en"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data PATH or hf:json:PATH" in err


@pytest.mark.parametrize("source,match", [
    ("hf:", "names no dataset"), ("hf:json:", "names no files"),
    ("hf:parquet:/no/such/dir", "no .parquet files"),
])
def test_bad_hf_specs(source, match):
    with pytest.raises(UserError, match=match):
        prepare(DataConfig(source=source), 512, min_train_tokens=100)


def test_missing_text_field_in_a_stream(corpus_formats):
    with pytest.raises(UserError, match="has no field 'body'.*set --text-field"):
        prepare(DataConfig(source=f"hf:json:{corpus_formats / 'jsonl'}", text_field="body"), 512)


def test_local_hf_tokenizer_folder_and_its_eos(small_corpus, hf_tokenizer_dir, tmp_path):
    docs = docs_of(small_corpus)
    docs[0]["text"] = "An end tag </s> inside a document is text, not a boundary.\n" + docs[0]["text"]
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs))
    data = prepare(DataConfig(source=str(source), tokenizer=str(hf_tokenizer_dir)), 512)
    assert data.eos_token == "</s>" and data.eos_id == data.tokenizer.token_to_id("</s>")
    assert (data.train == data.eos_id).sum() == 12 and (data.val == data.eos_id).sum() == 12
    end = int(np.argmax(data.train == data.eos_id))
    assert end > 1000  # the saved truncation to 16 tokens is not applied
    assert data.tokenizer.decode(data.train[:end].tolist()).startswith("An end tag  inside")

    save_tokenizer(data.tokenizer, data.eos_token, tmp_path / "run")
    tok, eos = load_tokenizer(tmp_path / "run")
    assert eos == "</s>" and tok.to_str() == data.tokenizer.to_str()


def test_run_folder_keeps_the_tokenizer_and_old_runs_load(tiny, hf_tokenizer_dir, tmp_path):
    cfg = load_config(None, {**tiny, "train.steps": 2, "data.tokenizer": str(hf_tokenizer_dir)})
    train(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "tokenizer_meta.json").read_text())["eos_token"] == "</s>"
    assert load_tokenizer(run)[1] == "</s>"
    # Resuming reads the run's own tokenizer, without the folder it came from.
    shutil.move(hf_tokenizer_dir, tmp_path / "moved")
    try:
        summary = train(resume_config(run, {"train.steps": 3}), run_dir=run, resume=run)
    finally:
        shutil.move(tmp_path / "moved", hf_tokenizer_dir)
    assert summary["step"] == 3
    # A run saved before tokenizer_meta.json: the BPE's <|endoftext|>, or a known EOS it holds.
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(run / "tokenizer.json", old / "tokenizer.json")
    assert load_tokenizer(old)[1] == "</s>"
    bpe = Tokenizer(models.BPE())
    bpe.add_special_tokens(["<|endoftext|>"])
    bpe.save(str(old / "tokenizer.json"))
    assert load_tokenizer(old)[1] == "<|endoftext|>"
    Tokenizer(models.BPE()).save(str(old / "tokenizer.json"))
    with pytest.raises(UserError, match="has no end-of-text token"):
        load_tokenizer(old)


def test_hub_tokenizer_offline_is_one_clear_line():
    with pytest.raises(UserError) as e:
        prepare(DataConfig(tokenizer="t5-base"), 32000)
    msg = str(e.value)
    assert msg.startswith("tokenizer t5-base cannot be loaded") and "\n" not in msg
    assert "HF_HUB_OFFLINE=1" in msg and "pass a local folder or tokenizer.json" in msg


def test_ids_beyond_the_model_vocabulary_are_refused(small_corpus, hf_tokenizer_dir, tmp_path):
    cfg = DataConfig(source=str(small_corpus), tokenizer=str(hf_tokenizer_dir))
    with pytest.raises(UserError) as e:
        prepare(cfg, 300)
    msg = str(e.value)
    assert re.search(r"holds token id \d+ but the model's vocabulary has 300 ids \(the tokenizer "
                     r".* has 400\); raise --vocab-size to at least \d+$", msg) and "\n" not in msg
    # Ids the tokenizer has but the text never produces (like t5-base's 100 extra ids) are fine.
    data = prepare(cfg, 400)
    top = int(max(data.train.max(), data.val.max()))
    assert prepare(cfg, top + 1).tokenizer.get_vocab_size() == 400
    with pytest.raises(UserError, match=f"at least {top + 1}$"):
        prepare(cfg, top)


def test_prepared_folder_trains_like_its_source(tiny, tmp_path, capsys):
    flags = [f"--{k}={v}" for k, v in tiny.items()
             if k.startswith(("data.", "model.", "train.batch_size", "train.steps"))]
    out = tmp_path / "prepared"
    assert main(["data", "prepare", *flags, "--out", str(out)]) == 0
    assert "--data " + str(out) in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eos_token"] == "<|endoftext|>"
    assert meta["splits"]["train"]["tokens"] == (out / "train.bin").stat().st_size // 2

    base = {**tiny, "train.steps": 3, "train.eval_every": 0}
    a = train(load_config(None, {**base, "train.out_dir": str(tmp_path / "a")}))
    b = train(load_config(None, {**base, "data.source": str(out), "train.out_dir": str(tmp_path / "b")}))
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in la] == [json.loads(x)["loss"] for x in lb]
    assert a["val_loss"] == b["val_loss"]
    with pytest.raises(UserError, match="was tokenised with bpe, not t5-base; drop --tokenizer"):
        prepare(DataConfig(source=str(out), tokenizer="t5-base"), 512)


@pytest.fixture
def prepared(small_corpus, tmp_path):
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "--data", str(small_corpus), "--vocab-size", "512",
                 "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("damage,match", [
    ("truncate", "train.bin is corrupt: .* bytes where meta.json records"),
    ("flip", "train.bin is corrupt: its sha256 does not match"),
    ("delete", "val.bin is missing"),
    ("meta", "meta.json is damaged"),
    ("tokenizer", "tokenizer.json does not match meta.json"),
])
def test_damaged_prepared_folder_is_refused(prepared, damage, match):
    train_bin = prepared / "train.bin"
    if damage == "truncate":
        train_bin.write_bytes(train_bin.read_bytes()[:-2])
    elif damage == "flip":
        data = bytearray(train_bin.read_bytes())
        data[100] ^= 0xFF
        train_bin.write_bytes(bytes(data))
    elif damage == "delete":
        (prepared / "val.bin").unlink()
    elif damage == "meta":
        meta = json.loads((prepared / "meta.json").read_text())
        del meta["splits"]["val"]
        (prepared / "meta.json").write_text(json.dumps(meta))
    else:
        tok = json.loads((prepared / "tokenizer.json").read_text())
        tok["added_tokens"][0]["content"] = "<|other|>"
        (prepared / "tokenizer.json").write_text(json.dumps(tok))
        (prepared / "tokenizer_meta.json").write_text(json.dumps({"eos_token": "<|other|>"}))
    with pytest.raises(UserError, match=match) as e:
        prepare(DataConfig(source=str(prepared)), 512)
    assert "sltrain data prepare --out" in str(e.value) and "\n" not in str(e.value)


def test_cache_is_memory_mapped_and_a_damaged_entry_is_rebuilt(small_corpus, capsys):
    cfg = DataConfig(source=str(small_corpus), val_fraction=0.07)
    first = prepare(cfg, 512)
    assert first.built and isinstance(first.train, np.memmap) and first.train.filename
    again = prepare(cfg, 512)
    assert not again.built and isinstance(again.train, np.memmap) and isinstance(again.val, np.memmap)
    assert np.array_equal(again.train, first.train)
    x, y = Blocks(again.train, 32).batch([0, 3])
    assert x.shape == (2, 32) and (y[:, :-1] == x[:, 1:]).all()
    expected, train_bin = np.array(first.train), again.folder / "train.bin"
    del first, again, x, y  # truncating a mapped file in place would fault its readers
    train_bin.write_bytes(train_bin.read_bytes()[:100])
    rebuilt = prepare(cfg, 512)
    assert rebuilt.built and np.array_equal(rebuilt.train, expected)
    assert "token cache" in capsys.readouterr().err


def test_data_prepare_fills_the_cache_train_reads(tiny, capsys):
    flags = ["--data", tiny["data.source"], "--vocab-size", "512", "--val-fraction", "0.08"]
    assert main(["data", "prepare", *flags]) == 0
    assert "tokenised" in capsys.readouterr().out
    assert main(["data", "prepare", *flags]) == 0
    assert "found in the cache" in capsys.readouterr().out


def test_eval_and_health_of_a_run_on_a_streamed_source_read_its_budget(
        tiny, small_corpus, monkeypatch, tmp_path, capsys):
    """A Hub source has no end: evaluating a run on it reads the run's own token budget."""
    from sltrain.evaluate import perplexity

    docs = docs_of(small_corpus)
    monkeypatch.setattr(streaming, "open_splits",
                        lambda src, train_split, val_split: (iter(docs[i % 9] for i in range(36)),
                                                             iter(docs[9:])))
    summary = train(load_config(None, {**tiny, "data.source": "hf:someone/corpus:en",
                                       "train.steps": 4, "train.eval_every": 0}))
    run = tmp_path / "run"
    r = perplexity(run, max_batches=tiny["train.eval_batches"])
    assert r["ppl"] == pytest.approx(summary["val_ppl"], rel=1e-6)
    assert main(["health", str(run), "--out", str(tmp_path / "h")]) == 0

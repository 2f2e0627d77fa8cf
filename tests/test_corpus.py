"""Corpus readers: formats, the packaged Wikipedia default, validation messages, stable split."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retro_platform.config import CorpusConfig
from retro_platform.db.corpus import (
    MIRROR_SUFFIX,
    corpus_digest,
    load_documents,
    read_documents,
    stable_split,
    wikipedia_summaries_path,
)
from retro_platform.errors import CorpusError


def test_wikipedia_default_is_read_from_site_packages():
    path = wikipedia_summaries_path()
    assert "site-packages" in str(path) and path.name == "summaries_en-us.json"
    docs = read_documents("wikipedia", use_ray=False)
    assert len(docs) > 10_000 - 100
    assert len({d["id"] for d in docs}) == len(docs)
    first = docs[0]
    assert first["text"] and first["title"] == first["id"]
    assert first["where"].startswith(str(path))


def test_jsonl_parquet_and_folder_formats(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"id": 1, "text": "one", "title": "T"}\n\n{"id": "2", "text": "two"}\n')
    docs = read_documents(str(jsonl), use_ray=False)
    assert [(d["id"], d["text"], d["title"]) for d in docs] == [("1", "one", "T"), ("2", "two", "")]
    assert docs[1]["where"] == f"{jsonl}, line 3"

    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["x", "y", "z"], "text": ["one", "", "three"]}), parquet)
    corpus = load_documents(CorpusConfig(source=str(parquet), valid_fraction=0.0), use_ray=False)
    assert [d["id"] for d in corpus.train] == ["x", "z"]
    assert corpus.empty == 1 and corpus.read == 3  # empty documents are skipped and counted

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("Alpha document.")
    (folder / "sub" / "b.md").write_text("# Beta\nSecond document.")
    (folder / "ignored.bin").write_bytes(b"\x00\xff")
    docs = read_documents(str(folder), use_ray=False)
    assert [(d["id"], d["title"]) for d in docs] == [("a.txt", "a"), ("sub/b.md", "b")]


def test_ray_data_reader_gives_the_same_documents_and_errors(ray_session, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(5):
        (folder / f"d{i}.txt").write_text(f"document number {i}")
    assert read_documents(str(folder), use_ray=True) == read_documents(str(folder), use_ray=False)
    (folder / "d3.txt").write_bytes(b"caf\xe9")
    with pytest.raises(CorpusError, match=r"d3\.txt: not valid UTF-8"):
        read_documents(str(folder), use_ray=True)


BAD = [
    ("malformed.jsonl", b'{"id": "a", "text": "ok"}\n{"id": "b", "text": \n', r"line 2: malformed JSON"),
    (
        "latin1.jsonl",
        b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n',
        r"line 2: not valid UTF-8",
    ),
    ("noid.jsonl", b'{"text": "no id here"}\n', r"line 1: missing 'id'"),
    ("notext.jsonl", b'{"id": "a", "body": "x"}\n', r"line 1: document 'a' has no 'text' field"),
    (
        "number.jsonl",
        b'{"id": "a", "text": 42}\n',
        r"line 1: 'text' of document 'a' must be a string, got int",
    ),
    ("title.jsonl", b'{"id": "a", "text": "x", "title": [1]}\n', r"line 1: 'title' of document 'a' must be"),
    ("list.jsonl", b'["a", "b"]\n', r"line 1: expected an object"),
    ("badid.jsonl", b'{"id": {"x": 1}, "text": "t"}\n', r"line 1: 'id' must be a string or integer"),
]


@pytest.mark.parametrize("name,content,message", BAD, ids=[b[0] for b in BAD])
def test_bad_jsonl_names_file_line_and_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message) as info:
        read_documents(str(path), use_ray=False)
    assert str(info.value).startswith(str(path))


def test_bad_parquet_names_file_and_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["x"], "body": ["no text column"]}), path)
    with pytest.raises(CorpusError, match=r"bad\.parquet: Parquet file lacks column\(s\) \['text'\]"):
        read_documents(str(path), use_ray=False)
    pq.write_table(pa.table({"id": ["x", "y"], "text": [b"bytes", b"more"]}), path)
    with pytest.raises(CorpusError, match=r"bad\.parquet, row 0: 'text' of document 'x' must be a string"):
        read_documents(str(path), use_ray=False)
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(CorpusError, match="not a readable Parquet file"):
        read_documents(str(path), use_ray=False)


def test_duplicate_ids_name_both_places_and_empty_corpus_is_refused(tmp_path):
    dupes = tmp_path / "a.jsonl"
    dupes.write_text('{"id": "y", "text": "one"}\n{"id": 7, "text": "x"}\n{"id": "y", "text": "two"}\n')
    with pytest.raises(
        CorpusError, match=r"a\.jsonl, line 3: duplicate document id 'y' \(first seen at .*line 1\)"
    ):
        load_documents(CorpusConfig(source=str(dupes)), use_ray=False)
    folder = tmp_path / "f"
    folder.mkdir()
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": "a", "text": ""}\n{"id": "b", "text": "  \\n "}\n')
    with pytest.raises(CorpusError, match=r"no non-empty documents \(2 read, 2 empty\)"):
        load_documents(CorpusConfig(source=str(empty)), use_ray=False)
    (tmp_path / "nothing.jsonl").write_text("")
    with pytest.raises(CorpusError, match="no non-empty documents"):
        load_documents(CorpusConfig(source=str(tmp_path / "nothing.jsonl")), use_ray=False)
    with pytest.raises(CorpusError, match="holds no .txt or .md files"):
        load_documents(CorpusConfig(source=str(folder)), use_ray=False)
    with pytest.raises(CorpusError, match="does not exist"):
        load_documents(CorpusConfig(source=str(tmp_path / "missing.jsonl")), use_ray=False)
    (tmp_path / "c.csv").write_text("id,text\n")
    with pytest.raises(CorpusError, match="unknown type"):
        load_documents(CorpusConfig(source=str(tmp_path / "c.csv")), use_ray=False)


def test_split_is_stable_near_the_fraction_and_max_documents_cuts(tmp_path):
    ids = [f"doc-{i}" for i in range(5000)]
    first = [stable_split(i, 0.1) for i in ids]
    assert first == [stable_split(i, 0.1) for i in ids]
    assert 0.08 < first.count("valid") / len(ids) < 0.12
    assert {stable_split(i, 0.0) for i in ids} == {"train"}
    corpus = load_documents(CorpusConfig(max_documents=300, valid_fraction=0.1), use_ray=False)
    assert len(corpus.train) + len(corpus.valid) == 300
    assert all(stable_split(d["id"], 0.1) == "valid" for d in corpus.valid)


def test_corpus_digest_follows_content(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "one"}\n')
    before = corpus_digest(str(path))
    assert corpus_digest(str(path)) == before
    path.write_text('{"id": "a", "text": "two"}\n')
    assert corpus_digest(str(path)) != before


def test_mirrored_corpus_holds_every_document_twice_originals_first():
    plain = load_documents(CorpusConfig(max_documents=40, valid_fraction=0.2), use_ray=False)
    mirrored = load_documents(CorpusConfig(max_documents=40, valid_fraction=0.2, mirror=True), use_ray=False)
    originals = {d["id"]: d["text"] for d in plain.train + plain.valid}
    docs = mirrored.train + mirrored.valid
    assert len(docs) == 80
    copies = {d["id"].removesuffix(MIRROR_SUFFIX): d["text"] for d in docs if d["id"].endswith(MIRROR_SUFFIX)}
    assert copies == originals  # same texts under other ids
    # in each split every original comes before every mirror (far apart in chunk order)
    for split in (mirrored.train, mirrored.valid):
        kinds = [d["id"].endswith(MIRROR_SUFFIX) for d in split]
        assert kinds == sorted(kinds)


def test_big_files_are_read_in_pieces_that_give_the_same_documents_and_line_numbers(tmp_path):
    from retro_platform.db.corpus import corpus_pieces, parse_piece

    jsonl = tmp_path / "big.jsonl"
    lines = [f'{{"id": "d{i}", "text": "document {i} {"x" * (i % 7)}"}}' for i in range(60)]
    jsonl.write_text("\n".join(lines) + "\n")
    pieces = corpus_pieces(str(jsonl), piece_bytes=100)
    assert len(pieces) > 10  # many reader tasks for one file
    whole = read_documents(str(jsonl), use_ray=False)
    assert [d["id"] for d in whole] == [f"d{i}" for i in range(60)]
    assert read_documents(str(jsonl), use_ray=False, piece_bytes=100) == whole  # every line once, in order
    assert sum(len(parse_piece(p)[0]) for p in pieces) == 60
    lines[47] = '{"id": "d47", "text": '
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=r"big\.jsonl, line 48: malformed JSON"):
        read_documents(str(jsonl), use_ray=False, piece_bytes=100)

    parquet = tmp_path / "big.parquet"
    table = pa.table({"id": [f"p{i}" for i in range(40)], "text": [f"row {i}" for i in range(40)]})
    pq.write_table(table, parquet, row_group_size=5)
    assert len(corpus_pieces(str(parquet), piece_bytes=1)) == 8  # one row group per piece
    docs = read_documents(str(parquet), use_ray=False, piece_bytes=1)
    assert [d["id"] for d in docs] == table.column("id").to_pylist()
    assert docs[33]["where"] == f"{parquet}, row 33"


def test_excluded_ids_are_left_out_uncounted_must_exist_and_the_build_reader_agrees(tmp_path):
    from retro_platform.db.build.documents import map_piece
    from retro_platform.db.corpus import corpus_pieces, iter_documents
    from retro_platform.errors import ConfigError

    path = tmp_path / "c.jsonl"
    rows = [("a", "alpha"), ("b", "beta"), ("e", ""), (3, "three"), ("c", "gamma"), ("d", "delta")]
    path.write_text("".join(json.dumps({"id": doc_id, "text": text}) + "\n" for doc_id, text in rows))
    assert [d["id"] for d in iter_documents(str(path))] == ["a", "b", "e", "3", "c", "d"]
    config = CorpusConfig(source=str(path), max_documents=3, valid_fraction=0.0, exclude_ids=["b", 3])
    assert config.exclude_ids == ["b", "3"]  # integer ids are read as corpus ids are
    corpus = load_documents(config, use_ray=False)
    # excluded documents do not count towards max_documents, nor as empty
    assert [d["id"] for d in corpus.train] == ["a", "c", "d"] and corpus.empty == 1
    mirrored = load_documents(CorpusConfig(**{**vars(config), "mirror": True}), use_ray=False)
    assert [d["id"] for d in mirrored.train] == ["a", "c", "d", "a#mirror", "c#mirror", "d#mirror"]
    # the build's reader tasks: the same documents left out, and the same counts
    (piece,) = corpus_pieces(str(path))
    stats = map_piece(piece, None, {"train": 1, "valid": 1}, 0.0, True, frozenset(config.exclude_ids))
    assert stats["excluded"] == ["b", "3"] and stats["n_read"] == 6 and stats["empty_before"] == [1]
    with pytest.raises(CorpusError, match=r"exclude_ids: 1 id\(s\) not in corpus .*c\.jsonl: 'zz'"):
        load_documents(CorpusConfig(source=str(path), exclude_ids=["a", "zz"]), use_ray=False)
    for bad, message in (([""], "non-empty"), (["a", "a"], r"lists \['a'\] more than once"), ("a", "a list")):
        with pytest.raises(ConfigError, match=f"database.corpus.exclude_ids: .*{message}"):
            CorpusConfig(exclude_ids=bad)


def test_a_corpus_on_object_storage_reads_like_the_same_files_locally(tmp_path, s3_bucket):
    """A folder of JSON Lines, Parquet and text files as an s3:// prefix, and a glob of some of them: the
    same documents in the same order as locally, read in the same pieces (byte ranges, row groups),
    with the same digest; errors name the object and line."""
    from retro_platform import storage
    from retro_platform.db.corpus import corpus_pieces

    local = tmp_path / "corpus"
    (local / "notes").mkdir(parents=True)
    lines = [json.dumps({"id": f"j{i}", "text": f"line {i} " + "y" * (i % 5)}) for i in range(30)]
    (local / "a.jsonl").write_text("\n".join(lines) + "\n")
    table = pa.table({"id": [f"p{i}" for i in range(12)], "text": [f"row {i}" for i in range(12)]})
    pq.write_table(table, local / "b.parquet", row_group_size=4)
    (local / "notes" / "n1.txt").write_text("first note")
    (local / "notes" / "n2.md").write_text("second note")
    (local / "skip.bin").write_bytes(b"\0")  # neither a corpus file nor a text document
    remote = f"{s3_bucket}/corpus"
    storage.copy_tree(local, remote)
    for pattern in ("", "*.jsonl", "notes/*"):
        here, there = (str(local / pattern), f"{remote}/{pattern}") if pattern else (str(local), remote)
        expected = read_documents(here, use_ray=False, piece_bytes=60)
        docs = read_documents(there, use_ray=False, piece_bytes=60)
        assert [(d["id"], d["text"], d["title"]) for d in docs] == [
            (d["id"], d["text"], d["title"]) for d in expected
        ]
        assert docs and all(d["where"].startswith(remote) for d in docs)
        assert len(corpus_pieces(there, 60)) == len(corpus_pieces(here, 60))
        assert corpus_digest(there, 60) == corpus_digest(here, 60)
    assert len(read_documents(remote, use_ray=False)) == 30 + 12 + 2
    storage.write_bytes_atomic(f"{remote}/a.jsonl", ("\n".join(lines[:7]) + '\n{"id": \n').encode())
    with pytest.raises(CorpusError, match=r"corpus/a\.jsonl, line 8: malformed JSON"):
        read_documents(remote, use_ray=False, piece_bytes=60)
    with pytest.raises(CorpusError, match="matches no file"):
        read_documents(f"{remote}/*.csv", use_ray=False)
    with pytest.raises(CorpusError, match="does not exist"):
        read_documents(f"{s3_bucket}/missing", use_ray=False)

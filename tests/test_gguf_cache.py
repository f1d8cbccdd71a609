"""The fetch stage's GGUF parse cache swaps two functions of the gguf package: a way out when that no longer works."""

from __future__ import annotations

import importlib.metadata
import logging

import gguf

from lorapipe.sources.gguf import gguf_parsed_once


def test_each_gguf_file_is_parsed_once_inside_and_the_originals_come_back(tmp_path, caplog):
    original = gguf.GGUFReader
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with caplog.at_level(logging.WARNING), gguf_parsed_once():
        assert gguf.GGUFReader(str(path)) is gguf.GGUFReader(str(path))
    assert gguf.GGUFReader is original
    assert not caplog.records


def test_a_cache_transformers_never_used_is_said_once(caplog):
    with caplog.at_level(logging.WARNING), gguf_parsed_once():
        pass  # as if transformers had read the file with a reader of its own
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "fallback: GGUF parsed without a cache: transformers no longer reads it through gguf.GGUFReader "
        "(slower, same output)"
    ]


def test_a_gguf_package_without_the_reader_runs_uncached_with_one_warning(monkeypatch, caplog):
    monkeypatch.delattr(gguf, "GGUFReader")
    with caplog.at_level(logging.WARNING), gguf_parsed_once():
        assert not hasattr(gguf, "GGUFReader")
    assert [r.getMessage() for r in caplog.records] == [
        f"fallback: GGUF parsed without a cache: gguf {importlib.metadata.version('gguf')} has no GGUFReader"
    ]

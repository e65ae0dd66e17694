"""finetune.gguf.header reads what gguf-py's GGUFReader reads (metadata and tensor list), and refuses a file that is
not a whole GGUF header."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.gguf import header


def test_the_header_is_what_gguf_py_reads(gguf):
    from gguf import GGUFReader

    read, reader = header.read(gguf), GGUFReader(str(gguf))
    assert read.version == reader.fields["GGUF.version"].contents()
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert read.metadata == fields
    assert len(read.metadata["tokenizer.ggml.tokens"]) == 49152
    assert [(t.name, t.shape, t.type_id, t.n_elements) for t in read.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.n_elements)) for t in reader.tensors]


def test_metadata_only(gguf):
    assert header.read(gguf, tensors=False).tensors == []


@pytest.mark.parametrize("cut", [3, 100, 200_000])
def test_a_truncated_or_foreign_file_is_a_value_error(gguf, tmp_path, cut):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(Path(gguf).read_bytes()[:cut])
    with pytest.raises(ValueError):
        header.read(bad)
    (tmp_path / "other.gguf").write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ValueError, match="magic"):
        header.read(tmp_path / "other.gguf")


def test_a_length_past_the_end_is_a_value_error_not_an_allocation(tmp_path):
    """A corrupt header whose string or array length is enormous: refused from the file's size, never allocated."""
    import struct

    for tail in (struct.pack("<Q", 2**62),  # a metadata key of 2**62 bytes
                 struct.pack("<Q", 3) + b"abc" + struct.pack("<IIQ", 9, 4, 2**60)):  # an array of 2**60 uint32
        bad = tmp_path / "corrupt.gguf"
        bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + tail)
        with pytest.raises(ValueError, match="ends inside its header"):
            header.read(bad)

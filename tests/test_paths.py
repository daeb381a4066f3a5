"""adapters.paths.read_bounded_text: the size limit, UTF-8 check and messages config, tags and manifests share."""

from __future__ import annotations

import tracemalloc

import pytest

from adapters.errors import ConfigError, StoreError
from adapters.paths import read_bounded_text


def test_a_file_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(tmp_path):
    text = "naïve: é\n" * 7  # multi-byte characters: the limit counts bytes, not characters
    size = len(text.encode("utf-8"))
    assert size > len(text)
    path = tmp_path / "f.yaml"
    path.write_bytes(text.encode("utf-8"))
    assert read_bounded_text(path, size) == text
    with pytest.raises(ConfigError, match=rf"^{path}: larger than {size - 1:,} bytes$"):
        read_bounded_text(path, size - 1)
    path.write_bytes(b"x" * 1001)
    with pytest.raises(ConfigError, match=r": larger than 1,000 bytes$"):
        read_bounded_text(path, 1000)
    assert read_bounded_text(path, 1001) == "x" * 1001


def test_a_huge_file_is_refused_without_being_loaded(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as fh:
        fh.truncate(256 << 20)  # sparse: 256 MiB of zero bytes, no disk used
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match="larger than 4096 bytes"):
            read_bounded_text(path, 4096, StoreError, too_large="{path}: larger than {limit} bytes")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"a: 1\nb: caf\xe9\n", b"one\ntwo\nthree\n\xc3(\n", b"x\n\n\n\n" + "é".encode() + b"\xe2\x82\n"],
)
def test_bytes_that_are_not_utf8_name_the_bad_byte_and_its_line(tmp_path, data):
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    # independently: the line holding the first replacement character when decoding leniently
    lines = data.decode("utf-8", errors="replace").split("\n")
    line = next(i for i, text in enumerate(lines, 1) if "\ufffd" in text)
    offset = data.decode("utf-8", errors="replace").index("\ufffd")
    byte = data[len(data.decode("utf-8", errors="replace")[:offset].encode("utf-8"))]
    with pytest.raises(ConfigError) as caught:
        read_bounded_text(path, 1000)
    assert str(caught.value) == f"{path}: not UTF-8 text (byte 0x{byte:02x} on line {line}); save the file as UTF-8"


def test_a_folder_or_missing_file_is_refused_with_the_callers_error_and_message(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: cannot be read \(Is a directory\)$"):
        read_bounded_text(tmp_path, 100)
    missing = tmp_path / "nope.json"
    with pytest.raises(StoreError, match=r"^nope: .*nope\.json.* \(No such file or directory\)$") as caught:
        read_bounded_text(missing, 100, StoreError, unreadable="nope: {error} ({reason})")
    assert not isinstance(caught.value, ConfigError)


def test_the_callers_templates_give_their_own_messages(tmp_path):
    path = tmp_path / "tags.json"
    path.write_bytes(b'{"tags": "caf\xe9"}')
    with pytest.raises(StoreError) as caught:
        read_bounded_text(path, 100, StoreError, not_utf8="{path}: damaged ({reason}) at {line}")
    assert str(caught.value) == (
        f"{path}: damaged ('utf-8' codec can't decode byte 0xe9 in position 13: invalid continuation byte) at 1"
    )
